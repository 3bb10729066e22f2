//! Dispatch: collapsing, max_builds, nextWorker, locks, prioritizeBuilders,
//! canStartBuild, collapseRequests.

use crate::common;
use crate::common::assert_has;
use crate::common::kiln_ok;

use std::path::Path;
use std::time::Duration;

use common::workers::*;
use common::{wait_until, Master};

/// A step that makes the first build wait for `release`; later ones
/// finish at once.
const FIRST_WAITS: &str = r#"f.addStep(ShellCommand(#{ name: "s", command: "if [ -e ../../../first ]; then echo quick; else touch ../../../first; while [ ! -e ../../../release ]; do sleep 0.1; done; fi" }));"#;

fn collapse_run(collapse: &str) -> (Vec<BuildRow>, Vec<RequestRow>) {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = Script::steps(FIRST_WAITS)
        .worker("w1", "pw-one")
        .builder("b", &["w1"], collapse)
        .write(tmp.path());
    let master = Master::start(&dir);
    let _w1 = StockWorker::connect(&master, tmp.path(), "w1", "pw-one");
    force(&master, "b");
    master.wait_for_log("build 1 started", 1, Duration::from_secs(60));
    force(&master, "b");
    force(&master, "b");
    std::fs::write(tmp.path().join("release"), "").expect("release");
    wait_until(
        Duration::from_secs(60),
        "every request and build to end",
        || all_done(&dir).then_some(()),
    );
    (builds(&dir), requests(&dir))
}

#[test]
fn waiting_requests_collapse_into_one_build_unless_turned_off() {
    let (b, reqs) = collapse_run("");
    assert_eq!(b.len(), 2, "requests 2 and 3 were built once: {b:?}");
    assert_eq!(reqs, [done(Results::Success); 3]);
    let (b, reqs) = collapse_run("collapseRequests: false");
    assert_eq!(b.len(), 3, "{b:?}");
    assert_eq!(reqs, [done(Results::Success); 3]);
}

#[test]
fn max_builds_keeps_a_worker_to_one_build_at_a_time() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Two builds at once in the same worker would find `busy` taken.
    let dir = Script::steps(
        r#"f.addStep(ShellCommand(#{ name: "s", command: "mkdir ../../../busy && sleep 1 && rmdir ../../../busy" }));"#,
    )
    .worker_expr(r#"Worker("w1", "pw-one", #{ max_builds: 1 })"#)
    .builder("b", &["w1"], "")
    .builder("c", &["w1"], "")
    .write(tmp.path());
    let master = Master::start(&dir);
    let _w1 = StockWorker::connect(&master, tmp.path(), "w1", "pw-one");
    // b builds for a second; c is requested while it runs, and must wait.
    force_with(&master, "b", &["--scheduler", "force"]);
    let b = force_and_wait(&master, "c", 2);
    assert!(
        b.iter().all(|x| x.result == Some(Results::Success)),
        "the builds overlapped: {b:?}"
    );
}

/// nextWorker is offered the idle workers only, and its choice holds, a
/// choice of none included: while w2 builds, the second request is offered
/// w1 alone, the function declines, and the request waits for w2 rather
/// than going to the idle w1.
#[test]
fn next_worker_chooses_among_the_idle_workers() {
    let tmp = tempfile::tempdir().expect("tmp");
    let release = tmp.path().join("release");
    let dir = Script::steps(&format!(
        r#"f.addStep(ShellCommand(#{{ name: "s", command: "while [ ! -e {} ]; do sleep 0.05; done" }}));"#,
        release.display()
    ))
    .worker("w1", "pw-one")
    .worker("w2", "pw-two")
    .builder(
        "b",
        &["w1", "w2"],
        r#"collapseRequests: false,
        nextWorker: |builder, workers, request| {
            let offered = "";
            for w in workers { offered += " " + w; }
            print("nextWorker offered" + offered + " for request " + request.buildrequestid);
            if workers.contains("w2") { "w2" } else { () }
        }"#,
    )
    .write(tmp.path());
    let master = Master::start(&dir);
    let port = worker_port(&master);
    let _w1 = KilnWorker::start(tmp.path(), "w1", "pw-one", port);
    let _w2 = KilnWorker::start(tmp.path(), "w2", "pw-two", port);
    wait_connected(&master, &["w1", "w2"]);
    force(&master, "b");
    master.wait_for_log("build 1 started", 1, Duration::from_secs(60));
    force(&master, "b");
    // w2 is busy: the second request is offered the idle w1 alone, and
    // the function declines it.
    master.wait_for_log(
        "nextWorker offered w1 for request 2",
        1,
        Duration::from_secs(60),
    );
    let b = builds(&dir);
    assert_eq!(b.len(), 1, "the declined request did not go to w1: {b:?}");
    assert_eq!(b[0].worker, "w2");
    assert!(!requests(&dir)[1].complete);
    std::fs::write(&release, "").expect("release");
    wait_until(Duration::from_secs(60), "both builds", || {
        (builds(&dir).len() == 2 && all_done(&dir)).then_some(())
    });
    let on: Vec<String> = builds(&dir).into_iter().map(|b| b.worker).collect();
    assert_eq!(on, ["w2", "w2"], "each request went where nextWorker chose");
    assert!(
        master
            .log()
            .contains("nextWorker offered w1 w2 for request 1"),
        "the first request was offered both idle workers:\n{}",
        master.log()
    );
}

