//! Schedulers on a real store, with tokio's paused clock where time
//! matters: treeStableTimer grouping, fileIsImportant closures on changes
//! polled from a real repository, failing closures, a restart with a timer
//! pending, Nightly, Periodic, Triggerable and Dependent chains, and forced
//! builds through a running master.

use crate::common;
use crate::common::assert_has;
use crate::common::kiln_ok;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::workers::{Script, TRUE};
use kiln::schedulers::{BuildsetDone, Clock, Schedulers};
use kiln::script::{load_master, Limits, Loaded};
use kiln::store::buildsets::{Buildset, SourceStamp};
use kiln::store::{NewChange, Store};
use tokio_util::sync::CancellationToken;

fn load(dir: &Path, schedulers: &str, limits: Limits) -> Loaded {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut script = Script::steps(TRUE)
        .worker("w1", "pw")
        .without_force()
        .scheduler_expr(schedulers);
    for b in ["linux", "win32", "up", "down"] {
        script = script.builder(b, &["w1"], "");
    }
    std::fs::write(dir.join("master.rhai"), script.render()).expect("master.rhai");
    match load_master(dir, limits) {
        Ok(l) => l,
        Err(e) => panic!("the test master does not load:\n{e:?}"),
    }
}

struct Running {
    store: Store,
    schedulers: Schedulers,
    cancel: CancellationToken,
}

impl Running {
    fn start(loaded: &Loaded, store: &Store) -> Running {
        Running::start_with(loaded, store, Clock::new())
    }

