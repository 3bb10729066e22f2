//! Workers over Buildbot's msgpack protocol, against a stock
//! `buildbot-worker` 4.3 (installed by `.ci/test` into target/tools/venv)
//! and raw WebSocket clients that misbehave.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::workers::*;
use common::{wait_until, Master};
use futures_util::{SinkExt, StreamExt};

fn master_dir(root: &Path) -> PathBuf {
    master_with_steps(
        root,
        r#"f.addStep(ShellCommand(#{ command: ["echo", "hi"] }));"#,
    )
}

fn master_with_steps(root: &Path, steps: &str) -> PathBuf {
    let dir = root.join("master");
    std::fs::create_dir_all(dir.join("secrets")).expect("mkdir");
    std::fs::write(dir.join("secrets/w1"), "pw-one\n").expect("secret");
    std::fs::write(
        dir.join("master.rhai"),
        r#"
let f = BuildFactory();
STEPS
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    workers: [Worker("w1", secret("w1")), Worker("w2", "pw-two")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["b"] })],
    builders: [BuilderConfig(#{ name: "b", workernames: ["w1", "w2"], factory: f })],
}
"#
        .replace("STEPS", steps),
    )
    .expect("master.rhai");
    dir
}

#[test]
fn a_stock_worker_connects_and_a_wrong_password_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_dir(tmp.path());
    let mut master = Master::start(&dir);
    let port = worker_port(&master);

    let bad = StockWorker::start(tmp.path(), "w2", "not-the-password", port);
    master.wait_for_log("wrong password for worker `w2`", 1, Duration::from_secs(60));
    let w1 = StockWorker::start(tmp.path(), "w1", "pw-one", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    wait_until(Duration::from_secs(30), "w1 recorded as connected", || {
        (connected(&dir) == ["w1"]).then_some(())
    });
    let info: String = rusqlite::Connection::open(dir.join("state.sqlite"))
        .expect("db")
        .query_row("SELECT info_json FROM workers WHERE name = 'w1'", [], |r| {
            r.get(0)
        })
        .expect("info");
    let info: serde_json::Value = serde_json::from_str(&info).expect("json");
    assert_eq!(info["version"], "4.3.0");
    assert_eq!(info["basedir"], w1.dir.display().to_string());
    drop(bad);

    // The worker goes away: no longer connected.
    drop(w1);
    wait_until(Duration::from_secs(30), "w1 recorded as gone", || {
        connected(&dir).is_empty().then_some(())
    });
    assert_eq!(master.stop(), Some(0));
}

async fn ws_connect(
    port: u16,
    user: &str,
    password: &str,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    String,
> {
    use base64::Engine as _;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://127.0.0.1:{port}/")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    req.headers_mut().insert(
        "Authorization",
        format!("Basic {auth}")
            .parse()
            .map_err(|_| "header".to_string())?,
    );
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
        .map_err(|e| e.to_string())
}

