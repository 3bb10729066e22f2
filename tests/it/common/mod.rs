//! Helpers shared by the integration tests: run the real `kiln` binary with
//! a bounded wait, and compare output with files that `KILN_BLESS=1` rewrites.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Asserts that the command failed (exit 1) and said `needle` on
    /// stderr.
    pub fn fails_with(&self, needle: &str) {
        assert_eq!(self.code, Some(1), "{}", self.stderr);
        assert_has(&self.stderr, needle);
    }
}

pub mod workers;

/// One stored change, as the tests look at it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeRow {
    pub author: String,
    pub branch: Option<String>,
    pub revision: Option<String>,
    pub comments: String,
    pub files: Vec<String>,
    pub properties: std::collections::BTreeMap<String, serde_json::Value>,
    pub when: i64,
}

/// One integer a query answers (a count, an id).
pub fn scalar(c: &rusqlite::Connection, sql: &str) -> i64 {
    c.query_row(sql, [], |r| r.get(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Every stored change, oldest first (none before the database exists).
pub fn changes(dir: &Path) -> Vec<ChangeRow> {
    let db = dir.join("state.sqlite");
    if !db.exists() {
        return vec![];
    }
    let c = rusqlite::Connection::open(db).expect("open db");
    c.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    let mut stmt = c
        .prepare(
            "SELECT changeid, author, branch, revision, comments, when_timestamp FROM changes ORDER BY changeid",
        )
        .expect("prepare");
    let rows: Vec<(i64, ChangeRow)> = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                ChangeRow {
                    author: r.get(1)?,
                    branch: r.get(2)?,
                    revision: r.get(3)?,
                    comments: r.get(4)?,
                    files: vec![],
                    properties: std::collections::BTreeMap::new(),
                    when: r.get(5)?,
                },
            ))
        })
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    rows.into_iter()
        .map(|(id, mut row)| {
            row.files = c
                .prepare("SELECT filename FROM change_files WHERE changeid = ?1 ORDER BY position")
                .expect("prepare")
                .query_map([id], |r| r.get(0))
                .expect("files")
                .collect::<Result<_, _>>()
                .expect("files");
            let props: Vec<(String, String)> = c
                .prepare("SELECT property_name, property_value FROM change_properties WHERE changeid = ?1")
                .expect("prepare")
                .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))
                .expect("props")
                .collect::<Result<_, _>>()
                .expect("props");
            for (k, v) in props {
                let pair: serde_json::Value = serde_json::from_str(&v).expect("property json");
                row.properties.insert(k, pair[0].clone());
            }
            row
        })
        .collect()
}

/// The revisions of `rows`, in order.
pub fn revisions(rows: &[ChangeRow]) -> Vec<String> {
    rows.iter()
        .map(|r| r.revision.clone().unwrap_or_default())
        .collect()
}

/// kiln with `args` in `cwd`, plain output and the tools on PATH; not yet
/// spawned.
pub fn kiln_command(cwd: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args)
        .current_dir(cwd)
        .env("NO_COLOR", "1")
        .env("PATH", tools_path());
    cmd
}

/// `kiln quickstart DIR` on free ports, not yet spawned.
pub fn quickstart(dir: &Path) -> Command {
    let mut cmd = kiln_command(Path::new("."), &["quickstart"]);
    cmd.arg(dir)
        .args(["--http-port", "0", "--worker-port", "0"]);
    cmd
}

/// The HTTP address a master logged (`HTTP listening on URL`), without
/// its trailing slash.
#[track_caller]
pub fn http_url_of(log: &str) -> String {
    let at = log
        .find("HTTP listening on ")
        .expect("the master's address in its log")
        + "HTTP listening on ".len();
    log[at..]
        .split_whitespace()
        .next()
        .expect("url")
        .trim_end_matches('/')
        .to_string()
}

/// Runs kiln (for at most 120 s), which must succeed.
#[track_caller]
pub fn kiln_ok(cwd: &Path, args: &[&str]) -> Output {
    let out = kiln(cwd, args, Duration::from_secs(120));
    assert_eq!(out.code, Some(0), "kiln {args:?}: {}", out.stderr);
    out
}

