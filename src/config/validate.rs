//! Whole-config checks that no single constructor can make: names unique,
//! references resolved, ports and intervals sane, no repository polled twice.

use std::collections::BTreeSet;

// Keyed by names from the master's own script; a config of thousands of
// builders fills these maps once per load.
use ahash::AHashMap as HashMap;

use super::model::*;
use super::worker::Worker;
use crate::diagnostics::Diagnostic;
use crate::suggest::nearest;

fn near(name: &str, known: &[&str]) -> Option<String> {
    nearest(name, known.iter().copied()).map(|n| format!("did you mean `{n}`?"))
}

fn first_at(origin: Option<&Origin>) -> Option<String> {
    origin.map(|o| format!("first defined at {}", crate::diagnostics::Location::from(o)))
}

pub fn validate(c: &MasterConfig) -> Vec<Diagnostic> {
    let mut out = Vec::new();

    let mut workers: HashMap<&str, &Worker> = HashMap::new();
    for w in &c.workers {
        if let Some(prev) = workers.insert(&w.name, w) {
            out.push(
                Diagnostic::error(format!("duplicate worker name `{}`", w.name))
                    .at_origin(w.origin.as_ref())
                    .with_help(first_at(prev.origin.as_ref())),
            );
        }
    }
    let worker_names: Vec<&str> = c.workers.iter().map(|w| w.name.as_str()).collect();

    let mut builders: HashMap<&str, &BuilderConfig> = HashMap::new();
    let mut builddirs: HashMap<&str, &BuilderConfig> = HashMap::new();
    let mut locks: HashMap<&str, &LockAccess> = HashMap::new();
    for b in &c.builders {
        if let Some(prev) = builders.insert(&b.name, b) {
            out.push(
                Diagnostic::error(format!("duplicate builder name `{}`", b.name))
                    .at_origin(b.origin.as_ref())
                    .with_help(first_at(prev.origin.as_ref())),
            );
        } else if let Some(prev) = builddirs.insert(&b.builddir, b) {
            out.push(
                Diagnostic::error(format!(
                    "builders `{}` and `{}` share the builddir `{}`",
                    prev.name, b.name, b.builddir
                ))
                .at_origin(b.origin.as_ref()),
            );
        }
        if b.worker_names.is_empty() {
            out.push(
                Diagnostic::error(format!("builder `{}` has no workers", b.name))
                    .at_origin(b.origin.as_ref())
                    .with_help(Some("give it `workernames`".into()))
                    .with_focus(Some("workernames".into())),
            );
        }
        for w in b.worker_names.iter() {
            if !workers.contains_key(w.as_str()) {
                out.push(
                    Diagnostic::error(format!("builder `{}` names unknown worker `{w}`", b.name))
                        .at_origin(b.origin.as_ref())
                        .with_help(near(w, &worker_names).or(Some(
                            "add it to `workers` with Worker(name, password)".into(),
                        ))),
                );
            }
        }
        for l in &b.locks {
            if let Some(prev) = locks.insert(&l.name, l) {
                if prev.scope != l.scope || prev.max_count != l.max_count {
                    out.push(
                        Diagnostic::error(format!(
                            "lock `{}` is defined twice with different settings",
                            l.name
                        ))
                        .at_origin(b.origin.as_ref()),
                    );
                }
            }
        }
    }
    let builder_names: Vec<&str> = c.builders.iter().map(|b| b.name.as_str()).collect();

    let mut schedulers: HashMap<&str, &SchedulerConfig> = HashMap::new();
    for s in &c.schedulers {
        if let Some(prev) = schedulers.insert(&s.name, s) {
            out.push(
                Diagnostic::error(format!("duplicate scheduler name `{}`", s.name))
                    .at_origin(s.origin.as_ref())
                    .with_help(first_at(prev.origin.as_ref())),
            );
        }
        for b in &s.builder_names {
            // In a fleet, another master may build it (a scheduler master
            // has no builders at all).
            if !builders.contains_key(b.as_str()) && c.multi_master.is_none() {
                out.push(
                    Diagnostic::error(format!(
                        "scheduler `{}` names unknown builder `{b}`",
                        s.name
                    ))
                    .at_origin(s.origin.as_ref())
                    .with_help(near(b, &builder_names)),
                );
            }
        }
        if let SchedulerKind::Periodic {
            periodic_build_timer: 0,
        } = s.kind
        {
            out.push(
                Diagnostic::error(format!(
                    "Periodic scheduler `{}`: periodicBuildTimer must be positive",
                    s.name
                ))
                .at_origin(s.origin.as_ref())
                .with_focus(Some("periodicBuildTimer".into())),
            );
        }
    }
    let scheduler_names: Vec<&str> = c.schedulers.iter().map(|s| s.name.as_str()).collect();
    for s in &c.schedulers {
        if let SchedulerKind::Dependent { upstream } = &s.kind {
            // In a fleet, the upstream may run on another master (a test
            // master follows the scheduler master's builds).
            if !schedulers.contains_key(upstream.as_str()) && c.multi_master.is_none() {
                out.push(
                    Diagnostic::error(format!(
                        "Dependent scheduler `{}` names unknown upstream `{upstream}`",
                        s.name
                    ))
                    .at_origin(s.origin.as_ref())
                    .with_help(near(upstream, &scheduler_names)),
                );
            }
        }
    }
    for b in &c.builders {
        for step in b.factory.steps.iter() {
            if let StepKind::Trigger {
                scheduler_names: names,
                ..
            } = &step.kind
            {
                for n in names {
                    match schedulers.get(n.as_str()) {
                        Some(s) if matches!(s.kind, SchedulerKind::Triggerable) => {}
                        Some(_) => out.push(
                            Diagnostic::error(format!("Trigger step `{}` in builder `{}` names `{n}`, which is not a Triggerable scheduler", step.name, b.name))
                                .at_origin(step.origin.as_ref()),
                        ),
                        None => out.push(
                            Diagnostic::error(format!("Trigger step `{}` in builder `{}` names unknown scheduler `{n}`", step.name, b.name))
                                .at_origin(step.origin.as_ref())
                                .with_help(near(n, &scheduler_names)),
                        ),
                    }
                }
            }
        }
    }

    // By repository, the branches polled there and by whom.
    let mut polled: HashMap<String, Vec<(String, &ChangeSource)>> = HashMap::new();
    for cs in &c.change_source {
        let interval = match cs {
            ChangeSource::HgPoller(p) => p.poll_interval,
            ChangeSource::GitPoller(p) => p.poll_interval,
        };
        if interval == 0 {
            out.push(
                Diagnostic::error(format!("{}: pollInterval must be positive", cs.name()))
                    .at_origin(cs.origin())
                    .with_focus(Some("pollInterval".into())),
            );
        }
        for (repo, branch) in cs.polled() {
            let seen = polled.entry(repo.clone()).or_default();
            let clash = seen
                .iter()
                .find(|(b, _)| *b == branch || b == "*" || branch == "*");
            if let Some((b, prev)) = clash {
                out.push(
                    Diagnostic::error(format!(
                        "{repo} (branch {}) is polled by two change sources; every push would become two changes",
                        if branch == "*" { b.as_str() } else { branch.as_str() }
                    ))
                    .at_origin(cs.origin())
                    .with_help(prev.origin().map(|o| format!("the other is at {}", crate::diagnostics::Location::from(o)))),
                );
                continue;
            }
            seen.push((branch, cs));
        }
    }

    let mut ports = BTreeSet::new();
    for (what, port) in [
        (
            "protocols.msgpack_experimental_v7.port",
            c.protocols.msgpack_port,
        ),
        ("www.port", c.www.as_ref().map(|w| w.port)),
    ] {
        if let Some(p) = port.filter(|p| *p != 0) {
            if !ports.insert(p) {
                out.push(Diagnostic::error(format!(
                    "{what} {p} is already used by another listener"
                )));
            }
        }
    }
    out
}