    fn start_with(loaded: &Loaded, store: &Store, clock: Clock) -> Running {
        let cancel = CancellationToken::new();
        let schedulers = Schedulers::start(
            &loaded.config,
            loaded.runtime(),
            store.clone(),
            clock,
            &cancel,
        );
        Running {
            store: store.clone(),
            schedulers,
            cancel,
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.schedulers.stopped().await;
    }

    async fn change(&self, branch: &str, files: &[&str]) -> i64 {
        let stored = self
            .store
            .add_changes(
                "test",
                vec![NewChange {
                    author: "dev@m.org".into(),
                    comments: format!("touches {files:?}"),
                    branch: Some(branch.into()),
                    revision: Some(format!("{:040x}", rand_id())),
                    repository: "https://hg.example.org/".to_string() + branch,
                    files: files.iter().map(|f| f.to_string()).collect(),
                    when_timestamp: 1_700_000_000,
                    properties: [(
                        "pushid".to_string(),
                        (serde_json::json!(42), "Change".to_string()),
                    )]
                    .into(),
                    ..Default::default()
                }],
                vec![],
            )
            .await
            .expect("store change");
        stored[0].changeid
    }

    async fn buildsets(&self) -> Vec<Buildset> {
        self.store.buildsets(1000).await.expect("buildsets")
    }

    /// Waits (in real time, without moving the paused clock) until the
    /// scheduler has handled change `id`.
    async fn handled(&self, scheduler: &str, id: i64) {
        let started = std::time::Instant::now();
        while self.schedulers.handled_up_to(scheduler).unwrap_or(0) < id {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "scheduler {scheduler} did not handle change {id}"
            );
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn rand_id() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::Relaxed) as u128
}

async fn open_store(dir: &Path) -> Store {
    Store::open(&dir.join("state.sqlite")).expect("store")
}

/// Lets the scheduler tasks run (DB work happens in real time) without
/// moving the paused clock.
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[tokio::test(start_paused = true)]
async fn tree_stable_timer_groups_changes_inside_the_window() {
    let tmp = tempfile::tempdir().expect("tmp");
    let loaded = load(
        tmp.path(),
        r#"Scheduler(#{ name: "m-c", branch: "mozilla-central", treeStableTimer: 60,
                        builderNames: ["linux", "win32"], priority: 3, properties: #{ product: "firefox" } })"#,
        Limits::default(),
    );
    let store = open_store(tmp.path()).await;
    let m = Running::start(&loaded, &store);
    settle().await;

    let a = m.change("mozilla-central", &["a.c"]).await;
    m.handled("m-c", a).await;
    tokio::time::advance(Duration::from_secs(30)).await;
    let b = m.change("mozilla-central", &["b.c"]).await;
    // Another branch is not this scheduler's.
    let other = m.change("try", &["c.c"]).await;
    m.handled("m-c", other).await;
    // 59 s after b: the tree has not been quiet for 60 s yet.
    tokio::time::advance(Duration::from_secs(59)).await;
    settle().await;
    assert!(m.buildsets().await.is_empty());
    tokio::time::advance(Duration::from_secs(2)).await;
    settle().await;
    let bs = m.buildsets().await;
    assert_eq!(bs.len(), 1, "{bs:#?}");
    assert_eq!(bs[0].changeids, [a, b]);
    assert_eq!(bs[0].scheduler.as_deref(), Some("m-c"));
    assert_eq!(bs[0].properties["product"].0, "firefox");
    assert_eq!(bs[0].properties["scheduler"].0, "m-c");
    assert_eq!(bs[0].properties["pushid"].0, 42);
    assert_eq!(bs[0].properties["pushid"].1, "Change");
    let reqs = store
        .requests_of_buildset(bs[0].bsid)
        .await
        .expect("requests");
    let names: Vec<&str> = reqs.iter().map(|r| r.buildername.as_str()).collect();
    assert_eq!(names, ["linux", "win32"]);
    assert!(reqs
        .iter()
        .all(|r| r.priority == 3 && !r.claimed && !r.complete));

    // A change after the window makes another buildset.
    let c = m.change("mozilla-central", &["c.c"]).await;
    m.handled("m-c", c).await;
    tokio::time::advance(Duration::from_secs(61)).await;
    settle().await;
    let bs = m.buildsets().await;
    assert_eq!(bs.len(), 2);
    assert_eq!(bs[1].changeids, [c]);
    m.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_pending_timer_survives_a_restart_and_fires_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let loaded = load(
        tmp.path(),
        r#"Scheduler(#{ name: "m-c", branch: "mozilla-central", treeStableTimer: 300, builderNames: ["linux"] })"#,
        Limits::default(),
    );
    let store = open_store(tmp.path()).await;
    // One wall clock for both lives of the master, as in a real restart.
    let clock = Clock::new();
    let m = Running::start_with(&loaded, &store, clock);
    settle().await;
    let a = m.change("mozilla-central", &["a.c"]).await;
    m.handled("m-c", a).await;
    tokio::time::advance(Duration::from_secs(100)).await;
    m.stop().await;

    // Down for a minute; then up again with the deadline still ahead.
    tokio::time::advance(Duration::from_secs(60)).await;
    let m = Running::start_with(&loaded, &store, clock);
    settle().await;
    assert!(m.buildsets().await.is_empty(), "not before the deadline");
    tokio::time::advance(Duration::from_secs(150)).await;
    settle().await;
    let bs = m.buildsets().await;
    assert_eq!(bs.len(), 1);
    assert_eq!(bs[0].changeids, [a]);
    tokio::time::advance(Duration::from_secs(1000)).await;
    settle().await;
    assert_eq!(m.buildsets().await.len(), 1, "once");
    m.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_reload_keeps_a_schedulers_classified_changes_and_timer_when_it_keeps_its_name() {
    let tmp = tempfile::tempdir().expect("tmp");
    let before = load(
        &tmp.path().join("before"),
        r#"Scheduler(#{ name: "m-c", branch: "mozilla-central", treeStableTimer: 300, builderNames: ["linux"] }),
           Scheduler(#{ name: "try", branch: "try", treeStableTimer: 300, builderNames: ["up"] })"#,
        Limits::default(),
    );
    // m-c builds one more builder, try is as it was, "new" is new.
    let after = load(
        &tmp.path().join("after"),
        r#"Scheduler(#{ name: "m-c", branch: "mozilla-central", treeStableTimer: 300, builderNames: ["linux", "win32"] }),
           Scheduler(#{ name: "try", branch: "try", treeStableTimer: 300, builderNames: ["up"] }),
           Scheduler(#{ name: "new", branch: "mozilla-central", treeStableTimer: (), builderNames: ["down"] })"#,
        Limits::default(),
    );
    let store = open_store(tmp.path()).await;
    let m = Running::start(&before, &store);
    settle().await;
    let a = m.change("mozilla-central", &["a.c"]).await;
    let t = m.change("try", &["t.c"]).await;
    m.handled("m-c", t).await;
    m.handled("try", t).await;
    tokio::time::advance(Duration::from_secs(100)).await;

    m.schedulers.reload(&after.config, after.runtime()).await;
    settle().await;
    assert!(m.buildsets().await.is_empty(), "no timer fired early");
    let b = m.change("mozilla-central", &["b.c"]).await;
    m.handled("new", b).await;
    m.handled("m-c", b).await;
    // m-c's window restarted with b; try's deadline is 300 s after t.
    tokio::time::advance(Duration::from_secs(301)).await;
    settle().await;
    let bs = m.buildsets().await;
    let mut made: Vec<(String, Vec<i64>, Vec<String>)> = Vec::new();
    for set in &bs {
        let reqs = store
            .requests_of_buildset(set.bsid)
            .await
            .expect("requests");
        made.push((
            set.scheduler.clone().unwrap_or_default(),
            set.changeids.clone(),
            reqs.iter().map(|r| r.buildername.clone()).collect(),
        ));
    }
    made.sort();
    assert_eq!(
        made,
        [
            // The classified change a was kept across the reload, and the
            // buildset has the new config's builders.
            (
                "m-c".to_string(),
                vec![a, b],
                vec!["linux".to_string(), "win32".to_string()]
            ),
            // A new scheduler starts from now: b, not a.
            ("new".to_string(), vec![b], vec!["down".to_string()]),
            ("try".to_string(), vec![t], vec!["up".to_string()]),
        ]
    );
    tokio::time::advance(Duration::from_secs(1000)).await;
    settle().await;
    assert_eq!(m.buildsets().await.len(), 3, "each timer fired once");
    m.stop().await;
}

#[tokio::test]
async fn file_is_important_classifies_changes_polled_from_a_real_repository() {
    // The poller runs hg from this process.
    std::env::set_var("PATH", common::tools_path());
    let tmp = tempfile::tempdir().expect("tmp");
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(&repo).expect("mkdir");
    common::run(&repo, "hg", &["init", "-q"]);
    common::hg_commit(&repo, "A <a@x>", &["base"], "base");
    // Immediate buildsets; docs-only changes are not important and, with
    // onlyImportant, not kept either.
    let loaded = load(
        &tmp.path().join("master"),
        r#"Scheduler(#{ name: "code", branch: (), treeStableTimer: (), builderNames: ["linux"],
                        onlyImportant: true,
                        fileIsImportant: |c| c.files.some(|f| !f.starts_with("docs/")) })"#,
        Limits::default(),
    );
    let store = open_store(tmp.path()).await;
    let m = Running::start(&loaded, &store);
    settle().await;
    let ctx =
        kiln::changes::Context::new(store.clone(), &tmp.path().join("master")).expect("context");
    let source = kiln::config::ChangeSource::HgPoller(kiln::config::HgPoller {
        hg_url: repo.display().to_string(),
        branch: String::new(),
        pushlog_url_override: None,
        tips_only: false,
        max_changes: 100,
        repo_branch: Some("default".into()),
        poll_interval: 60,
        store_rev: None,
        category: None,
        project: None,
        origin: None,
    });
    let mut poller = kiln::changes::Poller::new(&source);
    poller.poll(&ctx).await.expect("first poll");
    let code = common::hg_commit(
        &repo,
        "B <b@x>",
        &["dom/a.cpp", "docs/a.md"],
        "code and docs",
    );
    common::hg_commit(&repo, "C <c@x>", &["docs/b.md"], "docs only");
    let code2 = common::hg_commit(&repo, "D <d@x>", &["js/b.cpp"], "code");
    assert_eq!(poller.poll(&ctx).await.expect("poll"), 3);
    let last = store.max_changeid().await.expect("max");
    m.handled("code", last).await;
    let bs = m.buildsets().await;
    let revs: Vec<String> = {
        let mut v = vec![];
        for b in &bs {
            let c = store
                .get_change(b.changeids[0])
                .await
                .expect("get")
                .expect("change");
            v.push(c.change.revision.expect("revision"));
        }
        v
    };
    assert_eq!(revs, [code, code2]);
    m.stop().await;
}

/// A subscriber that keeps what is logged, for this thread.
fn capture_logs() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
    #[derive(Clone)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = Sink(buf.clone());
    let sub = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    (buf, tracing::subscriber::set_default(sub))
}

#[tokio::test(start_paused = true)]
async fn a_failing_closure_is_logged_and_the_change_counts_as_important() {
    let (logs, _guard) = capture_logs();
    let tmp = tempfile::tempdir().expect("tmp");
    let limits = Limits {
        max_operations: 200_000,
        ..Limits::default()
    };
    let loaded = load(
        tmp.path(),
        r#"
        Scheduler(#{ name: "throws", branch: "a", treeStableTimer: (), builderNames: ["linux"],
                     fileIsImportant: |c| c.files[0].nosuch() }),
        Scheduler(#{ name: "loops", branch: "a", treeStableTimer: (), builderNames: ["win32"],
                     fileIsImportant: |c| { loop {} } }),
        Scheduler(#{ name: "string", branch: "a", treeStableTimer: (), builderNames: ["up"],
                     fileIsImportant: |c| "yes" }),
        Scheduler(#{ name: "sane", branch: "a", treeStableTimer: (), builderNames: ["down"],
                     fileIsImportant: |c| c.files.contains("build.c") })
        "#,
        limits,
    );
    let store = open_store(tmp.path()).await;
    let m = Running::start(&loaded, &store);
    settle().await;
    let one = m.change("a", &["x.c"]).await;
    for (name, _) in [("throws", 0), ("loops", 0), ("string", 0), ("sane", 0)] {
        m.handled(name, one).await;
    }
    let bs = m.buildsets().await;
    let mut by: Vec<&str> = bs.iter().filter_map(|b| b.scheduler.as_deref()).collect();
    by.sort();
    // Each failing closure counted the change as important; the sane one did not.
    assert_eq!(by, ["loops", "string", "throws"]);
    let text = String::from_utf8_lossy(&logs.lock().unwrap_or_else(|e| e.into_inner())).to_string();
    assert_has(&text, "closure at");
    assert!(
        text.contains("master.rhai:"),
        "the script position is logged: {text}"
    );
    assert_has(&text, "nosuch");
    assert!(
        text.contains("operations") || text.contains("stopped"),
        "{text}"
    );
    assert!(
        text.contains("returned a string, not a bool") || text.contains("not a bool"),
        "{text}"
    );

    // They all still run.
    let two = m.change("a", &["build.c"]).await;
    for name in ["throws", "loops", "string", "sane"] {
        m.handled(name, two).await;
    }
    assert_eq!(m.buildsets().await.len(), 7);
    m.stop().await;
}