/// A tokio runtime for a test's async part (two worker threads).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Asserts that `haystack` contains `needle`, showing all of it if not.
#[track_caller]
pub fn assert_has(haystack: &str, needle: &str) {
    assert!(
        haystack.contains(needle),
        "expected {needle:?} in:\n{haystack}"
    );
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `kiln ARGS` in `cwd`; kills it and fails the test after `limit`.
pub fn kiln(cwd: &Path, args: &[&str], limit: Duration) -> Output {
    let mut child = kiln_command(cwd, args)
        .env_remove("KILN_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "kiln {args:?} in {} did not finish within {limit:?}",
                cwd.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        code: status.code(),
        stdout: t_out.join().expect("stdout thread"),
        stderr: t_err.join().expect("stderr thread"),
    }
}

/// Compares `actual` with the file, or rewrites the file under KILN_BLESS=1.
pub fn expect_file(path: &Path, actual: &str) {
    if std::env::var_os("KILN_BLESS").is_some() {
        std::fs::write(path, actual).expect("bless");
        return;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_else(|_| {
        panic!(
            "{} is missing; run with KILN_BLESS=1 to create it",
            path.display()
        )
    });
    if expected != actual {
        panic!(
            "{} differs (rerun with KILN_BLESS=1 to accept)\n--- expected\n{expected}\n--- actual\n{actual}",
            path.display()
        );
    }
}

/// PATH with the tools `.ci/test` installs (Mercurial in a venv under
/// `target/tools/`) in front.
pub fn tools_path() -> std::ffi::OsString {
    let venv = repo_root().join("target/tools/venv/bin");
    let mut paths = vec![venv];
    if let Some(p) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(paths).expect("PATH")
}

/// Runs a tool (hg, git) to its end within 60 s; panics with its stderr if
/// it fails. Returns stdout.
pub fn run(cwd: &Path, program: &str, args: &[&str]) -> String {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .env("PATH", tools_path())
        .env("HGPLAIN", "1")
        .env("HGRCPATH", "")
        .env("HGUSER", "kiln-test <test@kiln>")
        .env("GIT_AUTHOR_NAME", "kiln-test")
        .env("GIT_AUTHOR_EMAIL", "test@kiln")
        .env("GIT_COMMITTER_NAME", "kiln-test")
        .env("GIT_COMMITTER_EMAIL", "test@kiln")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: {e} (bash .ci/test installs the tools the tests need)")
        });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} {args:?} took more than 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().expect("output");
    if !out.status.success() {
        panic!(
            "{program} {args:?} in {} failed: {}",
            cwd.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Commits `files` (written with `content`) to the hg repository at `repo`.
pub fn hg_commit(repo: &Path, user: &str, files: &[&str], message: &str) -> String {
    for f in files {
        let p = repo.join(f);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        let old = std::fs::read_to_string(&p).unwrap_or_default();
        std::fs::write(&p, format!("{old}{message}\n")).expect("write");
    }
    run(
        repo,
        "hg",
        &["commit", "-q", "-A", "-u", user, "-m", message],
    );
    run(repo, "hg", &["log", "-r", ".", "-T", "{node}"])
}

/// What a child process writes to `stream`, line by line, as it comes (a
/// thread reads it until the stream closes).
pub fn capture(stream: impl std::io::Read + Send + 'static) -> Captured {
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stream)
            .lines()
            .map_while(Result::ok)
        {
            let mut l = sink.lock().unwrap_or_else(|e| e.into_inner());
            l.push_str(&line);
            l.push('\n');
        }
    });
    log
}

/// Captured output, growing.
pub type Captured = std::sync::Arc<std::sync::Mutex<String>>;

