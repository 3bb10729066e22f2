//! A crash soak: the master is SIGKILLed at each stage of a change's way
//! to builds (just after the change hook took it, while a build runs, just
//! after a build ended, while requests wait) as pushes build on kiln's
//! worker and a stock buildbot-worker; it starts again each time. In the
//! end no change, buildset, request or build is lost or doubled: each
//! change made one buildset and one request, each request one SUCCESS
//! build, and every other build of it is RETRY (interrupted, run again).

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::workers::*;
use common::{post_form, scalar, wait_until, Master};

/// Posts the change `n` (branch main) to the master's change hook.
fn push(master: &Master, n: usize) {
    let rev = format!("{:040x}", n + 1);
    let (status, body) = post_form(
        &format!("{}/change_hook/base", master.http_url()),
        &[
            ("branch", "main"),
            ("revision", &rev),
            ("author", "dev <dev@example.org>"),
            ("comments", &format!("push {n}")),
            ("files", "[\"a.c\"]"),
        ],
    );
    assert_eq!(status, 200, "{body}");
}

fn db(dir: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    c.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    c
}

fn count(dir: &Path, sql: &str) -> i64 {
    scalar(&db(dir), sql)
}

#[test]
fn a_master_killed_at_every_stage_of_a_push_loses_and_doubles_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let script = Script::steps(
        r#"f.addStep(ShellCommand(#{ name: "work", command: "sleep 0.3" }));
f.addStep(ShellCommand(#{ name: "done", command: "true" }));"#,
    )
    .worker("k1", "pw-k1")
    .worker("s1", "pw-s1")
    .builder("b", &["k1", "s1"], "collapseRequests: false")
    .without_force()
    .scheduler_expr(
        r#"Scheduler(#{ name: "main", branch: "main", treeStableTimer: (), builderNames: ["b"] })"#,
    );
    // A first start finds a free worker port; from then on the master
    // keeps it, so that the workers find it again after each kill.
    let dir = script.write(tmp.path());
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    master.kill();
    let dir = script.clone().worker_port(port).write(tmp.path());
    let mut master = Master::start(&dir);
    let _k1 = KilnWorker::start(tmp.path(), "k1", "pw-k1", port);
    let _s1 = StockWorker::start(tmp.path(), "s1", "pw-s1", port);
    wait_connected(&master, &["k1", "s1"]);

    let mut pushed = 0;
    let builds_ended = |dir: &Path| {
        count(
            dir,
            "SELECT count(*) FROM builds WHERE complete_at IS NOT NULL",
        )
    };
    let builds_running =
        |dir: &Path| count(dir, "SELECT count(*) FROM builds WHERE complete_at IS NULL");
    // The suite goes through the four stages once; bench/soak.sh sets more
    // rounds (four kills each).
    let rounds: usize = std::env::var("KILN_SOAK_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let mut kills = 0;
    for (round, stage) in (0..rounds).flat_map(|r| {
        [
            "change taken",
            "build running",
            "build ended",
            "requests waiting",
        ]
        .map(move |s| (r, s))
    }) {
        let ended_before = builds_ended(&dir);
        for _ in 0..3 {
            push(&master, pushed);
            pushed += 1;
        }
        match stage {
            // At once, or a little later (from round 2 on, a different
            // point in each round): the scheduler may or may not have seen it.
            "change taken" => {
                std::thread::sleep(Duration::from_millis((round as u64 * 137) % 400));
            }
            "build running" => wait_until(Duration::from_secs(60), stage, || {
                (builds_running(&dir) > 0).then_some(())
            }),
            "build ended" => wait_until(Duration::from_secs(60), stage, || {
                (builds_ended(&dir) > ended_before).then_some(())
            }),
            _ => wait_until(Duration::from_secs(60), stage, || {
                (count(
                    &dir,
                    "SELECT count(*) FROM buildrequests WHERE complete = 0",
                ) >= 2)
                    .then_some(())
            }),
        }
        master.kill();
        kills += 1;
        master = Master::start(&dir);
    }

    // Everything builds to its end.
    let pushed = pushed as i64;
    let deadline = std::time::Instant::now() + Duration::from_secs(120 + 10 * rounds as u64);
    loop {
        let c = db(&dir);
        if scalar(&c, "SELECT count(*) FROM buildrequests WHERE complete = 1") == pushed
            && scalar(&c, "SELECT count(*) FROM builds WHERE complete_at IS NULL") == 0
        {
            break;
        }
        if std::time::Instant::now() > deadline {
            let state = [
                "SELECT count(*) FROM changes",
                "SELECT count(*) FROM buildsets",
                "SELECT count(*) FROM buildrequests",
                "SELECT count(*) FROM buildrequests WHERE complete = 1",
                "SELECT count(*) FROM buildrequest_claims",
                "SELECT count(*) FROM builds WHERE complete_at IS NULL",
                "SELECT count(*) FROM connected_workers",
            ]
            .map(|q| format!("{q}: {}", scalar(&c, q)));
            panic!(
                "not every request completed ({pushed} pushed):\n{}\n{:?}\n{}",
                state.join("\n"),
                builds(&dir),
                master.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let c = db(&dir);
    assert_eq!(
        scalar(&c, "SELECT count(*) FROM changes"),
        pushed,
        "changes"
    );
    assert_eq!(
        scalar(&c, "SELECT count(DISTINCT revision) FROM changes"),
        pushed
    );
    assert_eq!(
        scalar(&c, "SELECT count(*) FROM buildsets"),
        pushed,
        "one buildset a change"
    );
    assert_eq!(
        scalar(
            &c,
            "SELECT count(*) FROM (SELECT changeid FROM buildset_changes GROUP BY changeid HAVING count(*) = 1)"
        ),
        pushed
    );
    assert_eq!(
        scalar(&c, "SELECT count(*) FROM buildrequests"),
        pushed,
        "one request a buildset"
    );
    assert_eq!(
        scalar(&c, "SELECT count(*) FROM buildrequests WHERE results = 0"),
        pushed,
        "every request SUCCESS"
    );
    // Each request: exactly one SUCCESS build; any other is RETRY.
    assert_eq!(
        scalar(
            &c,
            "SELECT count(*) FROM (SELECT buildrequestid FROM builds GROUP BY buildrequestid
             HAVING sum(results = 0) = 1 AND sum(results NOT IN (0, 5)) = 0)"
        ),
        pushed,
        "{:?}",
        builds(&dir)
    );
    assert_eq!(master.stop(), Some(0));
    let retried = scalar(&c, "SELECT count(*) FROM builds WHERE results = 5");
    eprintln!("soak: {kills} kills survived, {pushed} changes, {pushed} SUCCESS builds, {retried} RETRY builds; nothing lost or doubled");
}