#[tokio::test]
async fn a_closure_written_in_a_module_runs_with_that_modules_functions() {
    let (logs, _guard) = capture_logs();
    let tmp = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(tmp.path()).expect("mkdir");
    // The seed's kind of layout: the rules live in a module the master
    // imports (config.py's fileIsImportant), and call a helper of their own.
    std::fs::write(
        tmp.path().join("rules.rhai"),
        r#"
fn is_docs(f) { f.starts_with("docs/") }
export const important = |c| c.files.some(|f| !is_docs(f));
"#,
    )
    .expect("rules.rhai");
    let loaded = load(
        tmp.path(),
        r#"{
        import "rules" as rules;
        Scheduler(#{ name: "code", branch: "a", treeStableTimer: (), builderNames: ["linux"],
                     onlyImportant: true, fileIsImportant: rules::important })
        }"#,
        Limits::default(),
    );
    let store = open_store(tmp.path()).await;
    let m = Running::start(&loaded, &store);
    settle().await;
    let docs = m.change("a", &["docs/a.md"]).await;
    let code = m.change("a", &["dom/a.cpp", "docs/b.md"]).await;
    m.handled("code", code).await;
    let bs = m.buildsets().await;
    let changes: Vec<Vec<i64>> = bs.iter().map(|b| b.changeids.clone()).collect();
    assert_eq!(
        changes,
        [vec![code]],
        "docs-only change {docs} is not important"
    );
    let text = String::from_utf8_lossy(&logs.lock().unwrap_or_else(|e| e.into_inner())).to_string();
    assert!(!text.contains("failed"), "{text}");
    m.stop().await;
}

