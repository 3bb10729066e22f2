//! Which changes a scheduler takes: its branch filter and `fileIsImportant`,
//! and `explain`, the REPL's "what would this push trigger?".

use serde_json::{json, Value};

use crate::config::{Callback, SchedulerConfig, SchedulerKind};
use crate::script::ScriptRuntime;
use crate::store::Change;

/// A change as scripts see it (`fileIsImportant` gets this map).
pub fn change_map(c: &Change) -> rhai::Dynamic {
    let ch = &c.change;
    let props: serde_json::Map<String, Value> = ch
        .properties
        .iter()
        .map(|(k, (v, _))| (k.clone(), v.clone()))
        .collect();
    let v = json!({
        "changeid": c.changeid,
        "number": c.changeid,
        "author": ch.author,
        "who": ch.author,
        "committer": ch.committer,
        "comments": ch.comments,
        "files": ch.files,
        "branch": ch.branch,
        "revision": ch.revision,
        "revlink": ch.revlink,
        "when": ch.when_timestamp,
        "when_timestamp": ch.when_timestamp,
        "category": ch.category,
        "repository": ch.repository,
        "project": ch.project,
        "codebase": ch.codebase,
        "properties": props,
    });
    rhai::serde::to_dynamic(v).unwrap_or(rhai::Dynamic::UNIT)
}

/// What a scheduler's change filter and classification need.
pub(super) struct Filter<'a> {
    pub(super) branch: Option<&'a Option<String>>,
    pub(super) branches: Option<&'a Vec<String>>,
    pub(super) repository: Option<&'a str>,
    pub(super) project: Option<&'a str>,
    pub(super) file_is_important: Option<&'a Callback>,
    pub(super) only_important: bool,
    pub(super) tree_stable_timer: Option<u64>,
}

/// The change filter of a change-based scheduler; `None` for the others.
pub(super) fn filter_of(cfg: &SchedulerConfig) -> Option<Filter<'_>> {
    {
        match &cfg.kind {
            SchedulerKind::Scheduler {
                branch,
                repository,
                project,
                tree_stable_timer,
                file_is_important,
                only_important,
            } => Some(Filter {
                branch: Some(branch),
                branches: None,
                repository: repository.as_deref(),
                project: project.as_deref(),
                file_is_important: file_is_important.as_ref(),
                only_important: *only_important,
                tree_stable_timer: *tree_stable_timer,
            }),
            SchedulerKind::AnyBranchScheduler {
                branches,
                tree_stable_timer,
                file_is_important,
                only_important,
            } => Some(Filter {
                branch: None,
                branches: branches.as_ref(),
                repository: None,
                project: None,
                file_is_important: file_is_important.as_ref(),
                only_important: *only_important,
                tree_stable_timer: *tree_stable_timer,
            }),
            SchedulerKind::Nightly { branch, .. } => Some(Filter {
                branch: Some(branch),
                branches: None,
                repository: None,
                project: None,
                file_is_important: None,
                only_important: false,
                // Changes wait for the cron time, not for a quiet tree.
                tree_stable_timer: Some(u64::MAX),
            }),
            _ => None,
        }
    }
}

/// Why the filter `f` turns the change `ch` away, or `None` if it takes it.
pub(super) fn rejects(f: &Filter<'_>, ch: &crate::store::NewChange) -> Option<String> {
    let show = |b: &Option<String>| b.clone().unwrap_or_else(|| "the default branch".into());
    if let Some(b) = f.branch {
        if b != &ch.branch {
            return Some(format!("it takes {}, not {}", show(b), show(&ch.branch)));
        }
    }
    if let Some(bs) = f.branches {
        match &ch.branch {
            Some(b) if bs.contains(b) => {}
            _ => {
                return Some(format!(
                    "its branches are {bs:?}, which do not include {}",
                    show(&ch.branch)
                ))
            }
        }
    }
    if let Some(r) = f.repository {
        if r != ch.repository {
            return Some(format!("it takes repository {r}, not {}", ch.repository));
        }
    }
    if let Some(p) = f.project {
        if p != ch.project {
            return Some(format!("it takes project {p}, not {}", ch.project));
        }
    }
    None
}

/// What a scheduler would do with a change, as `kiln repl`'s `explain`
/// tells it.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// It builds (at once, or when its treeStableTimer fires).
    Builds { after_seconds: Option<u64> },
    /// It keeps the change (not important) for the next important one.
    Keeps(String),
    /// It does not take the change, and why.
    No(String),
}

/// What `cfg` would do with `change` (its filter, then `fileIsImportant`
/// run by `runtime`).
pub fn explain(cfg: &SchedulerConfig, change: &Change, runtime: &ScriptRuntime) -> Verdict {
    let Some(f) = filter_of(cfg) else {
        return Verdict::No(format!("a {} takes no changes", cfg.kind.type_name()));
    };
    if let Some(why) = rejects(&f, &change.change) {
        return Verdict::No(why);
    }
    let important = match f.file_is_important {
        None => true,
        Some(cb) => match runtime.call(cb, (change_map(change),)) {
            Ok(v) => v.as_bool().unwrap_or(true),
            // The master counts a failing function's change as important.
            Err(_) => true,
        },
    };
    match (important, f.only_important) {
        (true, _) => Verdict::Builds {
            after_seconds: match f.tree_stable_timer {
                None | Some(0) | Some(u64::MAX) => None,
                Some(s) => Some(s),
            },
        },
        (false, true) => Verdict::No(
            "fileIsImportant says the change is not important, and onlyImportant drops it".into(),
        ),
        (false, false) => Verdict::Keeps(
            "fileIsImportant says the change is not important: it builds with the next important change".into(),
        ),
    }
}
