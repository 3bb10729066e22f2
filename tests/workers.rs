//! Workers over Buildbot's msgpack protocol, against a stock
//! `buildbot-worker` 4.3 (installed by `.ci/test` into target/tools/venv)
//! and raw WebSocket clients that misbehave.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{wait_until, Master};
use futures_util::{SinkExt, StreamExt};

fn master_dir(root: &Path) -> PathBuf {
    let dir = root.join("master");
    std::fs::create_dir_all(dir.join("secrets")).expect("mkdir");
    std::fs::write(dir.join("secrets/w1"), "pw-one\n").expect("secret");
    std::fs::write(
        dir.join("master.rhai"),
        r#"
let f = BuildFactory();
f.addStep(ShellCommand(#{ command: ["echo", "hi"] }));
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    workers: [Worker("w1", secret("w1")), Worker("w2", "pw-two")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["b"] })],
    builders: [BuilderConfig(#{ name: "b", workernames: ["w1", "w2"], factory: f })],
}
"#,
    )
    .expect("master.rhai");
    dir
}

/// The worker port the master logged.
fn worker_port(m: &Master) -> u16 {
    m.wait_for_log("workers connect to ws://", 1, Duration::from_secs(30));
    let log = m.log();
    let at = log.find("workers connect to ws://").expect("line") + "workers connect to ws://".len();
    let addr = log[at..].split('/').next().expect("addr");
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

/// A stock buildbot-worker in the foreground; killed when dropped.
struct StockWorker {
    child: std::process::Child,
    pub dir: PathBuf,
}

impl StockWorker {
    fn start(root: &Path, name: &str, password: &str, port: u16) -> StockWorker {
        let dir = root.join(format!("worker-{name}"));
        let bin = common::repo_root().join("target/tools/venv/bin/buildbot-worker");
        assert!(
            bin.exists(),
            "{} is missing: run bash .ci/test, which installs it",
            bin.display()
        );
        let out = std::process::Command::new(&bin)
            .args(["create-worker", "--protocol", "msgpack_experimental_v7"])
            .arg(&dir)
            .arg(format!("127.0.0.1:{port}"))
            .args([name, password])
            .output()
            .expect("create-worker");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let child = std::process::Command::new(&bin)
            .args(["start", "--nodaemon"])
            .arg(&dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("buildbot-worker start");
        StockWorker { child, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("twistd.log")).unwrap_or_default()
    }
}

impl Drop for StockWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connected(dir: &Path) -> Vec<String> {
    let Ok(c) = rusqlite::Connection::open(dir.join("state.sqlite")) else {
        return vec![];
    };
    let Ok(mut stmt) = c.prepare(
        "SELECT w.name FROM workers w JOIN connected_workers c ON c.workerid = w.id ORDER BY w.name",
    ) else {
        return vec![];
    };
    stmt.query_map([], |r| r.get(0))
        .map(|rows| rows.filter_map(Result::ok).collect())
        .unwrap_or_default()
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