#[tokio::test(start_paused = true)]
async fn nightly_builds_on_its_minutes_and_only_if_changed_waits_for_a_change() {
    let (logs, _guard) = capture_logs();
    let tmp = tempfile::tempdir().expect("tmp");
    let every: Vec<String> = (0..60).map(|m| m.to_string()).collect();
    let minutes = every.join(", ");
    let loaded = load(
        tmp.path(),
        &format!(
            r#"Nightly(#{{ name: "always", branch: "m-c", minute: [{minutes}], builderNames: ["linux"] }}),
               Nightly(#{{ name: "if-changed", branch: "m-c", minute: [{minutes}], onlyIfChanged: true,
                          builderNames: ["win32"] }})"#
        ),
        Limits::default(),
    );
    let store = open_store(tmp.path()).await;
    let m = Running::start(&loaded, &store);
    settle().await;
    // Two minute boundaries: "always" builds twice, "if-changed" never.
    for _ in 0..2 {
        tokio::time::advance(Duration::from_secs(60)).await;
        settle().await;
    }
    let count = |bs: &[Buildset], s: &str| {
        bs.iter()
            .filter(|b| b.scheduler.as_deref() == Some(s))
            .count()
    };
    let bs = m.buildsets().await;
    assert!(
        count(&bs, "always") == 2,
        "{bs:#?}\n{}",
        String::from_utf8_lossy(&logs.lock().unwrap_or_else(|e| e.into_inner()))
    );
    assert_eq!(count(&bs, "if-changed"), 0);

    let c = m.change("m-c", &["a.c"]).await;
    m.handled("if-changed", c).await;
    tokio::time::advance(Duration::from_secs(61)).await;
    settle().await;
    let bs = m.buildsets().await;
    let changed: Vec<&Buildset> = bs
        .iter()
        .filter(|b| b.scheduler.as_deref() == Some("if-changed"))
        .collect();
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].changeids, [c]);
    m.stop().await;
}

