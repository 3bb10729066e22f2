//! What a reload changes: the difference between the running config and a
//! newly loaded one, item by item, by name.
//!
//! Items are compared as they print (`kiln print-config --json`), which
//! leaves out where in a script each was written: moving a builder down a
//! file, or adding a comment above it, changes nothing. Worker passwords,
//! which print as `<secret>`, are compared by value.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use super::{MasterConfig, Worker};

/// Names added, removed and changed in one kind of item.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct NameDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl NameDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }

    /// Compares two lists of named items; `same` says whether two items of
    /// one name are alike.
    fn between<T>(
        old: &[T],
        new: &[T],
        name: impl Fn(&T) -> String,
        same: impl Fn(&T, &T) -> bool,
    ) -> NameDiff {
        let old: BTreeMap<String, &T> = old.iter().map(|x| (name(x), x)).collect();
        let new: BTreeMap<String, &T> = new.iter().map(|x| (name(x), x)).collect();
        let mut c = NameDiff::default();
        for (n, x) in &new {
            match old.get(n) {
                None => c.added.push(n.clone()),
                Some(o) if !same(o, x) => c.changed.push(n.clone()),
                Some(_) => {}
            }
        }
        c.removed = old
            .keys()
            .filter(|n| !new.contains_key(*n))
            .cloned()
            .collect();
        c
    }
}

/// Whether two values print the same (origins are not printed). Equal
/// values (origins included) print the same, and that check is much
/// cheaper: printing is only for those that differ.
pub fn same_printed<T: Serialize + PartialEq>(a: &T, b: &T) -> bool {
    if a == b {
        return true;
    }
    match (serde_json::to_value(a), serde_json::to_value(b)) {
        (Ok(a), Ok(b)) => a == b,
        // Not printable: treat as changed, which is always safe.
        _ => false,
    }
}

fn same_worker(a: &Worker, b: &Worker) -> bool {
    same_printed(a, b) && a.password.expose() == b.password.expose()
}

/// Everything a reload would change.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ConfigDiff {
    pub builders: NameDiff,
    pub schedulers: NameDiff,
    pub change_sources: NameDiff,
    pub workers: NameDiff,
    /// Workers whose password changed (also in `workers.changed`).
    pub passwords: Vec<String>,
    pub status: NameDiff,
    /// Global settings that changed, by their config key.
    pub globals: Vec<String>,
}

