//! Worker connections: stock and kiln workers connecting, bad clients,
//! workers and masters killed mid-build, transfers, stop and shutdown,
//! timeouts.

use crate::common;
use crate::common::assert_has;

use std::time::Duration;

use common::workers::*;
use common::{holds_for, wait_until, Master};
use futures_util::{SinkExt, StreamExt};
use Results::*;

use super::{master_dir, master_with_steps, rpc};

#[test]
fn a_stock_worker_connects_and_a_wrong_password_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_dir(tmp.path());
    let mut master = Master::start(&dir);
    let port = worker_port(&master);

    let bad = StockWorker::start(tmp.path(), "w2", "not-the-password", port);
    master.wait_for_log("wrong password for worker `w2`", 1, Duration::from_secs(60));
    let w1 = StockWorker::connect(&master, tmp.path(), "w1", "pw-one");
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

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Whether the master closes this connection within 30 s.
async fn closed(ws: &mut Ws) -> bool {
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }
    })
    .await
    .is_ok()
}

async fn ws_connect(port: u16, user: &str, password: &str) -> Result<Ws, String> {
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
    let w1 = StockWorker::connect(&master, tmp.path(), "w1", "pw-one");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        // An unknown worker is refused in the handshake.
        let err = ws_connect(port, "nobody", "x").await.expect_err("refused");
        assert_has(&err, "401");
        // A second connection for w1 while w1 answers is refused.
        if let Ok(mut ws) = ws_connect(port, "w1", "pw-one").await {
            // Answer nothing; the master checks the first connection and closes this one.
            assert!(
                closed(&mut ws).await,
                "the duplicate connection was not closed"
            );
        }
        // w2 connects, then sends garbage: that connection is closed.
        let mut ws = ws_connect(port, "w2", "pw-two").await.expect("w2 connects");
        let _ = ws
            .send(tokio_tungstenite::tungstenite::Message::Binary(
                vec![0xc1, 0xff, 0x00].into(),
            ))
            .await;
        assert!(
            closed(&mut ws).await,
            "garbage did not close the connection"
        );
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
fn a_worker_killed_mid_build_gives_retry_and_the_request_runs_again_elsewhere() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_with_steps(
        tmp.path(),
        // Runs until the test creates `release` beside the workers' dirs.
        r#"f.addStep(ShellCommand(#{ name: "slow", command: "echo start; while [ ! -e ../../../release ]; do sleep 0.1; done; touch ../../../ended.$$; echo done" }));"#,
    );
    let master = Master::start(&dir);
    let port = worker_port(&master);
    let w1 = StockWorker::connect(&master, tmp.path(), "w1", "pw-one");
    force(&master, "b");
    wait_until(Duration::from_secs(60), "the command to run", || {
        stdio(&dir, "slow").contains("ostart").then_some(())
    });
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
    let n = common::scalar(&c, "SELECT count(*) FROM buildrequests WHERE complete = 1");
    assert_eq!(n, 1);
    let worker: String = c
        .query_row(
            "SELECT w.name FROM builds b JOIN workers w ON w.id = b.workerid WHERE b.number = 2",
            [],
            |r| r.get(0),
        )
        .expect("worker");
    assert_eq!(worker, "w2");
    // The command the killed worker left behind ends too (no process
    // outlives the test): one marker per command.
    wait_until(Duration::from_secs(30), "both commands to end", || {
        (ended(tmp.path()) == 2).then_some(())
    });
}

/// How many of the step's commands have ended (each leaves `ended.PID`).
fn ended(root: &std::path::Path) -> usize {
    std::fs::read_dir(root)
        .expect("read_dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("ended."))
        })
        .count()
}

#[test]
fn a_master_killed_mid_build_retries_it_on_the_next_start() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_with_steps(
        tmp.path(),
        r#"f.addStep(ShellCommand(#{ name: "slow", command: "if [ -e ../../../second ]; then echo again; else touch ../../../second; while [ ! -e ../../../release ]; do sleep 0.1; done; touch ../../../ended.$$; fi" }));"#,
    );
    let master = Master::start(&dir);
    let port = worker_port(&master);
    let w1 = StockWorker::connect(&master, tmp.path(), "w1", "pw-one");
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
    wait_until(
        Duration::from_secs(30),
        "the orphaned command to end",
        || (ended(tmp.path()) == 1).then_some(()),
    );
}