#[tokio::test(start_paused = true)]
async fn periodic_builds_at_start_and_every_period() {
    let tmp = tempfile::tempdir().expect("tmp");
    let loaded = load(
        tmp.path(),
        r#"Periodic(#{ name: "hourly", periodicBuildTimer: 3600, builderNames: ["linux"] })"#,
        Limits::default(),
    );
    let store = open_store(tmp.path()).await;
    let m = Running::start(&loaded, &store);
    settle().await;
    assert_eq!(m.buildsets().await.len(), 1);
    tokio::time::advance(Duration::from_secs(3599)).await;
    settle().await;
    assert_eq!(m.buildsets().await.len(), 1);
    tokio::time::advance(Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(m.buildsets().await.len(), 2);
    m.stop().await;
}

#[tokio::test]
async fn triggerable_and_dependent_chain() {
    let tmp = tempfile::tempdir().expect("tmp");
    let loaded = load(
        tmp.path(),
        r#"Triggerable(#{ name: "up", builderNames: ["up", "linux"] }),
           Dependent(#{ name: "down", upstream: "up", builderNames: ["down"] })"#,
        Limits::default(),
    );
    let store = open_store(tmp.path()).await;
    let m = Running::start(&loaded, &store);
    let ss = SourceStamp {
        branch: Some("m-c".into()),
        revision: Some("abc".into()),
        repository: "r".into(),
        project: "p".into(),
        codebase: String::new(),
    };
    let props = [(
        "from_trigger".to_string(),
        (serde_json::json!(true), "Trigger".to_string()),
    )]
    .into();
    let up = m
        .schedulers
        .trigger("up", vec![ss.clone()], props, None)
        .await
        .expect("trigger");
    assert_eq!(up.brids.len(), 2);
    let bs = store
        .get_buildset(up.bsid)
        .await
        .expect("get")
        .expect("buildset");
    assert_eq!(bs.properties["from_trigger"].0, true);
    assert!(m
        .schedulers
        .trigger("down", vec![], Default::default(), None)
        .await
        .is_err());

    // The upstream buildset succeeds: the Dependent builds the same source.
    let brids: Vec<i64> = up.brids.iter().map(|r| r.brid).collect();
    let done = store.complete_requests(brids, 0).await.expect("complete");
    assert_eq!(done, [(up.bsid, 0)]);
    m.schedulers.buildset_done(BuildsetDone {
        bsid: up.bsid,
        results: 0,
    });
    let started = std::time::Instant::now();
    let down = loop {
        let all = m.buildsets().await;
        if let Some(d) = all.iter().find(|b| b.scheduler.as_deref() == Some("down")) {
            break d.clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no downstream buildset"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(down.sourcestamps, bs.sourcestamps);

    // A failed upstream buildset starts nothing.
    let up2 = m
        .schedulers
        .trigger("up", vec![ss], Default::default(), None)
        .await
        .expect("trigger");
    let brids: Vec<i64> = up2.brids.iter().map(|r| r.brid).collect();
    let done = store.complete_requests(brids, 2).await.expect("complete");
    assert_eq!(done, [(up2.bsid, 2)]);
    m.schedulers.buildset_done(BuildsetDone {
        bsid: up2.bsid,
        results: 2,
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let downs = m
        .buildsets()
        .await
        .into_iter()
        .filter(|b| b.scheduler.as_deref() == Some("down"))
        .count();
    assert_eq!(downs, 1);
    m.stop().await;
}

/// Waits until `scheduler` (a `kind`) has stored state `key`.
async fn stored_state(store: &Store, scheduler: &str, kind: &str, key: &str) -> serde_json::Value {
    let obj = store.object_id(scheduler, kind).await.expect("object");
    let started = std::time::Instant::now();
    loop {
        if let Some(v) = store.get_state(obj, key).await.expect("state") {
            return v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{scheduler} never stored `{key}`"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `n` buildsets of scheduler `name` exist.
async fn wait_buildsets_of(m: &Running, name: &str, n: usize) -> Vec<Buildset> {
    let started = std::time::Instant::now();
    loop {
        let of: Vec<Buildset> = m
            .buildsets()
            .await
            .into_iter()
            .filter(|b| b.scheduler.as_deref() == Some(name))
            .collect();
        if of.len() >= n {
            return of;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{} of {n} buildsets from {name}",
            of.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// A Dependent follows its upstream's buildsets in the store: one completed
// while it was not running (its master restarted, or another master of a
// fleet built it and nobody told this process) starts it when it starts
// again; completions out of order each start it once; a restart does not
// start it twice.
#[tokio::test]
async fn dependent_acts_on_upstream_buildsets_completed_while_it_was_stopped() {
    let tmp = tempfile::tempdir().expect("tmp");
    let loaded = load(
        tmp.path(),
        r#"Triggerable(#{ name: "up", builderNames: ["up"] }),
           Dependent(#{ name: "down", upstream: "up", builderNames: ["down"] })"#,
        Limits::default(),
    );
    let store = open_store(tmp.path()).await;
    let m = Running::start(&loaded, &store);
    stored_state(&store, "down", "Dependent", "upstream").await;
    let ss = |rev: &str| SourceStamp {
        branch: Some("m-c".into()),
        revision: Some(rev.into()),
        repository: "r".into(),
        project: "p".into(),
        codebase: String::new(),
    };
    let first = m
        .schedulers
        .trigger("up", vec![ss("aaa")], Default::default(), None)
        .await
        .expect("trigger");
    let second = m
        .schedulers
        .trigger("up", vec![ss("bbb")], Default::default(), None)
        .await
        .expect("trigger");
    m.stop().await;

    // The second completes while no Dependent runs, and nobody says so.
    let brids = second.brids.iter().map(|r| r.brid).collect();
    store.complete_requests(brids, 0).await.expect("complete");
    let m = Running::start(&loaded, &store);
    let downs = wait_buildsets_of(&m, "down", 1).await;
    let revision = |bsid: i64| {
        let store = store.clone();
        async move {
            let ss = store.buildset_sourcestamps(bsid).await.expect("ss");
            ss[0].revision.clone().unwrap_or_default()
        }
    };
    assert_eq!(revision(downs[0].bsid).await, "bbb");

    // The first, older one completes after it: it starts the Dependent too.
    let brids = first.brids.iter().map(|r| r.brid).collect();
    store.complete_requests(brids, 1).await.expect("complete");
    m.schedulers.buildset_done(BuildsetDone {
        bsid: first.bsid,
        results: 1,
    });
    let downs = wait_buildsets_of(&m, "down", 2).await;
    let mut revisions = Vec::new();
    for d in &downs {
        revisions.push(revision(d.bsid).await);
    }
    revisions.sort();
    assert_eq!(revisions, ["aaa", "bbb"]);
    // Every upstream buildset is handled: the position moved past both.
    let followed = stored_state(&store, "down", "Dependent", "upstream").await;
    assert_eq!(
        followed["after"],
        serde_json::json!(second.bsid),
        "{followed}"
    );
    m.stop().await;

    // Started again, it makes nothing twice.
    let m = Running::start(&loaded, &store);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(wait_buildsets_of(&m, "down", 2).await.len(), 2);
    m.stop().await;
}

fn force_master(root: &Path, users: &str) -> std::path::PathBuf {
    let mut script = Script::steps(TRUE)
        .worker("w1", "pw")
        .builder("linux", &["w1"], "")
        .builder("win32", &["w1"], "")
        .secret("rel", "s3cret");
    if !users.is_empty() {
        script = script.www(users);
    }
    script.write(root)
}

fn buildset_rows(dir: &Path) -> Vec<(i64, String, String)> {
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    let rows = c
        .prepare(
            "SELECT b.id, b.reason, coalesce(s.branch, '') || '@' || coalesce(s.revision, '')
         FROM buildsets b JOIN buildset_sourcestamps bs ON bs.buildsetid = b.id
         JOIN sourcestamps s ON s.id = bs.sourcestampid ORDER BY b.id",
        )
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    rows
}

#[test]
fn kiln_force_requests_a_build_with_properties() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = force_master(tmp.path(), "");
    let master = common::Master::start(&dir);
    let url = master.http_url();
    let out = kiln_ok(
        tmp.path(),
        &[
            "force",
            "--master",
            &url,
            "win32",
            "--branch",
            "mozilla-central",
            "--revision",
            "abc123",
            "--reason",
            "respin",
            "--property",
            "nightly=true",
            "--property",
            "locale=de",
        ],
    );
    assert!(out.stdout.starts_with("buildset 1:"), "{}", out.stdout);
    let rows = buildset_rows(&dir);
    assert_eq!(rows.len(), 1);
    assert!(rows[0].1.contains("respin"), "{rows:?}");
    assert_eq!(rows[0].2, "mozilla-central@abc123");
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    let builders: Vec<String> = c
        .prepare("SELECT b.name FROM buildrequests r JOIN builders b ON b.id = r.builderid")
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(builders, ["win32"]);
    let props: Vec<(String, String)> = c
        .prepare(
            "SELECT property_name, property_value FROM buildset_properties ORDER BY property_name",
        )
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert!(
        props.contains(&("nightly".into(), r#"[true,"Force Build Form"]"#.into())),
        "{props:?}"
    );
    assert!(
        props.contains(&("locale".into(), r#"["de","Force Build Form"]"#.into())),
        "{props:?}"
    );

    let out = common::kiln(
        tmp.path(),
        &["force", "--master", &url, "mac"],
        Duration::from_secs(60),
    );
    assert_eq!(out.code, Some(1));
    assert_has(&out.stderr, "no ForceScheduler of the master builds `mac`");
}

#[test]
fn forcing_needs_a_user_when_users_are_configured() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = force_master(
        tmp.path(),
        r#"users: #{ releng: #{ password: secret("rel") } }"#,
    );
    let master = common::Master::start(&dir);
    let url = master.http_url();
    let out = common::kiln(
        tmp.path(),
        &["force", "--master", &url, "linux"],
        Duration::from_secs(60),
    );
    out.fails_with("401");
    let out = common::kiln(
        tmp.path(),
        &["force", "--master", &url, "linux", "--auth", "releng:wrong"],
        Duration::from_secs(60),
    );
    assert_eq!(out.code, Some(1));
    assert!(buildset_rows(&dir).is_empty());
    kiln_ok(
        tmp.path(),
        &[
            "force",
            "--master",
            &url,
            "linux",
            "--auth",
            "releng:s3cret",
        ],
    );
    let rows = buildset_rows(&dir);
    assert_eq!(rows.len(), 1);
    assert!(rows[0].1.contains("forced by 'releng'"), "{rows:?}");
}

#[tokio::test(start_paused = true)]
async fn any_branch_scheduler_keeps_one_timer_per_branch() {
    let tmp = tempfile::tempdir().expect("tmp");
    let loaded = load(
        tmp.path(),
        r#"AnyBranchScheduler(#{ name: "any", branches: ["a", "b"], treeStableTimer: 10, builderNames: ["linux"] })"#,
        Limits::default(),
    );
    let store = open_store(tmp.path()).await;
    let m = Running::start(&loaded, &store);
    settle().await;
    let a1 = m.change("a", &["x"]).await;
    m.handled("any", a1).await;
    tokio::time::advance(Duration::from_secs(6)).await;
    let b1 = m.change("b", &["y"]).await;
    let ignored = m.change("c", &["z"]).await;
    m.handled("any", ignored).await;
    // Branch a has been quiet for 11 s, b for 5 s: one buildset, for a.
    tokio::time::advance(Duration::from_secs(5)).await;
    settle().await;
    let bs = m.buildsets().await;
    assert_eq!(bs.len(), 1, "{bs:#?}");
    assert_eq!(bs[0].changeids, [a1]);
    tokio::time::advance(Duration::from_secs(6)).await;
    settle().await;
    let bs = m.buildsets().await;
    assert_eq!(bs.len(), 2);
    assert_eq!(bs[1].changeids, [b1]);
    m.stop().await;
}
