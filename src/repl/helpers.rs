//! The helpers a session registers to explore a config: `branches()`,
//! `builders()`, `schedulers()`, `show(name)`, `explain(change)`,
//! `help(name)`, and `live()` against a running master.

use std::sync::{Arc, RwLock};

use rhai::{Dynamic, Engine};

use crate::config::{ChangeSource, MasterConfig};
use crate::script::ScriptRuntime;

/// What the helpers read: the config and runtime of the last good load.
#[derive(Default)]
pub(super) struct Shared {
    pub(super) config: RwLock<Option<Arc<MasterConfig>>>,
    pub(super) runtime: RwLock<Option<ScriptRuntime>>,
    /// `--master URL`: a running master to read live state from.
    pub(super) master: RwLock<Option<String>>,
}

/// GET each of `paths` from the running master at `url`, as JSON, with
/// one client.
pub(super) fn fetch_json<const N: usize>(
    url: &str,
    paths: [&str; N],
) -> Result<[serde_json::Value; N], String> {
    let client = crate::client::Client::new(url, None).map_err(|e| format!("{e:#}"))?;
    let mut out = Vec::with_capacity(N);
    for path in paths {
        out.push(
            client
                .get(path)
                .and_then(|a| a.ok_json("the master refused"))
                .map_err(|e| format!("{e:#}"))?,
        );
    }
    out.try_into()
        .map_err(|_| "the master's answers did not add up".to_string())
}