#[test]
fn kilns_worker_runs_builds_enforces_timeouts_and_reconnects() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = one_builder(r#"
f.addStep(ShellCommand(#{ name: "out", command: ["sh", "-c", "echo to-out; echo to-err >&2; exit 4"], flunkOnFailure: false }));
// The background sleep is in the command's process group: the timeout kills it too.
f.addStep(ShellCommand(#{ name: "hangs", command: "(sleep 2; touch ../../../survived) & echo $! > ../../../background.pid; sleep 30", timeout: 1 }));
f.addStep(ShellCommand(#{ name: "env", command: "echo $GREETING", env: #{ GREETING: "hello from kiln" } }));"#).write(tmp.path());
    let master = Master::start(&dir);
    let port = worker_port(&master);
    let w1 = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    let b = force_and_wait(&master, "b", 1);
    assert_eq!(b[0].result, Some(Results::Failure), "{b:?}");
    assert_eq!(
        b[0].steps,
        steps(&[("out", Failure), ("hangs", Failure), ("env", Success)])
    );
    let out = stdio(&dir, "out");
    assert!(
        out.contains("oto-out\n") && out.contains("eto-err\n"),
        "{out}"
    );
    let hangs = stdio(&dir, "hangs");
    assert_has(&hangs, "command timed out: 1 seconds without output");
    assert!(stdio(&dir, "env").contains("ohello from kiln"));
    // The background process ends either killed with its group, or by
    // itself after 2 s, leaving `survived`: wait for it to end, then see
    // which.
    let pid = std::fs::read_to_string(tmp.path().join("background.pid")).expect("pid");
    let pid = pid.trim();
    wait_until(
        Duration::from_secs(30),
        "the background process to end",
        || (!running(pid)).then_some(()),
    );
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

/// Downloads, a command that uses them, and uploads back, on one worker.
fn transfer_run(kiln_worker: bool) {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = one_builder(r#"
f.addStep(StringDownload(#{ name: "greet", s: "hello\n", workerdest: "greeting.txt", mode: 0o600 }));
f.addStep(FileDownload(#{ name: "tool", mastersrc: "tool.sh", workerdest: "bin/tool.sh", mode: 0o755, blocksize: 7 }));
f.addStep(ShellCommand(#{ name: "use", command: "test \"$(stat -c %a greeting.txt)\" = 600 && bin/tool.sh > out.txt && cat greeting.txt >> out.txt && mkdir -p dist/sub && echo a > dist/a && echo b > dist/sub/b && touch -d 2001-02-03T04:05:06 out.txt" }));
f.addStep(FileUpload(#{ name: "up", workersrc: "out.txt", masterdest: "uploads/out.txt", keepstamp: true, blocksize: 5 }));
f.addStep(DirectoryUpload(#{ name: "updir", workersrc: "dist", masterdest: "uploads/dist", compress: "gz" }));
f.addStep(FileUpload(#{ name: "missing", workersrc: "nothing-here", masterdest: "uploads/missing" }));
f.addStep(FileUpload(#{ name: "toobig", workersrc: "out.txt", masterdest: "uploads/big", maxsize: 3 }));
f.addStep(FileDownload(#{ name: "nosrc", mastersrc: "no-such-file", workerdest: "x" }));"#).write(tmp.path());
    std::fs::write(dir.join("tool.sh"), "#!/bin/sh\necho made by the tool\n").expect("tool");
    let mut master = Master::start(&dir);
    let _w1 = AnyWorker::connect(kiln_worker, &master, tmp.path(), "w1", "pw-one");
    let b = force_and_wait(&master, "b", 1);
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

fn stop_run(kiln_worker: bool) {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = one_builder(r#"
f.addStep(ShellCommand(#{ name: "long", command: "touch ../../../started; sleep 120" }));
f.addStep(ShellCommand(#{ name: "after", command: "touch ../../../after" }));
f.addStep(ShellCommand(#{ name: "cleanup", command: "touch ../../../cleanup", alwaysRun: true }));"#).write(tmp.path());
    let mut master = Master::start(&dir);
    let _w1 = AnyWorker::connect(kiln_worker, &master, tmp.path(), "w1", "pw-one");
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
        steps(&[
            ("long", Cancelled),
            ("after", Skipped),
            ("cleanup", Success)
        ])
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
    let dir = Script::steps(
        r#"f.addStep(ShellCommand(#{ name: "s", command: "touch ../../../started; while [ ! -e ../../../release ]; do sleep 0.1; done" }));"#,
    )
    .worker("w1", "pw-one")
    .worker("w2", "pw-two")
    .builder("b", &["w1"], "")
    .write(tmp.path());
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let mut w1 = KilnWorker::start(tmp.path(), "w1", "pw-one", port);
    let mut w2 = StockWorker::start(tmp.path(), "w2", "pw-two", port);
    wait_connected(&master, &["w1", "w2"]);
    force(&master, "b");
    wait_until(Duration::from_secs(60), "the build to start", || {
        tmp.path().join("started").exists().then_some(())
    });
    // Graceful: w1 finishes its build, takes no new one, then goes.
    let (status, body) = rpc(&master, "/api/v2/workers/w1", "stop", serde_json::json!({}));
    assert_eq!(status, 200, "{body}");
    assert_has(&body, "when its 1 running build(s) end");
    force(&master, "b");
    holds_for(
        Duration::from_secs(1),
        "a draining worker takes no new build",
        || builds(&dir).len() == 1,
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

/// A step that prints forever hits maxTime; one that prints nothing hits
/// timeout; both end FAILURE "(timed out)", with the worker's line and the
/// master's in the log.
fn timeout_run(kiln_worker: bool) {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = one_builder(r#"
// A line longer than any read or update, and a last line without newline.
f.addStep(ShellCommand(#{ name: "long", command: ["python3", "-c", "import sys; sys.stdout.write('x' * 100000 + '\\n' + 'tail')"] }));
f.addStep(ShellCommand(#{ name: "chatty", command: "while true; do echo tick; sleep 0.2; done",
    timeout: 30, maxTime: 2, flunkOnFailure: true }));
f.addStep(ShellCommand(#{ name: "silent", command: ["sleep", "30"], timeout: 1, alwaysRun: true }));
f.addStep(ShellCommand(#{ name: "after", command: ["true"], alwaysRun: true }));"#).write(tmp.path());
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
    let b = force_and_wait(&master, "b", 1);
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
    assert_has(&chatty, "otick");
    assert_has(&chatty, "command timed out: 2 seconds elapsed");
    assert_has(
        &chatty,
        "h[kiln] the worker killed the command: it ran longer than maxTime (2 s)",
    );
    let silent = stdio(&dir, "silent");
    assert_has(&silent, "command timed out: 1 seconds without output");
    assert_has(
        &silent,
        "h[kiln] the worker killed the command: it printed nothing for timeout (1 s)",
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

/// Whether process `pid` runs (an exited one waiting to be reaped does not).
fn running(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = &stat[stat.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// Wrong passwords on the worker port cost time: each try from an address
/// waits out its failures before it (250 ms, doubling), and the right
/// password, once let in, clears them.
#[test]
fn wrong_passwords_wait_longer_each_time_on_the_worker_port() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_dir(tmp.path());
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let mut waits = vec![];
        for _ in 0..4 {
            let t = std::time::Instant::now();
            let err = ws_connect(port, "w1", "guess").await.expect_err("refused");
            assert_has(&err, "401");
            waits.push(t.elapsed());
        }
        for (took, least) in waits.iter().zip([0, 250, 500, 1000]) {
            assert!(*took >= Duration::from_millis(least), "{waits:?}");
        }
        let t = std::time::Instant::now();
        let ws = ws_connect(port, "w1", "pw-one").await.expect("w1 connects");
        assert!(
            t.elapsed() >= Duration::from_millis(2000),
            "{:?}",
            t.elapsed()
        );
        drop(ws);
    });
    master.wait_for_log("wrong password for worker `w1`", 4, Duration::from_secs(30));
    // Cleared: the next failure waits nothing before it.
    rt.block_on(async {
        let t = std::time::Instant::now();
        ws_connect(port, "w1", "guess").await.expect_err("refused");
        assert!(
            t.elapsed() < Duration::from_millis(2000),
            "{:?}",
            t.elapsed()
        );
    });
    assert_eq!(master.stop(), Some(0));
}

/// Half-open connections (a client that connects and says nothing) are
/// bounded per address: past the bound a new connection is closed at
/// once, and when they go a worker connects as usual.
#[test]
fn half_open_connections_are_bounded_and_do_not_keep_workers_out() {
    use std::io::Read as _;
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_dir(tmp.path());
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let idle: Vec<std::net::TcpStream> = (0..64)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    // Each of those is held open by the master, waiting for a handshake.
    let mut first = idle[0].try_clone().expect("clone");
    first
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut buf = [0u8; 1];
    assert!(
        first.read(&mut buf).is_err(),
        "an admitted connection stays open"
    );
    // The 65th is closed at once.
    let mut extra = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    assert_eq!(extra.read(&mut buf).ok(), Some(0), "closed by the master");
    master.wait_for_log(
        "too many connections are still in their handshake",
        1,
        Duration::from_secs(30),
    );
    drop(idle);
    drop(first);
    // Their places come back as the master sees them go.
    let _w1 = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    assert_eq!(connected(&dir), ["w1"]);
    assert_eq!(master.stop(), Some(0));
}
