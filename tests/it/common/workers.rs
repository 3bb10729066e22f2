//! Masters with workers: start stock and kiln workers against a running
//! master, force builds, and read builds, steps and logs from its database.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Master;

/// The worker port the master logged (`workers connect to ws://HOST:PORT/`,
/// or `wss://` with TLS).
pub fn worker_port(m: &Master) -> u16 {
    m.wait_for_log("workers connect to ws", 1, Duration::from_secs(30));
    let log = m.log();
    let at = log.find("workers connect to ws").expect("line") + "workers connect to ".len();
    let addr = log[at..]
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("addr");
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

/// What the tests do with a worker of either kind.
pub trait TestWorker: Sized {
    /// Starts the worker `name` in `root` against the worker port `port`.
    fn start(root: &Path, name: &str, password: &str, port: u16) -> Self;

    /// Starts it against `master` and waits until it is connected.
    fn connect(master: &Master, root: &Path, name: &str, password: &str) -> Self {
        let w = Self::start(root, name, password, worker_port(master));
        master.wait_for_log(&format!("connected worker={name}"), 1, CONNECT_LIMIT);
        w
    }
}

/// A worker of either kind, for tests that run against both.
pub enum AnyWorker {
    Stock(StockWorker),
    Kiln(KilnWorker),
}

impl AnyWorker {
    /// Starts kiln's worker (`kiln_worker`) or a stock one and waits until
    /// it is connected.
    pub fn connect(
        kiln_worker: bool,
        master: &Master,
        root: &Path,
        name: &str,
        password: &str,
    ) -> AnyWorker {
        if kiln_worker {
            AnyWorker::Kiln(KilnWorker::connect(master, root, name, password))
        } else {
            AnyWorker::Stock(StockWorker::connect(master, root, name, password))
        }
    }
}

/// A stock buildbot-worker in the foreground; killed when dropped.
pub struct StockWorker {
    pub child: std::process::Child,
    pub dir: PathBuf,
}

impl TestWorker for StockWorker {
    fn start(root: &Path, name: &str, password: &str, port: u16) -> StockWorker {
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
}

impl StockWorker {
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

/// Waits until each of the workers named has connected to the master.
pub fn wait_connected(master: &Master, names: &[&str]) {
    for name in names {
        master.wait_for_log(&format!("connected worker={name}"), 1, CONNECT_LIMIT);
    }
}

/// How long a worker may take to connect.
const CONNECT_LIMIT: Duration = Duration::from_secs(60);

/// Forces a build of `builder`, waits until `n` builds of the master have
/// finished, and returns every build.
pub fn force_and_wait(master: &Master, builder: &str, n: usize) -> Vec<BuildRow> {
    force_with_and_wait(master, builder, &[], n)
}

/// [`force_and_wait`] with more `kiln force` arguments.
pub fn force_with_and_wait(
    master: &Master,
    builder: &str,
    args: &[&str],
    n: usize,
) -> Vec<BuildRow> {
    force_with(master, builder, args);
    super::wait_until(
        Duration::from_secs(60),
        &format!("{n} finished build(s)"),
        || finished(&master.dir, n).then_some(()),
    );
    builds(&master.dir)
}

/// Steps as [`BuildRow::steps`] holds them, from names and results.
pub fn steps(list: &[(&str, Results)]) -> Vec<(String, Option<Results>)> {
    list.iter()
        .map(|(n, r)| (n.to_string(), Some(*r)))
        .collect()
}

pub fn force(master: &Master, builder: &str) {
    force_with(master, builder, &[]);
}

/// `kiln force` of `builder` with more arguments (`--property k=v`,
/// `--branch b`, ...), which must succeed.
pub fn force_with(master: &Master, builder: &str, args: &[&str]) {
    let url = master.http_url();
    let mut all = vec!["force", "--master", &url, builder];
    all.extend_from_slice(args);
    let out = super::kiln(&master.dir, &all, Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

pub use kiln::config::Results;

/// A build as the tests read it from the store.
#[derive(Clone, Debug, PartialEq)]
pub struct BuildRow {
    /// The build's id (unique in the master, unlike `number`).
    pub id: i64,
    pub builder: String,
    pub number: i64,
    /// The worker it ran on.
    pub worker: String,
    /// `None` while it runs.
    pub result: Option<Results>,
    pub state: String,
    /// Each step's name and result, in order.
    pub steps: Vec<(String, Option<Results>)>,
}

impl BuildRow {
    /// The steps' results, in order.
    pub fn step_results(&self) -> Vec<Option<Results>> {
        self.steps.iter().map(|s| s.1).collect()
    }

    /// The steps' names, in order.
    pub fn step_names(&self) -> Vec<&str> {
        self.steps.iter().map(|s| s.0.as_str()).collect()
    }

    /// Number, result and step names: what a build was, in short.
    pub fn summary(&self) -> (i64, Option<Results>, Vec<&str>) {
        (self.number, self.result, self.step_names())
    }

    /// The result of the step named `name`.
    pub fn step(&self, name: &str) -> Option<Results> {
        self.steps
            .iter()
            .find(|s| s.0 == name)
            .unwrap_or_else(|| panic!("no step {name} in {self:?}"))
            .1
    }
}

/// A build request's state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RequestRow {
    pub complete: bool,
    pub result: Option<Results>,
}

/// A stored result number as its name.
pub fn result_of(n: Option<i64>) -> Option<Results> {
    let n = n?;
    Some(
        Results::ALL
            .into_iter()
            .find(|r| *r as i64 == n)
            .unwrap_or_else(|| panic!("{n} is not one of Buildbot's results")),
    )
}

/// Every build, in order.
pub fn builds(dir: &Path) -> Vec<BuildRow> {
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    type Raw = (i64, String, i64, String, Option<i64>, String);
    let rows: Vec<Raw> = c
        .prepare(
            "SELECT b.id, r.name, b.number, w.name, b.results, b.state_string
             FROM builds b JOIN workers w ON w.id = b.workerid
             JOIN builders r ON r.id = b.builderid ORDER BY b.id",
        )
        .expect("prepare")
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    rows.into_iter()
        .map(|(id, builder, number, worker, results, state)| {
            let steps: Vec<(String, Option<i64>)> = c
                .prepare("SELECT name, results FROM steps WHERE buildid = ?1 ORDER BY number")
                .expect("prepare")
                .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))
                .expect("steps")
                .collect::<Result<_, _>>()
                .expect("steps");
            BuildRow {
                id,
                builder,
                number,
                worker,
                result: result_of(results),
                state,
                steps: steps.into_iter().map(|(n, r)| (n, result_of(r))).collect(),
            }
        })
        .collect()
}

pub fn stdio(dir: &Path, step: &str) -> String {
    logs_of(dir, None, step)
}

/// The stdio log of step `step` of the build with id `buildid`.
pub fn build_stdio(dir: &Path, buildid: i64, step: &str) -> String {
    logs_of(dir, Some(buildid), step)
}

fn logs_of(dir: &Path, buildid: Option<i64>, step: &str) -> String {
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    let chunks: Vec<(i64, Vec<u8>)> = c
        .prepare(
            "SELECT lc.compressed, lc.content FROM logchunks lc JOIN logs l ON l.id = lc.logid
             JOIN steps s ON s.id = l.stepid JOIN builds b ON b.id = s.buildid
             WHERE s.name = ?1 AND (?2 IS NULL OR b.id = ?2) ORDER BY lc.first_line",
        )
        .expect("prepare")
        .query_map(rusqlite::params![step, buildid], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    texts(chunks)
}

/// Stored chunks (method code, bytes) as text, decompressed.
fn texts(chunks: Vec<(i64, Vec<u8>)>) -> String {
    chunks
        .into_iter()
        .map(|(code, b)| {
            let text = kiln::store::logcodec::decompress(code, &b).expect("a chunk reads back");
            String::from_utf8_lossy(&text).into_owned()
        })
        .collect()
}

/// Every stored log chunk's text, decompressed, in the order stored.
pub fn all_log_text(dir: &Path) -> String {
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    let chunks: Vec<(i64, Vec<u8>)> = c
        .prepare("SELECT compressed, content FROM logchunks ORDER BY logid, first_line")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    texts(chunks)
}

/// Whether every request is complete and every build has finished (the
/// two are separate writes: wait for both before reading either).
pub fn all_done(dir: &Path) -> bool {
    requests(dir).iter().all(|r| r.complete) && builds(dir).iter().all(|b| b.result.is_some())
}

/// Whether at least `n` builds have finished and the master has recorded
/// what follows from them: a finished build and the completion of its
/// requests are two writes, so a request whose build has ended but which
/// is still claimed and incomplete (with no other build running for it)
/// means "not yet".
pub fn finished(dir: &Path, n: usize) -> bool {
    if builds(dir).iter().filter(|b| b.result.is_some()).count() < n {
        return false;
    }
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    let unsettled = super::scalar(&c, "SELECT count(*) FROM buildrequests r JOIN buildrequest_claims c ON c.brid = r.id
             WHERE r.complete = 0
               AND EXISTS (SELECT 1 FROM builds b WHERE b.buildrequestid = r.id AND b.complete_at IS NOT NULL)
               AND NOT EXISTS (SELECT 1 FROM builds b WHERE b.buildrequestid = r.id AND b.complete_at IS NULL)");
    unsettled == 0
}

/// A factory step that succeeds, for tests that build nothing of note.
pub const TRUE: &str = r#"f.addStep(ShellCommand(#{ command: ["true"] }));"#;

/// A master.rhai for a test, built up piece by piece: Rhai that runs
/// first (a factory `f` is declared before it), workers, builders (one
/// ForceScheduler `force` names them all), and more top-level keys. Both
/// ports are free ones.
#[derive(Clone, Default)]
pub struct Script {
    prelude: Vec<String>,
    workers: Vec<String>,
    builders: Vec<(String, String)>,
    schedulers: Vec<String>,
    keys: Vec<String>,
    /// More keys of `www` (users, authz).
    www: String,
    secrets: Vec<(String, String)>,
    no_force: bool,
    bound_to: Option<String>,
    /// The worker port as the script writes it (0, any free one, by
    /// default).
    worker_port: String,
    /// The web port as the script writes it (0 by default).
    www_port: String,
}

impl Script {
    /// A script whose factory `f` has `steps` (Rhai that adds steps to it).
    pub fn steps(steps: &str) -> Script {
        Script::default().rhai(steps)
    }

    /// More Rhai before the config map.
    pub fn rhai(mut self, code: &str) -> Script {
        self.prelude.push(code.to_string());
        self
    }

    /// `Worker(name, password)`.
    pub fn worker(self, name: &str, password: &str) -> Script {
        self.worker_expr(&format!("Worker({name:?}, {password:?})"))
    }

    /// A worker as a Rhai expression (options, secrets).
    pub fn worker_expr(mut self, expr: &str) -> Script {
        self.workers.push(expr.to_string());
        self
    }

    /// Builder `name` on `workers` with factory `f`; `more` adds keys
    /// (`"collapseRequests: false"`), or is empty.
    pub fn builder(self, name: &str, workers: &[&str], more: &str) -> Script {
        let more = if more.is_empty() {
            String::new()
        } else {
            format!(", {more}")
        };
        let expr = format!(
            "BuilderConfig(#{{ name: {name:?}, workernames: {workers:?}, factory: f{more} }})"
        );
        self.builder_expr(name, &expr)
    }

    /// A builder as a Rhai expression; `name` is for the ForceScheduler.
    pub fn builder_expr(mut self, name: &str, expr: &str) -> Script {
        self.builders.push((name.to_string(), expr.to_string()));
        self
    }

    /// A scheduler besides `force`, as a Rhai expression.
    pub fn scheduler_expr(mut self, expr: &str) -> Script {
        self.schedulers.push(expr.to_string());
        self
    }

    /// More keys inside `www` besides the port (`"auth: ..."`).
    pub fn www(mut self, more: &str) -> Script {
        self.www = format!(", {more}");
        self
    }

    /// A file `secrets/NAME` holding `value`, for `secret("NAME")`.
    pub fn secret(mut self, name: &str, value: &str) -> Script {
        self.secrets.push((name.to_string(), value.to_string()));
        self
    }

    /// A top-level key of the config map (`"prioritizeBuilders: ..."`).
    pub fn key(mut self, entry: &str) -> Script {
        self.keys.push(entry.to_string());
        self
    }

    /// Workers connect on this port (so that they find the master again
    /// after it restarts).
    pub fn worker_port(mut self, port: u16) -> Script {
        self.worker_port = port.to_string();
        self
    }

    /// The worker port as a Twisted port string (`"ssl:0:privateKey=..."`).
    pub fn worker_port_string(mut self, spec: &str) -> Script {
        self.worker_port = format!("{spec:?}");
        self
    }

    /// The web port as a Twisted port string.
    pub fn www_port_string(mut self, spec: &str) -> Script {
        self.www_port = format!("{spec:?}");
        self
    }

    /// No ForceScheduler `force`: the schedulers are the script's own.
    pub fn without_force(mut self) -> Script {
        self.no_force = true;
        self
    }

    /// The config map is bound to a variable (`let c = #{...}; c`), as the
    /// REPL shows it.
    pub fn bound_to(mut self, name: &str) -> Script {
        self.bound_to = Some(name.to_string());
        self
    }

    pub fn render(&self) -> String {
        let names: Vec<&str> = self.builders.iter().map(|b| b.0.as_str()).collect();
        let builders: Vec<&str> = self.builders.iter().map(|b| b.1.as_str()).collect();
        let mut schedulers = self.schedulers.clone();
        if !self.no_force {
            let force = format!(r#"ForceScheduler(#{{ name: "force", builderNames: {names:?} }})"#);
            schedulers.insert(0, force);
        }
        let keys: String = self.keys.iter().map(|k| format!("    {k},\n")).collect();
        let map = format!(
            "#{{\n    \
             protocols: #{{ msgpack_experimental_v7: #{{ port: {port} }} }},\n    \
             www: #{{ port: {www_port}{www} }},\n    \
             workers: [{workers}],\n    \
             schedulers: [{schedulers}],\n    \
             builders: [{builders}],\n{keys}}}",
            www = self.www,
            www_port = if self.www_port.is_empty() {
                "0"
            } else {
                &self.www_port
            },
            port = if self.worker_port.is_empty() {
                "0"
            } else {
                &self.worker_port
            },
            workers = self.workers.join(", "),
            schedulers = schedulers.join(", "),
            builders = builders.join(",\n        "),
        );
        let prelude = self.prelude.join("\n");
        match &self.bound_to {
            None => format!("let f = BuildFactory();\n{prelude}\n{map}\n"),
            Some(v) => format!("let f = BuildFactory();\n{prelude}\nlet {v} = {map};\n{v}\n"),
        }
    }

    /// The master directory `root/master` with this script.
    pub fn write(&self, root: &Path) -> PathBuf {
        self.write_to(&root.join("master"))
    }

    /// The master directory `dir` with this script.
    pub fn write_to(&self, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).expect("mkdir");
        std::fs::write(dir.join("master.rhai"), self.render()).expect("master.rhai");
        let dir = dir.to_path_buf();
        for (name, value) in &self.secrets {
            write_secret(&dir, name, value);
        }
        dir
    }
}

/// The master script most build tests need: `steps` (Rhai that adds
/// steps to the factory `f`), free ports, worker w1 (password pw-one), a
/// ForceScheduler `force`, and builder `b` on w1.
pub fn one_builder(steps: &str) -> Script {
    Script::steps(steps)
        .worker("w1", "pw-one")
        .builder("b", &["w1"], "")
}

/// The file `secrets/NAME` of a master dir, for `secret("NAME")`.
pub fn write_secret(dir: &Path, name: &str, value: &str) {
    std::fs::create_dir_all(dir.join("secrets")).expect("mkdir secrets");
    std::fs::write(dir.join("secrets").join(name), value).expect("secret");
}

/// A master dir from a whole master.rhai (workers w1/pw-one and w2/pw-two
/// are for the test to declare).
pub fn master_script(root: &Path, script: &str) -> PathBuf {
    let dir = root.join("master");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("master.rhai"), script).expect("master.rhai");
    dir
}

/// Every build request's state, in order.
pub fn requests(dir: &Path) -> Vec<RequestRow> {
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    let rows: Vec<(i64, Option<i64>)> = c
        .prepare("SELECT complete, results FROM buildrequests ORDER BY id")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    rows.into_iter()
        .map(|(complete, results)| RequestRow {
            complete: complete != 0,
            result: result_of(results),
        })
        .collect()
}

/// A complete request with this result.
pub fn done(result: Results) -> RequestRow {
    RequestRow {
        complete: true,
        result: Some(result),
    }
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

impl TestWorker for KilnWorker {
    fn start(root: &Path, name: &str, password: &str, port: u16) -> KilnWorker {
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