/// Everything captured so far.
pub fn captured(log: &Captured) -> String {
    log.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// A `kiln start` in the background; stopped (or killed) when dropped.
pub struct Master {
    pub dir: PathBuf,
    child: Option<std::process::Child>,
    log: Captured,
}

impl Master {
    pub fn start(dir: &Path) -> Master {
        Master::start_with(dir, &[])
    }

    /// `kiln start . ARGS...`
    pub fn start_with(dir: &Path, args: &[&str]) -> Master {
        let mut child = kiln_command(dir, &["start", "."])
            .args(args)
            .env("KILN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kiln start");
        let log = capture(child.stderr.take().expect("stderr"));
        Master {
            dir: dir.to_path_buf(),
            child: Some(child),
            log,
        }
    }

    pub fn log(&self) -> String {
        captured(&self.log)
    }

    /// Waits until the log has `count` lines containing `needle`.
    pub fn wait_for_log(&self, needle: &str, count: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.log().matches(needle).count() >= count {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "the master did not log {needle:?} {count} time(s) within {limit:?}; its log:\n{}",
            self.log()
        );
    }

    /// The HTTP address it logged.
    pub fn http_url(&self) -> String {
        self.wait_for_log("HTTP listening on ", 1, Duration::from_secs(30));
        http_url_of(&self.log())
    }

    /// SIGKILL, as a crash would; waits for the process to end.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `kiln stop`, then waits for the process to end; returns its exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let out = kiln(&self.dir, &["stop", "."], Duration::from_secs(60));
        assert_eq!(out.code, Some(0), "kiln stop failed: {}", out.stderr);
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the master did not exit after kiln stop");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` every 50 ms until it returns Some, for at most `limit`.
pub fn wait_until<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Checks every 50 ms for `window` that `f` stays true, and fails at
/// once when it does not: for what must not happen (a second poll of the
/// same push, a build a draining worker should not take).
pub fn holds_for(window: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + window;
    loop {
        assert!(f(), "{what}");
        if Instant::now() >= end {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What an HTTP call sends.
pub enum Body<'a> {
    None,
    Json(serde_json::Value),
    Form(&'a [(&'a str, &'a str)]),
}

/// One HTTP call from a test: its status and body. `who` logs in with
/// Basic auth; `headers` are added as they are.
pub fn http(
    method: &str,
    url: &str,
    who: Option<(&str, &str)>,
    headers: &[(&str, &str)],
    body: Body<'_>,
) -> (u16, String) {
    let (code, _, text) = http_full(method, url, who, headers, body);
    (code, text)
}

/// [`http`], with the answer's headers too.
pub fn http_full(
    method: &str,
    url: &str,
    who: Option<(&str, &str)>,
    headers: &[(&str, &str)],
    body: Body<'_>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client");
    let mut r = match method {
        "GET" => client.get(url),
        "POST" => client.post(url),
        other => panic!("no {other} in the tests' HTTP helper"),
    };
    if let Some((u, p)) = who {
        r = r.basic_auth(u, Some(p));
    }
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r = match body {
        Body::None => r,
        Body::Json(v) => r.json(&v),
        Body::Form(f) => r.form(f),
    };
    let resp = r.send().unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let code = resp.status().as_u16();
    let headers = resp.headers().clone();
    (code, headers, resp.text().expect("body"))
}

pub fn http_get(url: &str) -> String {
    http("GET", url, None, &[], Body::None).1
}

pub fn post_form(url: &str, form: &[(&str, &str)]) -> (u16, String) {
    http("POST", url, None, &[], Body::Form(form))
}

/// `hg serve` on 127.0.0.1, port 0; killed when dropped.
pub struct HgServe {
    child: std::process::Child,
    pub url: String,
}

impl HgServe {
    /// Serves `dir` (a repository, or with `--web-conf` in `args` several).
    pub fn start(dir: &Path, args: &[&str]) -> HgServe {
        use std::io::BufRead;
        let mut child = std::process::Command::new("hg")
            .args([
                "serve",
                "-a",
                "127.0.0.1",
                "-p",
                "0",
                "--config",
                "ui.quiet=false",
            ])
            .args(args)
            .current_dir(dir)
            .env("PATH", tools_path())
            .env("HGRCPATH", "")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("hg serve");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(out).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("hg serve did not start");
            }
        };
        // "listening at http://localhost:PORT/ (bound to 127.0.0.1:PORT)"
        let bound = line
            .rsplit("bound to ")
            .next()
            .unwrap_or("")
            .trim_end_matches(')');
        HgServe {
            child,
            url: format!("http://{bound}"),
        }
    }
}

impl Drop for HgServe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads server-sent events from `url` until `done` says so (or the time
/// runs out); returns (event name, data) pairs.
pub fn sse_until(
    url: &str,
    limit: Duration,
    started: impl FnOnce(),
    mut done: impl FnMut(&[(String, serde_json::Value)]) -> bool,
) -> Vec<(String, serde_json::Value)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut resp = reqwest::get(url).await.expect("GET events");
        assert_eq!(resp.status().as_u16(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap_or("")
            .starts_with("text/event-stream"));
        started();
        let deadline = tokio::time::Instant::now() + limit;
        let (mut buf, mut events) = (String::new(), Vec::new());
        while !done(&events) {
            let chunk = tokio::time::timeout_at(deadline, resp.chunk())
                .await
                .unwrap_or_else(|_| panic!("events so far: {events:?}"))
                .expect("chunk")
                .expect("the stream stays open");
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let (mut name, mut data) = (String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if !name.is_empty() {
                    events.push((
                        name,
                        serde_json::from_str(&data).unwrap_or(serde_json::Value::Null),
                    ));
                }
            }
        }
        events
    })
}