/// The running master's connected workers and waiting requests.
pub(super) fn live_state(url: &str) -> Result<String, String> {
    let [workers, requests] = fetch_json(
        url,
        ["/api/v2/workers", "/api/v2/buildrequests?claimed=false"],
    )?;
    let mut connected: Vec<String> = workers["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["connected_to"].as_array().is_some_and(|c| !c.is_empty()))
        .filter_map(|w| w["name"].as_str().map(String::from))
        .collect();
    connected.sort();
    let mut pending: std::collections::BTreeMap<String, usize> = Default::default();
    for r in requests["buildrequests"].as_array().into_iter().flatten() {
        let name = r["buildername"].as_str().unwrap_or("?").to_string();
        *pending.entry(name).or_default() += 1;
    }
    let mut lines = vec![format!(
        "{} connected worker(s){}{}",
        connected.len(),
        if connected.is_empty() { "" } else { ": " },
        connected.join(", ")
    )];
    lines.push(format!(
        "{} waiting request(s)",
        pending.values().sum::<usize>()
    ));
    for (b, n) in pending {
        lines.push(format!("  {b}: {n}"));
    }
    Ok(lines.join("\n"))
}

impl Shared {
    pub(super) fn master(&self) -> Option<String> {
        crate::sync::read(&self.master).clone()
    }

    pub(super) fn config(&self) -> Result<Arc<MasterConfig>, Box<rhai::EvalAltResult>> {
        crate::sync::read(&self.config)
            .clone()
            .ok_or_else(|| "the config did not load; fix it and :reload".into())
    }
}

/// What `help(name)` knows of kiln's own vocabulary, beyond signatures.
pub(super) const DOCS: &[(&str, &str)] = &[
    ("HgPoller", "HgPoller(#{hgURL, branch, pollInterval, ...}): polls a Mercurial repository's pushes"),
    ("GitPoller", "GitPoller(#{repourl, branches, pollInterval, ...}): polls a Git repository"),
    ("Scheduler", "Scheduler(#{name, branch, treeStableTimer, builderNames, fileIsImportant, ...}): builds changes on one branch"),
    ("AnyBranchScheduler", "AnyBranchScheduler(#{name, branches, treeStableTimer, builderNames, ...}): builds changes on several branches"),
    ("ForceScheduler", "ForceScheduler(#{name, builderNames}): builds on request (kiln force, the API)"),
    ("Nightly", "Nightly(#{name, branch, hour, minute, builderNames, onlyIfChanged}): builds on a cron schedule"),
    ("Periodic", "Periodic(#{name, periodicBuildTimer, builderNames}): builds every so many seconds"),
    ("Triggerable", "Triggerable(#{name, builderNames}): builds when a Trigger step asks"),
    ("Dependent", "Dependent(#{name, upstream, builderNames}): builds when an upstream buildset succeeds"),
    ("BuilderConfig", "BuilderConfig(#{name, workernames, factory, builddir, ...}): a builder"),
    ("BuildFactory", "BuildFactory(): an empty list of steps; f.addStep(step) appends one"),
    ("ScriptFactory", "ScriptFactory(#{scriptRepo, scriptName, extra_args, ...}): the seed's mozharness build"),
    ("ShellCommand", "ShellCommand(#{command, name, workdir, env, timeout, maxTime, ...}): runs a command on the worker"),
    ("SetProperty", "SetProperty(#{command, property, ...}): sets a property from a command's output"),
    ("Worker", "Worker(name, password, #{max_builds, properties, ...}): a worker that may connect"),
    ("LocalLatentWorker", "LocalLatentWorker(name, password, #{build_wait_timeout, missing_timeout, basedir}): kiln's worker, started by the master when requests wait and stopped when idle"),
    ("CommandLatentWorker", "CommandLatentWorker(name, password, #{start, stop, build_wait_timeout, missing_timeout, env}): a worker the master starts and stops with your commands (docker, a cloud CLI)"),
    ("WithProperties", "WithProperties(\"%(prop)s\"): a string rendered with the build's properties"),
    ("Interpolate", "Interpolate(\"%(prop:name)s\"): a string rendered when the step starts"),
    ("generateBranchObjects", "generateBranchObjects(config, name, secrets): the seed's builders, pollers and schedulers of one branch"),
    ("mergeBuildObjects", "mergeBuildObjects(a, b): a's and b's builders, pollers, schedulers and status together"),
    ("load_json", "load_json(path): a JSON file beside the calling script (or in the master dir)"),
    ("secret", "secret(name): the file secrets/NAME, printed as <secret>"),
    ("env_var", "env_var(name): an environment variable, or ()"),
    ("branches", "branches(): the branches the config builds (its builders' categories)"),
    ("builders", "builders() or builders(branch): builder names"),
    ("schedulers", "schedulers(): scheduler names with their kind"),
    ("show", "show(name): a builder, scheduler, change source or worker in full"),
    ("explain", "explain(#{branch, files, who, comments, repository}): which change sources see such a push, which schedulers take it, and which builders get requests"),
    ("help", "help(name): what a function is and how to call it"),
    ("live", "live(): the running master's connected workers and waiting requests per builder (--master URL)"),
];

pub(super) fn help_text(signatures: &[String], name: &str) -> String {
    let mut out = Vec::new();
    if let Some((_, doc)) = DOCS.iter().find(|(n, _)| *n == name) {
        out.push(doc.to_string());
    }
    let prefix = format!("{name}(");
    let mut sigs: Vec<String> = signatures
        .iter()
        .map(|s| tidy(s))
        .filter(|s| s.starts_with(&prefix) || s.contains(&format!("::{name}(")))
        .collect();
    sigs.sort();
    sigs.dedup();
    out.extend(sigs);
    if out.is_empty() {
        format!("no function named `{name}`; try help(\"builders\"), or Tab to complete a name")
    } else {
        out.join("\n")
    }
}

/// A signature as a script writer reads it: `-> HgPoller`, not the Rust
/// path of a fallible return.
pub(super) fn tidy(sig: &str) -> String {
    let Some((head, ret)) = sig.split_once(" -> ") else {
        return sig.to_string();
    };
    let ret = ret
        .strip_prefix("core::result::Result<")
        .and_then(|r| r.split(',').next())
        .unwrap_or(ret);
    let ret = ret.rsplit("::").next().unwrap_or(ret);
    format!("{head} -> {ret}")
}

pub(super) fn array(v: impl IntoIterator<Item = String>) -> rhai::Array {
    v.into_iter().map(Dynamic::from).collect()
}

pub(super) fn register_helpers(engine: &mut Engine, shared: &Arc<Shared>) {
    let s = shared.clone();
    engine.register_fn(
        "branches",
        move || -> Result<rhai::Array, Box<rhai::EvalAltResult>> {
            let c = s.config()?;
            let mut v: Vec<String> = c
                .builders
                .iter()
                .filter_map(|b| b.category.as_ref().map(|c| c.to_string()))
                .collect();
            if v.is_empty() {
                v = c
                    .change_source
                    .iter()
                    .filter_map(|s| match s {
                        ChangeSource::HgPoller(p) => Some(p.branch.clone()),
                        ChangeSource::GitPoller(p) => p.branches.first().cloned(),
                    })
                    .collect();
            }
            v.sort();
            v.dedup();
            Ok(array(v))
        },
    );
    let s = shared.clone();
    engine.register_fn(
        "builders",
        move || -> Result<rhai::Array, Box<rhai::EvalAltResult>> {
            Ok(array(
                s.config()?.builders.iter().map(|b| b.name.to_string()),
            ))
        },
    );
    let s = shared.clone();
    engine.register_fn(
        "builders",
        move |branch: &str| -> Result<rhai::Array, Box<rhai::EvalAltResult>> {
            Ok(array(
                s.config()?
                    .builders
                    .iter()
                    .filter(|b| b.category.as_deref() == Some(branch))
                    .map(|b| b.name.to_string()),
            ))
        },
    );
    let s = shared.clone();
    engine.register_fn(
        "schedulers",
        move || -> Result<rhai::Array, Box<rhai::EvalAltResult>> {
            Ok(array(
                s.config()?
                    .schedulers
                    .iter()
                    .map(|x| format!("{} ({})", x.name, x.kind.type_name())),
            ))
        },
    );
    let s = shared.clone();
    engine.register_fn("show", move |name: &str| -> Result<String, Box<rhai::EvalAltResult>> {
        let c = s.config()?;
        let value = if let Some(b) = c.builders.iter().find(|b| b.name == name) {
            serde_json::json!({ "builder": b })
        } else if let Some(x) = c.schedulers.iter().find(|x| x.name == name) {
            serde_json::json!({ "scheduler": x })
        } else if let Some(x) = c.change_source.iter().find(|x| x.name() == name) {
            serde_json::json!({ "change source": x })
        } else if let Some(x) = c.workers.iter().find(|x| x.name == name) {
            serde_json::json!({ "worker": x })
        } else {
            return Err(format!(
                "no builder, scheduler, change source or worker named `{name}`; builders() lists the builders"
            )
            .into());
        };
        Ok(crate::config::print::text_of(&value))
    });
    let s = shared.clone();
    engine.register_fn(
        "live",
        move || -> Result<String, Box<rhai::EvalAltResult>> {
            let url = s
                .master()
                .ok_or("live() reads a running master: start the REPL with --master URL")?;
            live_state(&url).map_err(Into::into)
        },
    );
    let s = shared.clone();
    engine.register_fn(
        "explain",
        move |change: rhai::Map| -> Result<String, Box<rhai::EvalAltResult>> {
            explain(&s, change)
        },
    );
    // Last: help knows every function registered before it.
    let mut signatures = engine.gen_fn_signatures(true);
    signatures.push("help(name: &str) -> String".into());
    engine.register_fn("help", move |name: &str| -> String {
        help_text(&signatures, name)
    });
}

pub(super) fn explain(
    shared: &Shared,
    change: rhai::Map,
) -> Result<String, Box<rhai::EvalAltResult>> {
    let c = shared.config()?;
    let runtime = crate::sync::read(&shared.runtime)
        .clone()
        .ok_or("the config did not load")?;
    let get = |k: &str| change.get(k).and_then(|v| v.clone().into_string().ok());
    let known = [
        "branch",
        "files",
        "who",
        "comments",
        "repository",
        "project",
    ];
    if let Some(k) = change.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("explain: unknown key `{k}`; it takes {}", known.join(", ")).into());
    }
    let files: Vec<String> = match change.get("files") {
        None => vec![],
        Some(v) => v
            .clone()
            .try_cast::<rhai::Array>()
            .ok_or("explain: `files` must be an array of strings")?
            .into_iter()
            .filter_map(|f| f.into_string().ok())
            .collect(),
    };
    let branch = get("branch").filter(|b| !b.is_empty());
    let mut lines = Vec::new();
    // Change sources: which would see a push like this.
    let mut repository = get("repository");
    lines.push("change sources:".to_string());
    for s in &c.change_source {
        let (sees, repo) = match s {
            ChangeSource::HgPoller(p) => {
                let b = (!p.branch.is_empty()).then(|| p.branch.clone());
                (b == branch, p.repository())
            }
            ChangeSource::GitPoller(p) => (
                branch
                    .as_ref()
                    .is_some_and(|b| p.branches.is_empty() || p.branches.contains(b)),
                p.repourl.clone(),
            ),
        };
        let sees = sees
            && match &repository {
                None => true,
                Some(r) => *r == repo,
            };
        if sees && repository.is_none() {
            repository = Some(repo.clone());
        }
        lines.push(format!(
            "  {} {}",
            if sees { "yes" } else { "no " },
            s.name()
        ));
    }
    let stored = crate::store::Change {
        changeid: 0,
        sourcestampid: 0,
        source: String::new(),
        change: crate::store::NewChange {
            author: get("who").unwrap_or_else(|| "someone".into()),
            comments: get("comments").unwrap_or_default(),
            branch: branch.clone(),
            repository: repository.unwrap_or_default(),
            project: get("project").unwrap_or_default(),
            files,
            ..Default::default()
        },
    };
    lines.push("schedulers:".to_string());
    let mut building: Vec<String> = Vec::new();
    for sched in &c.schedulers {
        use crate::schedulers::Verdict;
        let verdict = crate::schedulers::explain(sched, &stored, &runtime);
        let text = match &verdict {
            Verdict::Builds {
                after_seconds: None,
            } => "yes: builds".to_string(),
            Verdict::Builds {
                after_seconds: Some(s),
            } => format!("yes: builds once the tree is quiet for {s} s"),
            Verdict::Keeps(why) => format!("keeps it: {why}"),
            Verdict::No(why) => format!("no: {why}"),
        };
        lines.push(format!("  {}: {text}", sched.name));
        if matches!(verdict, Verdict::Builds { .. }) {
            building.extend(sched.builder_names.iter().map(|b| b.to_string()));
        }
    }
    building.sort();
    building.dedup();
    lines.push(format!("builders that get a request: {}", building.len()));
    for b in building {
        lines.push(format!("  {b}"));
    }
    Ok(lines.join("\n"))
}