fn lock_run(locks: &str) -> Vec<BuildRow> {
    let tmp = tempfile::tempdir().expect("tmp");
    // Both workers' builds use the same `busy` directory beside their dirs.
    let locks = format!("locks: [{locks}]");
    let dir = Script::steps(
        r#"f.addStep(ShellCommand(#{ name: "s", command: "mkdir ../../../busy && sleep 3 && rmdir ../../../busy" }));
let one = MasterLock("one");"#,
    )
    .worker("w1", "pw-one")
    .worker("w2", "pw-two")
    .builder("b", &["w1"], &locks)
    .builder("c", &["w2"], &locks)
    .write(tmp.path());
    let master = Master::start(&dir);
    let port = worker_port(&master);
    let _w1 = StockWorker::start(tmp.path(), "w1", "pw-one", port);
    let _w2 = StockWorker::start(tmp.path(), "w2", "pw-two", port);
    wait_connected(&master, &["w1", "w2"]);
    kiln_ok(&master.dir, &["force", "--master", &master.http_url(), "b"]);
    force_and_wait(&master, "c", 2);
    builds(&dir)
}

#[test]
fn an_exclusive_master_lock_keeps_builds_on_different_workers_apart() {
    let b = lock_run(r#"one.access("exclusive")"#);
    assert!(
        b.iter().all(|x| x.result == Some(Results::Success)),
        "the builds overlapped: {b:?}"
    );
    // Without the lock they do overlap, which is what the lock is for.
    let b = lock_run("");
    assert!(
        b.iter().any(|x| x.result == Some(Results::Failure)),
        "expected an overlap: {b:?}"
    );
}

fn builders_in_build_order(dir: &Path) -> Vec<String> {
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    let rows: Vec<String> = c
        .prepare(
            "SELECT bu.name FROM builds b JOIN builders bu ON bu.id = b.builderid ORDER BY b.id",
        )
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    rows
}

/// Requests for a, b and c (in that order) wait for the one worker, which
/// takes one build at a time; the order they build in is the master's.
fn prioritize_run(prioritize: &str) -> Vec<String> {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut script = Script::steps(r#"f.addStep(ShellCommand(#{ name: "s", command: "true" }));"#)
        .worker_expr(r#"Worker("w1", "pw-one", #{ max_builds: 1 })"#)
        .builder("a", &["w1"], "")
        .builder("b", &["w1"], "")
        .builder("c", &["w1"], "");
    if !prioritize.is_empty() {
        script = script.key(prioritize);
    }
    let dir = script.write(tmp.path());
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    for name in ["a", "b", "c"] {
        force(&master, name);
        // Oldest first is by submission time, in whole seconds.
        std::thread::sleep(Duration::from_millis(1100));
    }
    let _w1 = KilnWorker::start(tmp.path(), "w1", "pw-one", port);
    wait_until(Duration::from_secs(60), "three builds", || {
        finished(&dir, 3).then_some(())
    });
    assert_eq!(master.stop(), Some(0));
    builders_in_build_order(&dir)
}

#[test]
fn prioritize_builders_orders_the_builders_served() {
    assert_eq!(prioritize_run(""), ["a", "b", "c"], "oldest request first");
    let by_name_desc = r#"prioritizeBuilders: |builders| {
        let names = builders.map(|b| b.name);
        names.sort(|x, y| if x < y { 1 } else if x > y { -1 } else { 0 });
        names
    }"#;
    assert_eq!(prioritize_run(by_name_desc), ["c", "b", "a"]);
    // A function that fails is logged and the default order used.
    assert_eq!(
        prioritize_run(r#"prioritizeBuilders: |builders| builders[99].name"#),
        ["a", "b", "c"]
    );
}

#[test]
fn can_start_build_vetoes_a_worker() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = Script::steps(r#"f.addStep(ShellCommand(#{ name: "s", command: "true" }));"#)
        .worker("w1", "pw-one")
        .worker("w2", "pw-two")
        .builder(
            "b",
            &["w1", "w2"],
            r#"canStartBuild: |builder, worker, request| worker != "w1" || request.properties.ok == "w1""#,
        )
        .write(tmp.path());
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let _w1 = KilnWorker::start(tmp.path(), "w1", "pw-one", port);
    let _w2 = KilnWorker::start(tmp.path(), "w2", "pw-two", port);
    wait_connected(&master, &["w1", "w2"]);
    // Both workers are idle, and w1 comes first: without canStartBuild the
    // build would go to w1.
    for i in 1..=2 {
        force(&master, "b");
        wait_until(Duration::from_secs(60), "the build", || {
            finished(&dir, i).then_some(())
        });
    }
    force_with(&master, "b", &["--property", "ok=w1"]);
    wait_until(Duration::from_secs(60), "the third build", || {
        finished(&dir, 3).then_some(())
    });
    assert_eq!(master.stop(), Some(0));
    let on: Vec<String> = builds(&dir).into_iter().map(|b| b.worker).collect();
    assert_eq!(on, ["w2", "w2", "w1"]);
}

#[test]
fn a_collapse_requests_function_chooses_what_collapses() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = Script::steps(FIRST_WAITS)
        .worker("w1", "pw-one")
        .builder(
            "b",
            &["w1"],
            r#"collapseRequests: |builder, mine, other| {
            if other.properties.k == "boom" { throw "cannot decide"; }
            builder == "b" && mine.properties.k == other.properties.k
                && mine.sources[0].branch == other.sources[0].branch
        }"#,
        )
        .write(tmp.path());
    let mut master = Master::start(&dir);
    let _w1 = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    force(&master, "b");
    master.wait_for_log("build 1 started", 1, Duration::from_secs(60));
    for k in ["x", "x", "y", "boom"] {
        kiln_ok(
            &master.dir,
            &[
                "force",
                "--master",
                &master.http_url(),
                "b",
                "--property",
                &format!("k={k}"),
            ],
        );
    }
    std::fs::write(tmp.path().join("release"), "").expect("release");
    wait_until(
        Duration::from_secs(60),
        "every request and build to end",
        || all_done(&dir).then_some(()),
    );
    // Request 1 alone, 2 and 3 (both k=x) together, 4 (k=y) and 5 (the
    // function throws for it: not collapsed) alone. The default rule would
    // have collapsed 2 to 5 into one build.
    let b = builds(&dir);
    assert_eq!(b.len(), 4, "{b:?}");
    assert_eq!(requests(&dir), [done(Results::Success); 5]);
    assert_has(&master.log(), "cannot decide");
    assert_eq!(master.stop(), Some(0));
}

/// Starts the master in `dir` with its worker `w1`, forces builder `b`
/// and waits for that build to end.
fn one_forced_build(root: &Path, dir: &Path) -> (Master, KilnWorker) {
    let master = Master::start(dir);
    let w1 = KilnWorker::start(root, "w1", "pw-one", worker_port(&master));
    wait_connected(&master, &["w1"]);
    force(&master, "b");
    wait_until(Duration::from_secs(60), "the build", || {
        finished(dir, 1).then_some(())
    });
    (master, w1)
}

/// `canStartBuild` says no twice, then yes: no event announces that it
/// changed its mind, so the held-back request is offered again on its own.
#[test]
fn a_request_can_start_build_held_back_is_offered_again() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = Script::steps(r#"f.addStep(ShellCommand(#{ name: "s", command: "true" }));"#)
        .rhai("let asked = 0;")
        .worker("w1", "pw-one")
        .builder(
            "b",
            &["w1"],
            r#"canStartBuild: |builder, worker, request| { asked += 1; print(`canStartBuild asked ${asked} time(s)`); asked >= 3 }"#,
        )
        .write(tmp.path());
    let (mut master, _w1) = one_forced_build(tmp.path(), &dir);
    assert_eq!(master.stop(), Some(0));
    assert_has(&master.log(), "canStartBuild asked 3 time(s)");
    let b = builds(&dir);
    assert_eq!(b.len(), 1, "{b:?}");
    assert_eq!(b[0].result, Some(Results::Success));
}

/// Dispatch runs when something happens, never on a timer: once a build
/// has ended, an idle master looks at the queue no more.
#[test]
fn an_idle_master_does_not_look_at_the_queue() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = Script::steps(r#"f.addStep(ShellCommand(#{ name: "s", command: "true" }));"#)
        .worker("w1", "pw-one")
        .builder("b", &["w1"], "")
        .write(tmp.path());
    let (mut master, _w1) = one_forced_build(tmp.path(), &dir);
    let rounds = || {
        let text = common::http_get(&format!("{}/metrics", master.http_url()));
        text.lines()
            .find_map(|l| l.strip_prefix("kiln_dispatch_rounds_total "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .expect("kiln_dispatch_rounds_total in /metrics")
    };
    // The build's end wakes the distributor once more; let that settle.
    let mut before = rounds();
    wait_until(Duration::from_secs(10), "the rounds to settle", || {
        let now = rounds();
        let settled = now == before;
        before = now;
        settled.then_some(())
    });
    common::holds_for(
        Duration::from_secs(2),
        "a dispatch round ran with nothing to do",
        || rounds() == before,
    );
    assert_eq!(master.stop(), Some(0));
}
