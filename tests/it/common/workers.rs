//! Masters with workers: start stock and kiln workers against a running
//! master, force builds, and read builds, steps and logs from its database.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Master;

/// The worker port the master logged.
pub fn worker_port(m: &Master) -> u16 {
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
pub struct StockWorker {
    pub child: std::process::Child,
    pub dir: PathBuf,
}

impl StockWorker {
    pub fn start(root: &Path, name: &str, password: &str, port: u16) -> StockWorker {
        let dir = root.join(format!("worker-{name}"));
        let bin = super::repo_root().join("target/tools/venv/bin/buildbot-worker");
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
            // Builds run the tools .ci/test installs (hg) from the worker's PATH.
            .env("PATH", super::tools_path())
            .env("HGRCPATH", "")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("buildbot-worker start");
        StockWorker { child, dir }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("twistd.log")).unwrap_or_default()
    }
}

impl Drop for StockWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn connected(dir: &Path) -> Vec<String> {
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

pub fn force(master: &Master, builder: &str) {
    let out = super::kiln(
        &master.dir,
        &["force", "--master", &master.http_url(), builder],
        Duration::from_secs(60),
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

/// A build's number, results, state, and each step's (name, results).
pub type BuildSummary = (i64, Option<i64>, String, Vec<(String, Option<i64>)>);

/// Every build, in order.
pub fn builds(dir: &Path) -> Vec<BuildSummary> {
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    let rows: Vec<(i64, i64, Option<i64>, String)> = c
        .prepare("SELECT id, number, results, state_string FROM builds ORDER BY id")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    rows.into_iter()
        .map(|(id, number, results, state)| {
            let steps: Vec<(String, Option<i64>)> = c
                .prepare("SELECT name, results FROM steps WHERE buildid = ?1 ORDER BY number")
                .expect("prepare")
                .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))
                .expect("steps")
                .collect::<Result<_, _>>()
                .expect("steps");
            (number, results, state, steps)
        })
        .collect()
}

pub fn stdio(dir: &Path, step: &str) -> String {
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    let chunks: Vec<Vec<u8>> = c
        .prepare(
            "SELECT lc.content FROM logchunks lc JOIN logs l ON l.id = lc.logid JOIN steps s ON s.id = l.stepid
             WHERE s.name = ?1 ORDER BY lc.first_line",
        )
        .expect("prepare")
        .query_map([step], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    chunks
        .into_iter()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect()
}

pub fn finished(dir: &Path, n: usize) -> bool {
    builds(dir).iter().filter(|b| b.1.is_some()).count() >= n
}

/// A master dir from a whole master.rhai (workers w1/pw-one and w2/pw-two
/// are for the test to declare).
pub fn master_script(root: &Path, script: &str) -> PathBuf {
    let dir = root.join("master");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("master.rhai"), script).expect("master.rhai");
    dir
}

pub fn request_states(dir: &Path) -> Vec<(i64, i64)> {
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    let rows: Vec<(i64, i64)> = c
        .prepare("SELECT complete, coalesce(results, -1) FROM buildrequests ORDER BY id")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    rows
}

/// The standalone `kiln-worker` binary, built beside `kiln` by `cargo
/// build --workspace --bins` (which `.ci/test` runs before the tests).
pub fn kiln_worker_exe() -> std::path::PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_kiln")).with_file_name("kiln-worker");
    assert!(
        exe.exists(),
        "{} is not built: `cargo build --workspace --bins` builds it (`bash .ci/test` does)",
        exe.display()
    );
    exe
}

/// kiln's own worker in the foreground, made by `kiln worker create` and
/// run by the standalone `kiln-worker start` (`kiln worker start` is the
/// same code; the quickstart's test runs that one); killed when dropped.
pub struct KilnWorker {
    pub child: std::process::Child,
}

impl KilnWorker {
    pub fn start(root: &Path, name: &str, password: &str, port: u16) -> KilnWorker {
        let dir = root.join(format!("kiln-worker-{name}"));
        if !dir.join("kiln-worker.json").exists() {
            let out = super::kiln(
                root,
                &[
                    "worker",
                    "create",
                    &dir.display().to_string(),
                    "--master",
                    &format!("127.0.0.1:{port}"),
                    "--name",
                    name,
                    "--password",
                    password,
                ],
                Duration::from_secs(30),
            );
            assert_eq!(out.code, Some(0), "{}", out.stderr);
        }
        let child = std::process::Command::new(kiln_worker_exe())
            .arg("start")
            .arg(&dir)
            .env("NO_COLOR", "1")
            .env("PATH", super::tools_path())
            .env("HGRCPATH", "")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("kiln-worker start");
        KilnWorker { child }
    }
}

impl Drop for KilnWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