#[test]
fn bad_clients_are_closed_and_touch_nothing_else() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_dir(tmp.path());
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let w1 = StockWorker::start(tmp.path(), "w1", "pw-one", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        // An unknown worker is refused in the handshake.
        let err = ws_connect(port, "nobody", "x").await.expect_err("refused");
        assert!(err.contains("401"), "{err}");
        // A second connection for w1 while w1 answers is refused.
        if let Ok(mut ws) = ws_connect(port, "w1", "pw-one").await {
            // Answer nothing; the master checks the first connection and closes this one.
            let end = tokio::time::timeout(Duration::from_secs(30), async {
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_close() {
                        break;
                    }
                }
            })
            .await;
            assert!(end.is_ok(), "the duplicate connection was not closed");
        }
        // w2 connects, then sends garbage: that connection is closed.
        let mut ws = ws_connect(port, "w2", "pw-two").await.expect("w2 connects");
        let _ = ws
            .send(tokio_tungstenite::tungstenite::Message::Binary(
                vec![0xc1, 0xff, 0x00].into(),
            ))
            .await;
        let end = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(Ok(m)) = ws.next().await {
                if m.is_close() {
                    break;
                }
            }
        })
        .await;
        assert!(end.is_ok(), "garbage did not close the connection");
        // A half-open TCP connection that never completes a handshake.
        let _idle = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("tcp");
    });
    master.wait_for_log("malformed message", 1, Duration::from_secs(30));
    master.wait_for_log(
        "already connected and answering",
        1,
        Duration::from_secs(30),
    );
    // w1 is untouched.
    assert_eq!(connected(&dir), ["w1"]);
    assert!(!w1.log().contains("connection lost"), "{}", w1.log());
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn a_stock_worker_runs_the_steps_with_buildbots_results() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_with_steps(
        tmp.path(),
        r#"
        f.addStep(ShellCommand(#{ name: "hello", command: ["sh", "-c", "echo hello; echo oops >&2"] }));
        f.addStep(ShellCommand(#{ name: "fails", command: "exit 3", haltOnFailure: true }));
        f.addStep(ShellCommand(#{ name: "skipped", command: "echo never" }));
        f.addStep(ShellCommand(#{ name: "cleanup", command: "echo cleaning", alwaysRun: true }));
        "#,
    );
    let master = Master::start(&dir);
    let port = worker_port(&master);
    let _w1 = StockWorker::start(tmp.path(), "w1", "pw-one", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    force(&master, "b");
    wait_until(Duration::from_secs(60), "the build to finish", || {
        finished(&dir, 1).then_some(())
    });
    let b = builds(&dir);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].result, Some(Results::Failure), "FAILURE: {b:?}");
    assert_eq!(
        b[0].steps,
        [
            ("hello".to_string(), Some(Results::Success)),
            ("fails".to_string(), Some(Results::Failure)),
            ("skipped".to_string(), Some(Results::Skipped)),
            ("cleanup".to_string(), Some(Results::Success)),
        ]
    );
    let out = stdio(&dir, "hello");
    assert!(out.contains("ohello\n"), "{out}");
    assert!(out.contains("eoops\n"), "{out}");
    assert!(stdio(&dir, "cleanup").contains("ocleaning"));
    // The request is complete with the build's result.
    assert_eq!(requests(&dir), [done(Results::Failure)]);
}

#[test]
fn a_worker_killed_mid_build_gives_retry_and_the_request_runs_again_elsewhere() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_with_steps(
        tmp.path(),
        // Runs until the test creates `release` beside the workers' dirs.
        r#"f.addStep(ShellCommand(#{ name: "slow", command: "echo start; while [ ! -e ../../../release ]; do sleep 0.1; done; echo done" }));"#,
    );
    let master = Master::start(&dir);
    let port = worker_port(&master);
    let w1 = StockWorker::start(tmp.path(), "w1", "pw-one", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    force(&master, "b");
    master.wait_for_log("build 1 started", 1, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    drop(w1); // SIGKILL
    master.wait_for_log(
        "worker lost; the request will run again",
        1,
        Duration::from_secs(60),
    );
    // The commands may end now (also the one w1 left behind).
    std::fs::write(tmp.path().join("release"), "").expect("release");
    let _w2 = StockWorker::start(tmp.path(), "w2", "pw-two", port);
    wait_until(
        Duration::from_secs(90),
        "the retried build to finish",
        || finished(&dir, 2).then_some(()),
    );
    let b = builds(&dir);
    assert_eq!(b.len(), 2, "{b:?}");
    assert_eq!(
        b[0].result,
        Some(Results::Retry),
        "the lost build is RETRY: {b:?}"
    );
    assert_eq!(b[1].result, Some(Results::Success), "{b:?}");
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    let n: i64 = c
        .query_row(
            "SELECT count(*) FROM buildrequests WHERE complete = 1",
            [],
            |r| r.get(0),
        )
        .expect("n");
    assert_eq!(n, 1);
    let worker: String = c
        .query_row(
            "SELECT w.name FROM builds b JOIN workers w ON w.id = b.workerid WHERE b.number = 2",
            [],
            |r| r.get(0),
        )
        .expect("worker");
    assert_eq!(worker, "w2");
    // Give the orphaned command of the killed worker time to see `release`.
    std::thread::sleep(Duration::from_millis(500));
}

#[test]
fn a_master_killed_mid_build_retries_it_on_the_next_start() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_with_steps(
        tmp.path(),
        r#"f.addStep(ShellCommand(#{ name: "slow", command: "if [ -e ../../../second ]; then echo again; else touch ../../../second; while [ ! -e ../../../release ]; do sleep 0.1; done; fi" }));"#,
    );
    let master = Master::start(&dir);
    let port = worker_port(&master);
    let w1 = StockWorker::start(tmp.path(), "w1", "pw-one", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    force(&master, "b");
    // Mid-build: the command is running on the worker.
    wait_until(Duration::from_secs(60), "the command to start", || {
        tmp.path().join("second").exists().then_some(())
    });
    drop(master); // SIGKILL: no clean stop
    drop(w1);
    // The same port, so that a worker can come back.
    let text = std::fs::read_to_string(dir.join("master.rhai")).expect("read");
    std::fs::write(
        dir.join("master.rhai"),
        text.replace("port: 0 } }", &format!("port: {port} }} }}")),
    )
    .expect("write");
    let master = Master::start(&dir);
    master.wait_for_log("they end as RETRY", 1, Duration::from_secs(60));
    let _w1 = StockWorker::start(tmp.path(), "w1", "pw-one", port);
    wait_until(Duration::from_secs(90), "the build to run again", || {
        finished(&dir, 2).then_some(())
    });
    let b = builds(&dir);
    assert_eq!(b.len(), 2, "{b:?}");
    assert_eq!(b[0].result, Some(Results::Retry));
    assert_eq!(b[1].result, Some(Results::Success));
    assert!(stdio(&dir, "slow").contains("oagain"));
    // The first command, orphaned by the killed worker, may end now.
    std::fs::write(tmp.path().join("release"), "").expect("release");
    std::thread::sleep(Duration::from_millis(500));
}

fn collapse_run(collapse: &str) -> (Vec<BuildRow>, Vec<RequestRow>) {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_script(
        tmp.path(),
        &format!(
            r#"
let f = BuildFactory();
// The first build waits for `release`; later ones finish at once.
f.addStep(ShellCommand(#{{ name: "s", command: "if [ -e ../../../first ]; then echo quick; else touch ../../../first; while [ ! -e ../../../release ]; do sleep 0.1; done; fi" }}));
#{{
    protocols: #{{ msgpack_experimental_v7: #{{ port: 0 }} }},
    www: #{{ port: 0 }},
    workers: [Worker("w1", "pw-one")],
    schedulers: [ForceScheduler(#{{ name: "force", builderNames: ["b"] }})],
    builders: [BuilderConfig(#{{ name: "b", workernames: ["w1"], factory: f {collapse} }})],
}}
"#
        ),
    );
    let master = Master::start(&dir);
    let port = worker_port(&master);
    let _w1 = StockWorker::start(tmp.path(), "w1", "pw-one", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
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
    assert_eq!(
        reqs,
        [
            done(Results::Success),
            done(Results::Success),
            done(Results::Success)
        ]
    );
    let (b, reqs) = collapse_run(", collapseRequests: false");
    assert_eq!(b.len(), 3, "{b:?}");
    assert_eq!(
        reqs,
        [
            done(Results::Success),
            done(Results::Success),
            done(Results::Success)
        ]
    );
}

#[test]
fn max_builds_keeps_a_worker_to_one_build_at_a_time() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Two builds at once in the same worker would find `busy` taken.
    let dir = master_script(
        tmp.path(),
        r#"
let f = BuildFactory();
f.addStep(ShellCommand(#{ name: "s", command: "mkdir ../../../busy && sleep 1 && rmdir ../../../busy" }));
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    workers: [Worker("w1", "pw-one", #{ max_builds: 1 })],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["b", "c"] })],
    builders: [BuilderConfig(#{ name: "b", workernames: ["w1"], factory: f }),
               BuilderConfig(#{ name: "c", workernames: ["w1"], factory: f })],
}
"#,
    );
    let master = Master::start(&dir);
    let port = worker_port(&master);
    let _w1 = StockWorker::start(tmp.path(), "w1", "pw-one", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    // One force: a request for each builder at the same moment.
    let out = common::kiln(
        &master.dir,
        &[
            "force",
            "--master",
            &master.http_url(),
            "b",
            "--scheduler",
            "force",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    force(&master, "c");
    wait_until(Duration::from_secs(60), "both builds", || {
        finished(&dir, 2).then_some(())
    });
    let b = builds(&dir);
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
    let dir = master_script(
        tmp.path(),
        &format!(
            r#"
let f = BuildFactory();
f.addStep(ShellCommand(#{{ name: "s", command: "while [ ! -e {release} ]; do sleep 0.05; done" }}));
#{{
    protocols: #{{ msgpack_experimental_v7: #{{ port: 0 }} }},
    www: #{{ port: 0 }},
    workers: [Worker("w1", "pw-one"), Worker("w2", "pw-two")],
    schedulers: [ForceScheduler(#{{ name: "force", builderNames: ["b"] }})],
    builders: [BuilderConfig(#{{ name: "b", workernames: ["w1", "w2"], factory: f, collapseRequests: false,
        nextWorker: |builder, workers, request| {{
            let offered = "";
            for w in workers {{ offered += " " + w; }}
            print("nextWorker offered" + offered + " for request " + request.buildrequestid);
            if workers.contains("w2") {{ "w2" }} else {{ () }}
        }} }})],
}}
"#,
            release = release.display()
        ),
    );
    let master = Master::start(&dir);
    let port = worker_port(&master);
    let _w1 = KilnWorker::start(tmp.path(), "w1", "pw-one", port);
    let _w2 = KilnWorker::start(tmp.path(), "w2", "pw-two", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    master.wait_for_log("connected worker=w2", 1, Duration::from_secs(60));
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
    let dir = master_script(
        tmp.path(),
        &format!(
            r#"
let f = BuildFactory();
f.addStep(ShellCommand(#{{ name: "s", command: "mkdir ../../../busy && sleep 3 && rmdir ../../../busy" }}));
let one = MasterLock("one");
#{{
    protocols: #{{ msgpack_experimental_v7: #{{ port: 0 }} }},
    www: #{{ port: 0 }},
    workers: [Worker("w1", "pw-one"), Worker("w2", "pw-two")],
    schedulers: [ForceScheduler(#{{ name: "force", builderNames: ["b", "c"] }})],
    builders: [BuilderConfig(#{{ name: "b", workernames: ["w1"], factory: f, locks: [{locks}] }}),
               BuilderConfig(#{{ name: "c", workernames: ["w2"], factory: f, locks: [{locks}] }})],
}}
"#
        ),
    );
    let master = Master::start(&dir);
    let port = worker_port(&master);
    let _w1 = StockWorker::start(tmp.path(), "w1", "pw-one", port);
    let _w2 = StockWorker::start(tmp.path(), "w2", "pw-two", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    master.wait_for_log("connected worker=w2", 1, Duration::from_secs(60));
    let out = common::kiln(
        &master.dir,
        &["force", "--master", &master.http_url(), "b"],
        Duration::from_secs(60),
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    force(&master, "c");
    wait_until(Duration::from_secs(60), "both builds", || {
        finished(&dir, 2).then_some(())
    });
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

#[test]
fn kilns_worker_runs_builds_enforces_timeouts_and_reconnects() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_script(
        tmp.path(),
        r#"
let f = BuildFactory();
f.addStep(ShellCommand(#{ name: "out", command: ["sh", "-c", "echo to-out; echo to-err >&2; exit 4"], flunkOnFailure: false }));
// The background sleep is in the command's process group: the timeout kills it too.
f.addStep(ShellCommand(#{ name: "hangs", command: "(sleep 2; touch ../../../survived) & sleep 30", timeout: 1 }));
f.addStep(ShellCommand(#{ name: "env", command: "echo $GREETING", env: #{ GREETING: "hello from kiln" } }));
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    workers: [Worker("w1", "pw-one")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["b"] })],
    builders: [BuilderConfig(#{ name: "b", workernames: ["w1"], factory: f })],
}
"#,
    );
    let master = Master::start(&dir);
    let port = worker_port(&master);
    let w1 = KilnWorker::start(tmp.path(), "w1", "pw-one", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    force(&master, "b");
    wait_until(Duration::from_secs(60), "the build", || {
        finished(&dir, 1).then_some(())
    });
    let b = builds(&dir);
    assert_eq!(b[0].result, Some(Results::Failure), "{b:?}");
    assert_eq!(
        b[0].steps,
        [
            ("out".to_string(), Some(Results::Failure)),
            ("hangs".to_string(), Some(Results::Failure)),
            ("env".to_string(), Some(Results::Success))
        ]
    );
    let out = stdio(&dir, "out");
    assert!(
        out.contains("oto-out\n") && out.contains("eto-err\n"),
        "{out}"
    );
    let hangs = stdio(&dir, "hangs");
    assert!(
        hangs.contains("command timed out: 1 seconds without output"),
        "{hangs}"
    );
    assert!(stdio(&dir, "env").contains("ohello from kiln"));
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !tmp.path().join("survived").exists(),
        "the timeout left a process of the group running"
    );

    // The master restarts on the same port: the worker comes back by itself.
    let mut master = master;
    assert_eq!(master.stop(), Some(0));
    let text = std::fs::read_to_string(dir.join("master.rhai")).expect("read");
    std::fs::write(
        dir.join("master.rhai"),
        text.replace(
            "msgpack_experimental_v7: #{ port: 0 }",
            &format!("msgpack_experimental_v7: #{{ port: {port} }}"),
        ),
    )
    .expect("write");
    let master = Master::start(&dir);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    drop(w1);
    drop(master);
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
    let dir = master_script(
        tmp.path(),
        &format!(
            r#"
let f = BuildFactory();
f.addStep(ShellCommand(#{{ name: "s", command: "true" }}));
let b = |name| BuilderConfig(#{{ name: name, workernames: ["w1"], factory: f }});
#{{
    protocols: #{{ msgpack_experimental_v7: #{{ port: 0 }} }},
    www: #{{ port: 0 }},
    workers: [Worker("w1", "pw-one", #{{ max_builds: 1 }})],
    schedulers: [ForceScheduler(#{{ name: "force", builderNames: ["a", "b", "c"] }})],
    builders: [b.call("a"), b.call("b"), b.call("c")],
    {prioritize}
}}
"#
        ),
    );
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
    },"#;
    assert_eq!(prioritize_run(by_name_desc), ["c", "b", "a"]);
    // A function that fails is logged and the default order used.
    assert_eq!(
        prioritize_run(r#"prioritizeBuilders: |builders| builders[99].name,"#),
        ["a", "b", "c"]
    );
}

#[test]
fn can_start_build_vetoes_a_worker() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_script(
        tmp.path(),
        r#"
let f = BuildFactory();
f.addStep(ShellCommand(#{ name: "s", command: "true" }));
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    workers: [Worker("w1", "pw-one"), Worker("w2", "pw-two")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["b"] })],
    builders: [BuilderConfig(#{ name: "b", workernames: ["w1", "w2"], factory: f,
        canStartBuild: |builder, worker, request| worker != "w1" || request.properties.ok == "w1" })],
}
"#,
    );
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let _w1 = KilnWorker::start(tmp.path(), "w1", "pw-one", port);
    let _w2 = KilnWorker::start(tmp.path(), "w2", "pw-two", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    master.wait_for_log("connected worker=w2", 1, Duration::from_secs(60));
    // Both workers are idle, and w1 comes first: without canStartBuild the
    // build would go to w1.
    for i in 1..=2 {
        force(&master, "b");
        wait_until(Duration::from_secs(60), "the build", || {
            finished(&dir, i).then_some(())
        });
    }
    let out = common::kiln(
        &master.dir,
        &[
            "force",
            "--master",
            &master.http_url(),
            "b",
            "--property",
            "ok=w1",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    wait_until(Duration::from_secs(60), "the third build", || {
        finished(&dir, 3).then_some(())
    });
    assert_eq!(master.stop(), Some(0));
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    let on: Vec<String> = c
        .prepare("SELECT w.name FROM builds b JOIN workers w ON w.id = b.workerid ORDER BY b.id")
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(on, ["w2", "w2", "w1"]);
}

#[test]
fn a_collapse_requests_function_chooses_what_collapses() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_script(
        tmp.path(),
        r#"
let f = BuildFactory();
// The first build waits for `release`; later ones finish at once.
f.addStep(ShellCommand(#{ name: "s", command: "if [ -e ../../../first ]; then echo quick; else touch ../../../first; while [ ! -e ../../../release ]; do sleep 0.1; done; fi" }));
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    workers: [Worker("w1", "pw-one")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["b"] })],
    builders: [BuilderConfig(#{ name: "b", workernames: ["w1"], factory: f,
        collapseRequests: |builder, mine, other| {
            if other.properties.k == "boom" { throw "cannot decide"; }
            builder == "b" && mine.properties.k == other.properties.k
                && mine.sources[0].branch == other.sources[0].branch
        } })],
}
"#,
    );
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let _w1 = KilnWorker::start(tmp.path(), "w1", "pw-one", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    force(&master, "b");
    master.wait_for_log("build 1 started", 1, Duration::from_secs(60));
    for k in ["x", "x", "y", "boom"] {
        let out = common::kiln(
            &master.dir,
            &[
                "force",
                "--master",
                &master.http_url(),
                "b",
                "--property",
                &format!("k={k}"),
            ],
            Duration::from_secs(60),
        );
        assert_eq!(out.code, Some(0), "{}", out.stderr);
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
    assert!(master.log().contains("cannot decide"), "{}", master.log());
    assert_eq!(master.stop(), Some(0));
}

/// Downloads, a command that uses them, and uploads back, on one worker.
fn transfer_run(kiln_worker: bool) {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_script(
        tmp.path(),
        r#"
let f = BuildFactory();
f.addStep(StringDownload(#{ name: "greet", s: "hello\n", workerdest: "greeting.txt", mode: 0o600 }));
f.addStep(FileDownload(#{ name: "tool", mastersrc: "tool.sh", workerdest: "bin/tool.sh", mode: 0o755, blocksize: 7 }));
f.addStep(ShellCommand(#{ name: "use", command: "test \"$(stat -c %a greeting.txt)\" = 600 && bin/tool.sh > out.txt && cat greeting.txt >> out.txt && mkdir -p dist/sub && echo a > dist/a && echo b > dist/sub/b && touch -d 2001-02-03T04:05:06 out.txt" }));
f.addStep(FileUpload(#{ name: "up", workersrc: "out.txt", masterdest: "uploads/out.txt", keepstamp: true, blocksize: 5 }));
f.addStep(DirectoryUpload(#{ name: "updir", workersrc: "dist", masterdest: "uploads/dist", compress: "gz" }));
f.addStep(FileUpload(#{ name: "missing", workersrc: "nothing-here", masterdest: "uploads/missing" }));
f.addStep(FileUpload(#{ name: "toobig", workersrc: "out.txt", masterdest: "uploads/big", maxsize: 3 }));
f.addStep(FileDownload(#{ name: "nosrc", mastersrc: "no-such-file", workerdest: "x" }));
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    workers: [Worker("w1", "pw-one")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["b"] })],
    builders: [BuilderConfig(#{ name: "b", workernames: ["w1"], factory: f })],
}
"#,
    );
    std::fs::write(dir.join("tool.sh"), "#!/bin/sh\necho made by the tool\n").expect("tool");
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let (_stock, _kiln);
    if kiln_worker {
        _kiln = Some(KilnWorker::start(tmp.path(), "w1", "pw-one", port));
    } else {
        _stock = Some(StockWorker::start(tmp.path(), "w1", "pw-one", port));
    }
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    force(&master, "b");
    wait_until(Duration::from_secs(90), "the build", || {
        finished(&dir, 1).then_some(())
    });
    let b = builds(&dir);
    let steps: Vec<(&str, Option<Results>)> =
        b[0].steps.iter().map(|(n, r)| (n.as_str(), *r)).collect();
    assert_eq!(
        steps,
        [
            ("greet", Some(Results::Success)),
            ("tool", Some(Results::Success)),
            ("use", Some(Results::Success)),
            ("up", Some(Results::Success)),
            ("updir", Some(Results::Success)),
            ("missing", Some(Results::Failure)),
            ("toobig", Some(Results::Failure)),
            ("nosrc", Some(Results::Failure)),
        ],
        "use: {}\nmissing: {}\ntoobig: {}",
        stdio(&dir, "use"),
        stdio(&dir, "missing"),
        stdio(&dir, "toobig")
    );
    assert_eq!(b[0].result, Some(Results::Failure));
    let up = dir.join("uploads");
    assert_eq!(
        std::fs::read_to_string(up.join("out.txt")).expect("out.txt"),
        "made by the tool\nhello\n"
    );
    // keepstamp: the worker's modification time came along.
    let mtime = std::fs::metadata(up.join("out.txt"))
        .expect("meta")
        .modified()
        .expect("mtime");
    let secs = mtime
        .duration_since(std::time::UNIX_EPOCH)
        .expect("epoch")
        .as_secs();
    let local_2001 = 981_173_106i64; // 2001-02-03T04:05:06 UTC
    assert!(
        (secs as i64 - local_2001).abs() <= 14 * 3600,
        "mtime {secs} is not 2001-02-03"
    );
    assert_eq!(
        std::fs::read_to_string(up.join("dist/a")).expect("a"),
        "a\n"
    );
    assert_eq!(
        std::fs::read_to_string(up.join("dist/sub/b")).expect("b"),
        "b\n"
    );
    // Failed uploads leave nothing behind, not even temporary files.
    let mut names: Vec<String> = std::fs::read_dir(&up)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["dist", "out.txt"]);
    assert!(stdio(&dir, "nosrc").contains("not available on the master"));
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn a_stock_worker_transfers_files_both_ways() {
    transfer_run(false);
}

#[test]
fn kilns_worker_transfers_files_both_ways() {
    transfer_run(true);
}

/// A JSON-RPC call to the master's control API: (status, answer).
fn rpc(master: &Master, path: &str, method: &str, params: serde_json::Value) -> (u16, String) {
    let url = format!("{}{path}", master.http_url());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let r = reqwest::Client::new()
            .post(&url)
            .json(&serde_json::json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params }))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .expect("POST");
        (r.status().as_u16(), r.text().await.expect("body"))
    })
}

fn stop_run(kiln_worker: bool) {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_script(
        tmp.path(),
        r#"
let f = BuildFactory();
f.addStep(ShellCommand(#{ name: "long", command: "touch ../../../started; sleep 120" }));
f.addStep(ShellCommand(#{ name: "after", command: "touch ../../../after" }));
f.addStep(ShellCommand(#{ name: "cleanup", command: "touch ../../../cleanup", alwaysRun: true }));
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    workers: [Worker("w1", "pw-one")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["b"] })],
    builders: [BuilderConfig(#{ name: "b", workernames: ["w1"], factory: f })],
}
"#,
    );
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let (_stock, _kiln);
    if kiln_worker {
        _kiln = Some(KilnWorker::start(tmp.path(), "w1", "pw-one", port));
    } else {
        _stock = Some(StockWorker::start(tmp.path(), "w1", "pw-one", port));
    }
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    let (status, body) = rpc(&master, "/api/v2/builds/1", "stop", serde_json::json!({}));
    assert_eq!(status, 404, "no build is running yet: {body}");
    force(&master, "b");
    wait_until(Duration::from_secs(60), "the command to start", || {
        tmp.path().join("started").exists().then_some(())
    });
    let (status, body) = rpc(
        &master,
        "/api/v2/builds/1",
        "stop",
        serde_json::json!({ "reason": "wrong push" }),
    );
    assert_eq!(status, 200, "{body}");
    // Bounded well below the command's 120 s: the interrupt killed it.
    wait_until(Duration::from_secs(40), "the stopped build to end", || {
        finished(&dir, 1).then_some(())
    });
    let b = builds(&dir);
    assert_eq!(b[0].result, Some(Results::Cancelled), "{b:?}");
    assert!(b[0].state.contains("wrong push"), "{b:?}");
    assert_eq!(
        b[0].steps,
        [
            ("long".to_string(), Some(Results::Cancelled)),
            ("after".to_string(), Some(Results::Skipped)),
            ("cleanup".to_string(), Some(Results::Success))
        ]
    );
    assert!(
        !tmp.path().join("after").exists(),
        "no step runs after a stop"
    );
    assert!(tmp.path().join("cleanup").exists(), "but alwaysRun ones do");
    assert_eq!(requests(&dir), [done(Results::Cancelled)]);
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn a_stopped_build_interrupts_its_command_on_a_stock_worker() {
    stop_run(false);
}

#[test]
fn a_stopped_build_interrupts_its_command_on_kilns_worker() {
    stop_run(true);
}

#[test]
fn workers_shut_down_gracefully_or_at_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_script(
        tmp.path(),
        r#"
let f = BuildFactory();
f.addStep(ShellCommand(#{ name: "s", command: "touch ../../../started; while [ ! -e ../../../release ]; do sleep 0.1; done" }));
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    workers: [Worker("w1", "pw-one"), Worker("w2", "pw-two")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["b"] })],
    builders: [BuilderConfig(#{ name: "b", workernames: ["w1"], factory: f })],
}
"#,
    );
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let mut w1 = KilnWorker::start(tmp.path(), "w1", "pw-one", port);
    let mut w2 = StockWorker::start(tmp.path(), "w2", "pw-two", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    master.wait_for_log("connected worker=w2", 1, Duration::from_secs(60));
    force(&master, "b");
    wait_until(Duration::from_secs(60), "the build to start", || {
        tmp.path().join("started").exists().then_some(())
    });
    // Graceful: w1 finishes its build, takes no new one, then goes.
    let (status, body) = rpc(&master, "/api/v2/workers/w1", "stop", serde_json::json!({}));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("when its 1 running build(s) end"), "{body}");
    force(&master, "b");
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        builds(&dir).len(),
        1,
        "a draining worker takes no new build"
    );
    assert!(
        w1.child.try_wait().expect("wait").is_none(),
        "w1 is still up"
    );
    std::fs::write(tmp.path().join("release"), "").expect("release");
    wait_until(Duration::from_secs(30), "w1 to exit", || {
        w1.child.try_wait().expect("wait")
    });
    let b = builds(&dir);
    assert_eq!(b.len(), 1, "{b:?}");
    assert_eq!(b[0].result, Some(Results::Success), "{b:?}");
    assert_eq!(
        requests(&dir),
        [
            done(Results::Success),
            RequestRow {
                complete: false,
                result: None
            }
        ],
        "the second request waits"
    );
    // At once: the stock worker's process ends.
    let (status, body) = rpc(&master, "/api/v2/workers/w2", "kill", serde_json::json!({}));
    assert_eq!(status, 200, "{body}");
    wait_until(Duration::from_secs(30), "w2 to exit", || {
        w2.child.try_wait().expect("wait")
    });
    wait_until(Duration::from_secs(30), "no worker connected", || {
        connected(&dir).is_empty().then_some(())
    });
    let (status, body) = rpc(&master, "/api/v2/workers/w2", "stop", serde_json::json!({}));
    assert_eq!(status, 404, "{body}");
    let (status, body) = rpc(
        &master,
        "/api/v2/workers/w2",
        "pause",
        serde_json::json!({}),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn step_arguments_render_build_properties_and_a_missing_one_is_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_script(
        tmp.path(),
        r#"
let f = BuildFactory();
f.addStep(ShellCommand(#{ name: "show",
    command: ["echo", WithProperties("%(buildername)s #%(buildnumber)s on %(workername)s for %(who:-nobody)s"),
              Interpolate("pool=%(prop:pool)s global=%(prop:site)s")],
    env: #{ KILN_WHERE: WithProperties("%(builddir)s") } }));
f.addStep(ShellCommand(#{ name: "env", command: "echo where=$KILN_WHERE",
    env: #{ KILN_WHERE: WithProperties("%(builddir)s") } }));
f.addStep(ShellCommand(#{ name: "missing", command: Interpolate("hg clone %(prop:repo_path)s") }));
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    properties: #{ site: "staging", pool: "global-pool" },
    workers: [Worker("w1", "pw-one", #{ properties: #{ pool: "build-pool" } })],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["b"] })],
    builders: [BuilderConfig(#{ name: "b", workernames: ["w1"], factory: f })],
}
"#,
    );
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let _w1 = KilnWorker::start(tmp.path(), "w1", "pw-one", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    let out = common::kiln(
        &master.dir,
        &[
            "force",
            "--master",
            &master.http_url(),
            "b",
            "--property",
            "who=alice",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    wait_until(Duration::from_secs(60), "the build", || {
        finished(&dir, 1).then_some(())
    });
    let b = builds(&dir);
    assert_eq!(
        b[0].steps,
        [
            ("show".to_string(), Some(Results::Success)),
            ("env".to_string(), Some(Results::Success)),
            ("missing".to_string(), Some(Results::Exception)),
        ]
    );
    assert!(
        stdio(&dir, "show").contains("ob #1 on w1 for alice pool=build-pool global=staging"),
        "{}",
        stdio(&dir, "show")
    );
    let builddir = tmp.path().join("kiln-worker-w1/b");
    assert!(
        stdio(&dir, "env").contains(&format!("owhere={}", builddir.display())),
        "{}",
        stdio(&dir, "env")
    );
    assert!(
        stdio(&dir, "missing").contains("no property `repo_path`"),
        "{}",
        stdio(&dir, "missing")
    );
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn interpolate_reads_the_sourcestamp_worker_keywords_and_secrets_and_logs_hide_secrets() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_script(
        tmp.path(),
        r#"
let f = BuildFactory();
f.addStep(ShellCommand(#{ name: "kinds",
    command: ["echo", Interpolate("branch=%(src::branch)s rev=%(src::revision:-none)s other=%(src:other:branch:-elsewhere)s"),
              Interpolate("in=%(worker:basedir)s say=%(kw:greeting)s n=%(kw:n)s", #{ greeting: "hello", n: 3 })] }));
// The token reaches the command as an argument and in the environment; the
// stock worker writes both into the log's header, and kiln hides them.
f.addStep(ShellCommand(#{ name: "token",
    command: ["sh", "-c", Interpolate("echo arg=%(secret:token)s env=$TOKEN")],
    env: #{ TOKEN: secret("token") } }));
f.addStep(ShellCommand(#{ name: "nosecret", command: ["echo", Interpolate("%(secret:missing)s")] }));
f.addStep(ShellCommand(#{ name: "noworker", command: ["echo", Interpolate("%(worker:nonesuch)s")], alwaysRun: true }));
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    workers: [Worker("w1", "pw-one")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["b"] })],
    builders: [BuilderConfig(#{ name: "b", workernames: ["w1"], factory: f })],
}
"#,
    );
    std::fs::create_dir_all(dir.join("secrets")).expect("secrets");
    std::fs::write(dir.join("secrets/token"), "s3cr3t-t0ken\n").expect("token");
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let w1 = StockWorker::start(tmp.path(), "w1", "pw-one", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    let out = common::kiln(
        &master.dir,
        &[
            "force",
            "--master",
            &master.http_url(),
            "b",
            "--branch",
            "release",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    wait_until(Duration::from_secs(60), "the build", || {
        finished(&dir, 1).then_some(())
    });
    let b = builds(&dir);
    assert_eq!(
        b[0].steps,
        [
            ("kinds".to_string(), Some(Results::Success)),
            ("token".to_string(), Some(Results::Success)),
            ("nosecret".to_string(), Some(Results::Exception)),
            ("noworker".to_string(), Some(Results::Exception)),
        ]
    );
    let kinds = stdio(&dir, "kinds");
    assert!(
        kinds.contains("obranch=release rev=none other=elsewhere"),
        "{kinds}"
    );
    assert!(
        kinds.contains(&format!("in={} say=hello n=3", w1.dir.display())),
        "{kinds}"
    );
    let token = stdio(&dir, "token");
    assert!(token.contains("oarg=<secret> env=<secret>"), "{token}");
    assert!(
        token.contains("TOKEN=<secret>"),
        "the header shows the env: {token}"
    );
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    let leaked: i64 = c
        .query_row(
            "SELECT count(*) FROM logchunks WHERE instr(content, 's3cr3t-t0ken') > 0",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(leaked, 0, "the secret is in no stored log");
    let nosecret = stdio(&dir, "nosecret");
    assert!(
        nosecret.contains("secret `missing` cannot be read"),
        "{nosecret}"
    );
    let noworker = stdio(&dir, "noworker");
    assert!(
        noworker.contains("the worker did not report `nonesuch`"),
        "{noworker}"
    );
    assert_eq!(master.stop(), Some(0));
}

/// A step that prints forever hits maxTime; one that prints nothing hits
/// timeout; both end FAILURE "(timed out)", with the worker's line and the
/// master's in the log.
fn timeout_run(kiln_worker: bool) {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_script(
        tmp.path(),
        r#"
let f = BuildFactory();
// A line longer than any read or update, and a last line without newline.
f.addStep(ShellCommand(#{ name: "long", command: ["python3", "-c", "import sys; sys.stdout.write('x' * 100000 + '\\n' + 'tail')"] }));
f.addStep(ShellCommand(#{ name: "chatty", command: "while true; do echo tick; sleep 0.2; done",
    timeout: 30, maxTime: 2, flunkOnFailure: true }));
f.addStep(ShellCommand(#{ name: "silent", command: ["sleep", "30"], timeout: 1, alwaysRun: true }));
f.addStep(ShellCommand(#{ name: "after", command: ["true"], alwaysRun: true }));
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    workers: [Worker("w1", "pw-one")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["b"] })],
    builders: [BuilderConfig(#{ name: "b", workernames: ["w1"], factory: f })],
}
"#,
    );
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let (_k, _s) = if kiln_worker {
        (
            Some(KilnWorker::start(tmp.path(), "w1", "pw-one", port)),
            None,
        )
    } else {
        (
            None,
            Some(StockWorker::start(tmp.path(), "w1", "pw-one", port)),
        )
    };
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    force(&master, "b");
    wait_until(Duration::from_secs(90), "the build", || {
        finished(&dir, 1).then_some(())
    });
    let b = builds(&dir);
    assert_eq!(b[0].result, Some(Results::Failure), "{b:?}");
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    let states: Vec<(String, i64, String)> = c
        .prepare("SELECT name, results, state_string FROM steps ORDER BY number")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    let fail = states[1].2.replace(" (timed out)", "");
    assert_eq!(
        states,
        [
            ("long".to_string(), 0, states[0].2.clone()),
            ("chatty".to_string(), 2, format!("{fail} (timed out)")),
            ("silent".to_string(), 2, format!("{fail} (timed out)")),
            ("after".to_string(), 0, states[3].2.clone()),
        ]
    );
    assert!(!states[3].2.contains("timed out"));
    // Stored as two lines, whichever way the workers cut the output.
    let long = stdio(&dir, "long");
    let body: Vec<&str> = long.lines().filter(|l| l.starts_with('o')).collect();
    assert_eq!(
        body.len(),
        2,
        "{:?}",
        body.iter().map(|l| l.len()).collect::<Vec<_>>()
    );
    assert_eq!(body[0], format!("o{}", "x".repeat(100000)));
    assert_eq!(body[1], "otail");
    let chatty = stdio(&dir, "chatty");
    assert!(chatty.contains("otick"), "{chatty}");
    assert!(
        chatty.contains("command timed out: 2 seconds elapsed"),
        "{chatty}"
    );
    assert!(
        chatty.contains("h[kiln] the worker killed the command: it ran longer than maxTime (2 s)"),
        "{chatty}"
    );
    let silent = stdio(&dir, "silent");
    assert!(
        silent.contains("command timed out: 1 seconds without output"),
        "{silent}"
    );
    assert!(
        silent.contains(
            "h[kiln] the worker killed the command: it printed nothing for timeout (1 s)"
        ),
        "{silent}"
    );
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn timeout_and_max_time_end_commands_on_a_stock_worker() {
    timeout_run(false);
}

#[test]
fn timeout_and_max_time_end_commands_on_kilns_worker() {
    timeout_run(true);
}

#[test]
fn each_result_flag_changes_the_builds_result() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Each builder: one step that fails (exit 1) or warns (exit 1 read as
    // WARNINGS), then a step that succeeds; only the flags differ.
    // (builder, flags, the first step's result, the build's result)
    let cases = [
        ("flunk", "", 2, 2),
        ("noflunk", "flunkOnFailure: false", 2, 0),
        (
            "warnfail",
            "flunkOnFailure: false, warnOnFailure: true",
            2,
            1,
        ),
        ("warnings", "log_eval_func: warn", 1, 0),
        (
            "warnwarn",
            "log_eval_func: warn, warnOnWarnings: true",
            1,
            1,
        ),
        (
            "flunkwarn",
            "log_eval_func: warn, flunkOnWarnings: true",
            1,
            2,
        ),
    ];
    let mut script = String::from(
        "let warn = rc_eval_func(#{ \"0\": SUCCESS, \"1\": WARNINGS });\nlet builders = [];\n",
    );
    for (name, flags, _, _) in cases {
        script.push_str(&format!(
            "let f = BuildFactory();\n\
             f.addStep(ShellCommand(#{{ name: \"first\", command: \"exit 1\", {flags} }}));\n\
             f.addStep(ShellCommand(#{{ name: \"second\", command: \"true\" }}));\n\
             builders.push(BuilderConfig(#{{ name: \"{name}\", workernames: [\"w1\"], factory: f }}));\n"
        ));
    }
    let names: Vec<String> = cases.iter().map(|c| format!("\"{}\"", c.0)).collect();
    script.push_str(&format!(
        "#{{\n    protocols: #{{ msgpack_experimental_v7: #{{ port: 0 }} }},\n    www: #{{ port: 0 }},\n\
         workers: [Worker(\"w1\", \"pw-one\")],\n\
         schedulers: [ForceScheduler(#{{ name: \"force\", builderNames: [{}] }})],\n\
         builders: builders,\n}}\n",
        names.join(", ")
    ));
    let dir = master_script(tmp.path(), &script);
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let _w1 = KilnWorker::start(tmp.path(), "w1", "pw-one", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    for (name, _, _, _) in cases {
        force(&master, name);
    }
    wait_until(Duration::from_secs(90), "every build", || {
        finished(&dir, cases.len()).then_some(())
    });
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    for (name, flags, step, expected) in cases {
        let (build, first, second): (i64, i64, i64) = c
            .query_row(
                "SELECT b.results, s1.results, s2.results FROM builds b
                 JOIN builders r ON r.id = b.builderid
                 JOIN steps s1 ON s1.buildid = b.id AND s1.name = 'first'
                 JOIN steps s2 ON s2.buildid = b.id AND s2.name = 'second'
                 WHERE r.name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .expect("build");
        assert_eq!(
            (build, first, second),
            (expected, step, 0),
            "builder {name} ({flags})"
        );
    }
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn set_property_do_step_if_and_log_rules_decide_the_steps() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_script(
        tmp.path(),
        r#"
let f = BuildFactory();
f.addStep(SetProperty(#{ name: "where", property: "basedir", command: ["pwd"], workdir: "." }));
f.addStep(SetProperty(#{ name: "fixed", property: "flavour", value: WithProperties("%(buildername)s-opt") }));
f.addStep(ShellCommand(#{ name: "use", command: ["echo", WithProperties("in %(basedir)s as %(flavour)s")] }));
f.addStep(ShellCommand(#{ name: "skipped", command: "touch ../../../skipped",
    doStepIf: |step| step.properties.flavour == "nope" }));
f.addStep(ShellCommand(#{ name: "ran", command: "true", doStepIf: |step| step.properties.flavour == "b-opt" }));
f.addStep(ShellCommand(#{ name: "rcmap", command: "exit 3", warnOnWarnings: true,
    log_eval_func: rc_eval_func(#{ "0": SUCCESS, "3": WARNINGS }) }));
// Known infrastructure trouble in the output means RETRY, on the first build only.
f.addStep(ShellCommand(#{ name: "infra", command: "echo 'remote: timed out'; exit 1",
    log_eval_func: |step, rc, log| if log.contains("timed out") && step.properties.buildnumber == 1 { RETRY } else { SUCCESS } }));
f.addStep(ShellCommand(#{ name: "after", command: "true" }));
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    workers: [Worker("w1", "pw-one")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["b"] })],
    builders: [BuilderConfig(#{ name: "b", workernames: ["w1"], factory: f })],
}
"#,
    );
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let _w1 = KilnWorker::start(tmp.path(), "w1", "pw-one", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    force(&master, "b");
    for _ in 0..300 {
        if finished(&dir, 2) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        finished(&dir, 2),
        "{:?}\n{}\n{}\n{}",
        builds(&dir),
        master.log(),
        stdio(&dir, "where"),
        stdio(&dir, "use")
    );
    wait_until(Duration::from_secs(30), "both builds' requests", || {
        all_done(&dir).then_some(())
    });
    let b = builds(&dir);
    let results = |i: usize| b[i].step_results();
    // where, fixed, use, skipped, ran, rcmap, infra, after
    assert_eq!(
        results(0),
        [
            Some(Results::Success),
            Some(Results::Success),
            Some(Results::Success),
            Some(Results::Skipped),
            Some(Results::Success),
            Some(Results::Warnings),
            Some(Results::Retry),
            Some(Results::Skipped)
        ]
    );
    assert_eq!(b[0].result, Some(Results::Retry), "RETRY: {b:?}");
    assert_eq!(
        results(1),
        [
            Some(Results::Success),
            Some(Results::Success),
            Some(Results::Success),
            Some(Results::Skipped),
            Some(Results::Success),
            Some(Results::Warnings),
            Some(Results::Success),
            Some(Results::Success)
        ]
    );
    assert_eq!(b[1].result, Some(Results::Warnings), "WARNINGS: {b:?}");
    assert_eq!(b.len(), 2);
    assert_eq!(requests(&dir), [done(Results::Warnings)]);
    assert!(!tmp.path().join("skipped").exists());
    let basedir = tmp.path().join("kiln-worker-w1/b");
    assert!(
        stdio(&dir, "use").contains(&format!("oin {} as b-opt", basedir.display())),
        "{}",
        stdio(&dir, "use")
    );
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    let (value, source): (String, String) = c
        .query_row(
            "SELECT value_json, source FROM build_properties WHERE buildid = 1 AND name = 'basedir'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("basedir property");
    assert_eq!(value, format!("{:?}", basedir.display().to_string()));
    assert_eq!(source, "SetProperty");
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn a_log_is_cut_at_log_max_size_with_a_marker() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_script(
        tmp.path(),
        r#"
let f = BuildFactory();
f.addStep(ShellCommand(#{ name: "chatty", command: "for i in $(seq 1 5000); do echo line-$i; done; echo rc-still-counts >&2; exit 0" }));
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    logMaxSize: 20000,
    workers: [Worker("w1", "pw-one")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["b"] })],
    builders: [BuilderConfig(#{ name: "b", workernames: ["w1"], factory: f })],
}
"#,
    );
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let _w1 = KilnWorker::start(tmp.path(), "w1", "pw-one", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    force(&master, "b");
    wait_until(Duration::from_secs(60), "the build", || {
        finished(&dir, 1).then_some(())
    });
    let b = builds(&dir);
    assert_eq!(b[0].steps, [("chatty".to_string(), Some(Results::Success))]);
    let log = stdio(&dir, "chatty");
    assert!(log.contains("oline-1\n"), "{log}");
    assert!(!log.contains("line-5000"), "the tail is dropped");
    assert!(log.contains("reached logMaxSize (20000 bytes)"), "{log}");
    assert!(log.len() < 20000 + 4096, "{} bytes kept", log.len());
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn mercurial_clone_clones_then_pulls_and_retries_into_a_fresh_directory() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("mozharness");
    std::fs::create_dir_all(&src).expect("mkdir");
    common::run(&src, "hg", &["init"]);
    common::hg_commit(&src, "rel@m.org", &["VERSION"], "one");
    let path = common::tools_path().into_string().expect("PATH");
    let dir = master_script(
        tmp.path(),
        &format!(
            r#"
let f = BuildFactory();
f.addStep(MercurialCloneCommand(#{{ name: "clone", command: ["hg", "clone", "{src}", "scripts"],
    workdir: ".", haltOnFailure: true }}));
f.addStep(ShellCommand(#{{ name: "show", command: "cat scripts/VERSION", workdir: "." }}));
#{{
    protocols: #{{ msgpack_experimental_v7: #{{ port: 0 }} }},
    www: #{{ port: 0 }},
    workers: [Worker("w1", "pw-one")],
    schedulers: [ForceScheduler(#{{ name: "force", builderNames: ["b"] }})],
    builders: [BuilderConfig(#{{ name: "b", workernames: ["w1"], factory: f,
        env: #{{ PATH: "{path}", HGPLAIN: "1", HGRCPATH: "" }} }})],
}}
"#,
            src = src.display()
        ),
    );
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let w1 = StockWorker::start(tmp.path(), "w1", "pw-one", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    let step_log = |n: i64, step: &str| -> String {
        let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
        let chunks: Vec<Vec<u8>> = c
            .prepare(
                "SELECT lc.content FROM logchunks lc JOIN logs l ON l.id = lc.logid
                 JOIN steps s ON s.id = l.stepid JOIN builds b ON b.id = s.buildid
                 WHERE b.number = ?1 AND s.name = ?2 ORDER BY lc.first_line",
            )
            .expect("prepare")
            .query_map(rusqlite::params![n, step], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        chunks
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    };
    // 1: a fresh clone.
    force(&master, "b");
    wait_until(Duration::from_secs(60), "build 1", || {
        finished(&dir, 1).then_some(())
    });
    assert!(
        step_log(1, "show").contains("oone"),
        "{}",
        step_log(1, "clone")
    );
    // 2: the clone is there: pull and update bring the new changeset.
    common::hg_commit(&src, "rel@m.org", &["VERSION"], "two");
    force(&master, "b");
    wait_until(Duration::from_secs(60), "build 2", || {
        finished(&dir, 2).then_some(())
    });
    assert!(
        step_log(2, "clone").contains("is a repository already"),
        "{}",
        step_log(2, "clone")
    );
    assert!(
        step_log(2, "show").contains("otwo"),
        "{}",
        step_log(2, "show")
    );
    // 3: a directory that is not a repository makes the clone fail; with
    // retry (the default) it is removed and cloned again.
    let scripts = w1.dir.join("b/scripts");
    std::fs::remove_dir_all(scripts.join(".hg")).expect("rm .hg");
    force(&master, "b");
    wait_until(Duration::from_secs(60), "build 3", || {
        finished(&dir, 3).then_some(())
    });
    assert!(
        step_log(3, "clone").contains("removing scripts and cloning again"),
        "{}",
        step_log(3, "clone")
    );
    let b = builds(&dir);
    let results: Vec<Option<Results>> = b.iter().map(|x| x.result).collect();
    assert_eq!(results, [Some(Results::Success); 3], "{b:?}");
    assert!(step_log(3, "show").contains("otwo"));
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn a_disconnect_step_lets_the_worker_go_without_failing_or_retrying() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_script(
        tmp.path(),
        r#"
let reboot = BuildFactory();
reboot.addStep(ShellCommand(#{ name: "work", command: "true" }));
reboot.addStep(DisconnectStep(#{ name: "reboot", command: "echo SCHEDULED REBOOT",
    force_disconnect: "SCHEDULED REBOOT", alwaysRun: true, flunkOnFailure: false, warnOnFailure: false }));
reboot.addStep(ShellCommand(#{ name: "after", command: "touch ../../../after", alwaysRun: true }));
let die = BuildFactory();
// The command takes its worker down with it, as a reboot does.
die.addStep(DisconnectStep(#{ name: "die", command: "kill -9 $PPID; sleep 5", flunkOnFailure: false }));
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    workers: [Worker("w1", "pw-one")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["b", "d"] })],
    builders: [BuilderConfig(#{ name: "b", workernames: ["w1"], factory: reboot }),
               BuilderConfig(#{ name: "d", workernames: ["w1"], factory: die })],
}
"#,
    );
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let mut w1 = KilnWorker::start(tmp.path(), "w1", "pw-one", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    force(&master, "b");
    wait_until(Duration::from_secs(60), "the build", || {
        finished(&dir, 1).then_some(())
    });
    // The master dropped the connection; kiln's worker comes back.
    master.wait_for_log("disconnecting the worker", 1, Duration::from_secs(30));
    master.wait_for_log("connected worker=w1", 2, Duration::from_secs(60));
    let b = builds(&dir);
    assert_eq!(b[0].result, Some(Results::Success), "{b:?}");
    assert_eq!(
        b[0].steps,
        [
            ("work".to_string(), Some(Results::Success)),
            ("reboot".to_string(), Some(Results::Success)),
            ("after".to_string(), Some(Results::Skipped)),
        ]
    );
    assert!(!tmp.path().join("after").exists());
    // A worker that dies under a DisconnectStep: SUCCESS, not RETRY.
    force(&master, "d");
    wait_until(Duration::from_secs(60), "the second build", || {
        finished(&dir, 2).then_some(())
    });
    wait_until(Duration::from_secs(30), "the worker to be gone", || {
        w1.child.try_wait().expect("wait")
    });
    std::thread::sleep(Duration::from_millis(500));
    let b = builds(&dir);
    assert_eq!(b.len(), 2, "not retried: {b:?}");
    assert_eq!(b[1].result, Some(Results::Success), "{b:?}");
    assert_eq!(
        requests(&dir),
        [done(Results::Success), done(Results::Success)]
    );
    assert!(stdio(&dir, "die").contains("went away, as this step expects"));
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn a_trigger_step_waits_for_the_triggered_builds_and_takes_their_result() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_script(
        tmp.path(),
        r#"
let parent = BuildFactory();
parent.addStep(Trigger(#{ name: "trigger", schedulerNames: ["tr"], waitForFinish: true,
    set_properties: #{ flavour: "debug" } }));
parent.addStep(ShellCommand(#{ name: "after", command: "true" }));
let child = BuildFactory();
child.addStep(ShellCommand(#{ name: "child", command: ["sh", "-c", WithProperties("echo %(flavour)s; exit 1")] }));
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    workers: [Worker("w1", "pw-one")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["parent"] }),
                 Triggerable(#{ name: "tr", builderNames: ["child"] })],
    builders: [BuilderConfig(#{ name: "parent", workernames: ["w1"], factory: parent }),
               BuilderConfig(#{ name: "child", workernames: ["w1"], factory: child })],
}
"#,
    );
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let _w1 = KilnWorker::start(tmp.path(), "w1", "pw-one", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    force(&master, "parent");
    wait_until(Duration::from_secs(60), "both builds", || {
        finished(&dir, 2).then_some(())
    });
    let b = builds(&dir);
    // The child finished first (FAILURE); the parent waited, took FAILURE
    // from its trigger step, and went on (flunkOnFailure, no halt).
    assert_eq!(b.len(), 2, "{b:?}");
    let parent = b
        .iter()
        .find(|x| x.steps[0].0 == "trigger")
        .expect("parent");
    let child = b.iter().find(|x| x.steps[0].0 == "child").expect("child");
    assert_eq!(child.result, Some(Results::Failure));
    assert_eq!(
        parent.steps,
        [
            ("trigger".to_string(), Some(Results::Failure)),
            ("after".to_string(), Some(Results::Success))
        ]
    );
    assert_eq!(parent.result, Some(Results::Failure));
    assert!(
        stdio(&dir, "child").contains("odebug"),
        "{}",
        stdio(&dir, "child")
    );
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    let linked: i64 = c
        .query_row(
            "SELECT count(*) FROM buildsets WHERE parent_buildid = 1",
            [],
            |r| r.get(0),
        )
        .expect("query");
    assert_eq!(linked, 1);
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn log_rules_raise_a_result_when_the_output_matches() {
    let tmp = tempfile::tempdir().expect("tmp");
    let script = r#"
let rules = [["^abort: error: .*refused", WARNINGS]];
let f = BuildFactory();
f.addStep(ShellCommand(#{ name: "hit", command: "echo 'abort: error: Connection refused'", log_rules: rules, warnOnWarnings: true }));
f.addStep(ShellCommand(#{ name: "miss", command: "echo fine", log_rules: rules }));
f.addStep(ShellCommand(#{ name: "worse", command: "echo 'abort: error: refused'; exit 2", log_rules: rules }));
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    workers: [Worker("w1", "pw-one")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["b"] })],
    builders: [BuilderConfig(#{ name: "b", workernames: ["w1"], factory: f })],
}
"#;
    let dir = master_script(tmp.path(), script);
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let _w1 = KilnWorker::start(tmp.path(), "w1", "pw-one", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    force(&master, "b");
    wait_until(Duration::from_secs(60), "the build", || {
        finished(&dir, 1).then_some(())
    });
    let b = builds(&dir);
    assert_eq!(
        b[0].step_results(),
        [
            Some(Results::Warnings),
            Some(Results::Success),
            Some(Results::Failure)
        ],
        "{b:?}"
    );
    assert_eq!(b[0].result, Some(Results::Failure));
    assert!(
        stdio(&dir, "hit").contains("matched"),
        "{}",
        stdio(&dir, "hit")
    );
    assert_eq!(master.stop(), Some(0));
    // A pattern that is not a regular expression is a config error.
    std::fs::write(
        dir.join("master.rhai"),
        script.replace(".*refused", "(refused"),
    )
    .expect("write");
    let out = common::kiln(&dir, &["checkconfig"], Duration::from_secs(60));
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("is not a regular expression"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_git_step_clones_then_fetches_and_checks_out_the_build_revision() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src.git");
    std::fs::create_dir_all(&src).expect("mkdir");
    common::run(&src, "git", &["init", "-q", "-b", "main"]);
    let commit = |text: &str| {
        std::fs::write(src.join("VERSION"), format!("{text}\n")).expect("write");
        common::run(&src, "git", &["add", "VERSION"]);
        common::run(&src, "git", &["commit", "-q", "-m", text]);
        common::run(&src, "git", &["rev-parse", "HEAD"])
            .trim()
            .to_string()
    };
    let first = commit("one");
    let dir = master_script(
        tmp.path(),
        &format!(
            r#"
let f = BuildFactory();
f.addStep(Git(#{{ name: "git", repourl: "{src}", branch: "main" }}));
f.addStep(ShellCommand(#{{ name: "show", command: ["sh", "-c", WithProperties("cat VERSION; echo got=%(got_revision)s")] }}));
#{{
    protocols: #{{ msgpack_experimental_v7: #{{ port: 0 }} }},
    www: #{{ port: 0 }},
    workers: [Worker("w1", "pw-one")],
    schedulers: [ForceScheduler(#{{ name: "force", builderNames: ["b"] }})],
    builders: [BuilderConfig(#{{ name: "b", workernames: ["w1"], factory: f }})],
}}
"#,
            src = src.display()
        ),
    );
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let _w1 = KilnWorker::start(tmp.path(), "w1", "pw-one", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    let show = |n: usize| -> String {
        let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
        let chunks: Vec<Vec<u8>> = c
            .prepare(
                "SELECT lc.content FROM logchunks lc JOIN logs l ON l.id = lc.logid
                 JOIN steps s ON s.id = l.stepid JOIN builds b ON b.id = s.buildid
                 WHERE b.number = ?1 AND s.name = 'show' ORDER BY lc.first_line",
            )
            .expect("prepare")
            .query_map([n as i64], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        chunks
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    };
    force(&master, "b");
    wait_until(Duration::from_secs(60), "build 1", || {
        finished(&dir, 1).then_some(())
    });
    assert!(
        show(1).contains(&format!("oone\nogot={first}")),
        "{}",
        show(1)
    );
    let second = commit("two");
    force(&master, "b");
    wait_until(Duration::from_secs(60), "build 2", || {
        finished(&dir, 2).then_some(())
    });
    assert!(
        show(2).contains(&format!("otwo\nogot={second}")),
        "{}",
        show(2)
    );
    // A build of a given revision checks that one out.
    let out = common::kiln(
        &master.dir,
        &[
            "force",
            "--master",
            &master.http_url(),
            "b",
            "--revision",
            &first,
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    wait_until(Duration::from_secs(60), "build 3", || {
        finished(&dir, 3).then_some(())
    });
    assert!(
        show(3).contains(&format!("oone\nogot={first}")),
        "{}",
        show(3)
    );
    let b = builds(&dir);
    assert!(
        b.iter().all(|x| x.result == Some(Results::Success)),
        "{b:?}"
    );
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn a_mock_command_runs_inside_mock_mozilla_when_asked() {
    let tmp = tempfile::tempdir().expect("tmp");
    // A stand-in for mock_mozilla: records its arguments, runs the shell.
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    std::fs::write(
        bin.join("mock_mozilla"),
        "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$(dirname \"$0\")/mock-args\"\nwhile [ \"$1\" != --shell ]; do shift; done\nexec sh -c \"$2\"\n",
    )
    .expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        bin.join("mock_mozilla"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    let path = format!("{}:/usr/bin:/bin", bin.display());
    let dir = master_script(
        tmp.path(),
        &format!(
            r#"
let f = BuildFactory();
f.addStep(MockCommand(#{{ name: "in_mock", command: ["sh", "-c", "echo in mock: $FLAVOUR"],
    mock: true, target: "mozilla-centos6-x86_64", env: #{{ FLAVOUR: "opt" }} }}));
f.addStep(MockCommand(#{{ name: "plain", command: ["sh", "-c", "echo plain: $FLAVOUR"],
    env: #{{ FLAVOUR: "dbg" }} }}));
#{{
    protocols: #{{ msgpack_experimental_v7: #{{ port: 0 }} }},
    www: #{{ port: 0 }},
    workers: [Worker("w1", "pw-one")],
    schedulers: [ForceScheduler(#{{ name: "force", builderNames: ["b"] }})],
    builders: [BuilderConfig(#{{ name: "b", workernames: ["w1"], factory: f, env: #{{ PATH: "{path}" }} }})],
}}
"#
        ),
    );
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let _w1 = KilnWorker::start(tmp.path(), "w1", "pw-one", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    force(&master, "b");
    wait_until(Duration::from_secs(60), "the build", || {
        finished(&dir, 1).then_some(())
    });
    let b = builds(&dir);
    assert_eq!(
        b[0].result,
        Some(Results::Success),
        "{b:?} {}",
        stdio(&dir, "in_mock")
    );
    assert!(
        stdio(&dir, "in_mock").contains("oin mock: opt"),
        "{}",
        stdio(&dir, "in_mock")
    );
    assert!(stdio(&dir, "plain").contains("oplain: dbg"));
    let args = std::fs::read_to_string(bin.join("mock-args")).expect("mock ran");
    let workdir = tmp.path().join("kiln-worker-w1/b/build");
    assert_eq!(
        args,
        format!(
            "-r\nmozilla-centos6-x86_64\n--cwd\n{}\n--unpriv\n--shell\n/usr/bin/env FLAVOUR=opt sh -c 'echo in mock: $FLAVOUR'\n",
            workdir.display()
        )
    );
    assert_eq!(master.stop(), Some(0));
}