impl ConfigDiff {
    pub fn between(old: &MasterConfig, new: &MasterConfig) -> ConfigDiff {
        let builders = NameDiff::between(
            &old.builders,
            &new.builders,
            |b| b.name.to_string(),
            same_printed,
        );
        let schedulers = NameDiff::between(
            &old.schedulers,
            &new.schedulers,
            |s| s.name.clone(),
            same_printed,
        );
        let change_sources = NameDiff::between(
            &old.change_source,
            &new.change_source,
            |s| s.name(),
            same_printed,
        );
        let workers =
            NameDiff::between(&old.workers, &new.workers, |w| w.name.clone(), same_worker);
        let passwords = new
            .workers
            .iter()
            .filter(|w| {
                old.workers
                    .iter()
                    .any(|o| o.name == w.name && o.password.expose() != w.password.expose())
            })
            .map(|w| w.name.clone())
            .collect();
        let status = NameDiff::between(
            &old.status,
            &new.status,
            |s| serde_json::to_string(s).unwrap_or_default(),
            same_printed,
        );
        let mut globals = Vec::new();
        let mut global = |key: &str, same: bool| {
            if !same {
                globals.push(key.to_string());
            }
        };
        global("title", old.title == new.title);
        global("titleURL", old.title_url == new.title_url);
        global("buildbotURL", old.buildbot_url == new.buildbot_url);
        global("db", old.db == new.db);
        global("protocols", old.protocols == new.protocols);
        global(
            "www",
            same_printed(&old.www, &new.www)
                && old.www.as_ref().map(|w| {
                    w.users
                        .iter()
                        .map(|(k, u)| (k.clone(), u.password.expose().to_string()))
                        .collect::<Vec<_>>()
                }) == new.www.as_ref().map(|w| {
                    w.users
                        .iter()
                        .map(|(k, u)| (k.clone(), u.password.expose().to_string()))
                        .collect::<Vec<_>>()
                }),
        );
        global("properties", old.properties == new.properties);
        global(
            "prioritizeBuilders",
            same_printed(&old.prioritize_builders, &new.prioritize_builders),
        );
        global(
            "collapseRequests",
            same_printed(&old.collapse_requests, &new.collapse_requests),
        );
        global("logMaxSize", old.log_max_size == new.log_max_size);
        global(
            "logCompressionMethod",
            old.log_compression == new.log_compression,
        );
        global("janitor", old.janitor == new.janitor);
        global(
            "latentStartConcurrency",
            old.latent_start_concurrency == new.latent_start_concurrency,
        );
        ConfigDiff {
            builders,
            schedulers,
            change_sources,
            workers,
            passwords,
            status,
            globals,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.builders.is_empty()
            && self.schedulers.is_empty()
            && self.change_sources.is_empty()
            && self.workers.is_empty()
            && self.status.is_empty()
            && self.globals.is_empty()
    }

    /// Why this diff cannot be applied to a running master, if it cannot.
    pub fn needs_restart(old: &MasterConfig, new: &MasterConfig) -> Option<String> {
        let shown = crate::diagnostics::redact_url;
        if old.db.db_url != new.db.db_url {
            return Some(format!(
                "db.db_url changed from `{}` to `{}`: the database cannot change while the master runs; \
                 nothing of this reload was applied (restart the master to use the new database, or undo the change)",
                shown(&old.db.db_url),
                shown(&new.db.db_url)
            ));
        }
        if old.multi_master != new.multi_master || old.master_name != new.master_name {
            return Some(
                "multiMaster or masterName changed: a master's place among the others cannot change \
                 while it runs; nothing of this reload was applied (restart the master to use it, or undo the change)"
                    .to_string(),
            );
        }
        (old.db.password != new.db.password).then(|| {
            "db.password changed: the database's password cannot change while the master runs; \
             nothing of this reload was applied (restart the master to use it, or undo the change)"
                .to_string()
        })
    }
}

impl fmt::Display for ConfigDiff {
    /// One line per kind that changed, e.g.
    /// `builders: +2 (a, b), -1 (c), ~1 (d)`; "no changes" when none did.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no changes");
        }
        let mut first = true;
        let mut line = |f: &mut fmt::Formatter<'_>, kind: &str, c: &NameDiff| -> fmt::Result {
            if c.is_empty() {
                return Ok(());
            }
            if !first {
                f.write_str("\n")?;
            }
            first = false;
            write!(f, "{kind}:")?;
            let mut sep = " ";
            for (sign, names) in [("+", &c.added), ("-", &c.removed), ("~", &c.changed)] {
                if names.is_empty() {
                    continue;
                }
                write!(f, "{sep}{sign}{} ({})", names.len(), abbreviate(names))?;
                sep = ", ";
            }
            Ok(())
        };
        line(f, "builders", &self.builders)?;
        line(f, "schedulers", &self.schedulers)?;
        line(f, "change sources", &self.change_sources)?;
        line(f, "workers", &self.workers)?;
        line(f, "status", &self.status)?;
        if !self.globals.is_empty() {
            if !first {
                f.write_str("\n")?;
            }
            write!(f, "settings: {}", self.globals.join(", "))?;
        }
        Ok(())
    }
}

/// At most ten names, then how many more.
fn abbreviate(names: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut s = names
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(", and {} more", names.len() - SHOWN));
    }
    s
}

/// The name a change source goes by, from its printed form (as
/// [`super::ChangeSource::name`] makes it).
fn printed_source_name(v: &serde_json::Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    match v["type"].as_str() {
        Some("HgPoller") => format!("HgPoller:{}", super::join_url(&s("hgURL"), &s("branch"))),
        Some(t) => format!("{t}:{}", s("repourl")),
        None => v.to_string(),
    }
}

impl ConfigDiff {
    /// The diff between two configs as `kiln print-config --json` prints
    /// them (the REPL compares its files with a running master's
    /// `/api/v2/config`). Passwords print as `<secret>`, so a changed
    /// password does not show here.
    pub fn between_printed(old: &serde_json::Value, new: &serde_json::Value) -> ConfigDiff {
        use serde_json::Value;
        let list = |v: &Value, key: &str| v[key].as_array().cloned().unwrap_or_default();
        let by_name = |v: &Value| v["name"].as_str().unwrap_or_default().to_string();
        let kind = |key: &str, name: &dyn Fn(&Value) -> String| {
            NameDiff::between(&list(old, key), &list(new, key), name, |a, b| a == b)
        };
        let mut globals = Vec::new();
        let keys: std::collections::BTreeSet<&String> = old
            .as_object()
            .into_iter()
            .chain(new.as_object())
            .flat_map(|m| m.keys())
            .collect();
        for k in keys {
            let listed = [
                "builders",
                "schedulers",
                "change_source",
                "workers",
                "status",
            ];
            if !listed.contains(&k.as_str()) && old.get(k) != new.get(k) {
                globals.push(k.clone());
            }
        }
        ConfigDiff {
            builders: kind("builders", &by_name),
            schedulers: kind("schedulers", &by_name),
            change_sources: kind("change_source", &printed_source_name),
            workers: kind("workers", &by_name),
            passwords: Vec::new(),
            status: kind("status", &|v: &Value| v.to_string()),
            globals,
        }
    }
}
