//! HgPoller in pushlog mode. Mercurial's own `hg serve` has no
//! `json-pushes`, so a small server here answers in the real format (both
//! versions), from the changesets of a real repository grouped into pushes,
//! and can be told to fail in the ways hg.mozilla.org does.

use crate::common;
use crate::common::assert_has;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use common::workers::{Script, TRUE};
use common::{hg_commit, kiln, run};

#[derive(Clone, Copy, PartialEq, Debug)]
enum Fault {
    None,
    /// HTTP 500 with a plain error page.
    ServerError,
    /// The body ends in the middle of the JSON.
    Truncated,
    /// No answer for 5 s.
    Hang,
    /// 200 with an HTML page (a proxy's or a login page) instead of JSON.
    HtmlPage,
}

struct Pushlog {
    version: u8,
    fault: Fault,
    /// (push id, date, pusher, changesets as `hg log -Tjson` objects)
    pushes: Vec<(i64, i64, String, Vec<Value>)>,
    requests: Vec<BTreeMap<String, String>>,
}

type Shared = Arc<Mutex<Pushlog>>;

fn push_json(date: i64, user: &str, csets: &[Value]) -> Value {
    json!({
        "date": date,
        "user": user,
        "changesets": csets.iter().map(|c| json!({
            "node": c["node"],
            "author": c["user"],
            "branch": c["branch"],
            "desc": c["desc"],
            "files": c["files"],
            "tags": c["tags"],
            "parents": c["parents"],
        })).collect::<Vec<_>>(),
    })
}

async fn json_pushes(
    State(st): State<Shared>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let fault = st.lock().unwrap_or_else(|e| e.into_inner()).fault;
    if fault == Fault::Hang {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let mut p = st.lock().unwrap_or_else(|e| e.into_inner());
    p.requests.push(q.clone());
    match p.fault {
        Fault::ServerError => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                "<h1>Internal Server Error</h1>",
            )
                .into_response()
        }
        Fault::Truncated => {
            return (StatusCode::OK, "{\"1\": {\"date\": 12, \"user\": ").into_response()
        }
        Fault::HtmlPage => {
            return (
                StatusCode::OK,
                [("content-type", "text/html")],
                "<html><body>Please sign in</body></html>",
            )
                .into_response()
        }
        Fault::None | Fault::Hang => {}
    }
    let selected: Vec<&(i64, i64, String, Vec<Value>)> = if let Some(from) = q.get("fromchange") {
        let Some(i) = p
            .pushes
            .iter()
            .position(|(_, _, _, cs)| cs.iter().any(|c| c["node"] == from.as_str()))
        else {
            // What hg.mozilla.org answers for a node it does not have.
            return (
                StatusCode::NOT_FOUND,
                axum::Json(json!({ "error": format!("unknown revision '{from}'") })),
            )
                .into_response();
        };
        p.pushes[i + 1..].iter().collect()
    } else if let Some(start) = q.get("startID").and_then(|s| s.parse::<i64>().ok()) {
        p.pushes.iter().filter(|(id, ..)| *id > start).collect()
    } else {
        // Like hg.mozilla.org: the last 10 pushes.
        let n = p.pushes.len();
        p.pushes[n.saturating_sub(10)..].iter().collect()
    };
    let mut map = serde_json::Map::new();
    // Newest first, to show that order comes from the dates, not the map.
    for (id, date, user, cs) in selected.iter().rev() {
        map.insert(id.to_string(), push_json(*date, user, cs));
    }
    let body = if p.version == 2 && q.get("version").map(String::as_str) == Some("2") {
        json!({ "lastpushid": p.pushes.last().map(|x| x.0).unwrap_or(0), "pushes": map })
    } else {
        Value::Object(map)
    };
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// The server on 127.0.0.1:0 in its own runtime thread; stops when dropped.
struct Server {
    url: String,
    state: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(version: u8) -> Server {
        let state: Shared = Arc::new(Mutex::new(Pushlog {
            version,
            fault: Fault::None,
            pushes: vec![],
            requests: vec![],
        }));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let app = axum::Router::new()
                    .route("/repo/json-pushes", axum::routing::get(json_pushes))
                    .with_state(st);
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                addr_tx
                    .send(listener.local_addr().expect("addr"))
                    .expect("send addr");
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop_rx.await;
                    })
                    .await
                    .expect("serve");
            });
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server address");
        Server {
            url: format!("http://{addr}/"),
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn set(&self, f: impl FnOnce(&mut Pushlog)) {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn last_request(&self) -> BTreeMap<String, String> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .requests
            .last()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A real repository; `push` commits changesets and records them as one push.
struct Repo {
    path: std::path::PathBuf,
    next_id: i64,
}

impl Repo {
    fn new(root: &Path) -> Repo {
        let path = root.join("upstream");
        std::fs::create_dir_all(&path).expect("mkdir");
        run(&path, "hg", &["init", "-q"]);
        Repo { path, next_id: 1 }
    }

    /// Commits (author, named branch, files, message) and pushes them as one push.
    fn push(
        &mut self,
        server: &Server,
        user: &str,
        commits: &[(&str, &str, &[&str], &str)],
    ) -> Vec<String> {
        let mut nodes = vec![];
        for (author, branch, files, msg) in commits {
            run(&self.path, "hg", &["branch", "-q", "-f", branch]);
            nodes.push(hg_commit(&self.path, author, files, msg));
        }
        let revset = nodes.join("+");
        let csets: Vec<Value> = serde_json::from_str(&run(
            &self.path,
            "hg",
            &["log", "-v", "-r", &revset, "-T", "json"],
        ))
        .expect("hg log json");
        let id = self.next_id;
        self.next_id += 1;
        server.set(|p| p.pushes.push((id, 1_000 * id, user.to_string(), csets)));
        nodes
    }

    /// One changeset on `default` touching `file`, pushed alone.
    fn push1(&mut self, server: &Server, user: &str, file: &str, msg: &str) -> String {
        let mut nodes = self.push(server, user, &[("A <a@x>", "default", &[file], msg)]);
        nodes.remove(0)
    }
}

/// A pushlog server (answering in `version`'s form) whose repository has
/// one push, and a master polling it with HgPoller `options`.
struct Setup {
    tmp: tempfile::TempDir,
    server: Server,
    repo: Repo,
    dir: std::path::PathBuf,
    /// The changeset of the first push.
    base: String,
}

impl Setup {
    fn new(version: u8, options: &str) -> Setup {
        let tmp = tempfile::tempdir().expect("tmp");
        let server = Server::start(version);
        let mut repo = Repo::new(tmp.path());
        let base = repo.push1(&server, "first@m.org", "a.c", "base");
        let dir = master(tmp.path(), &server, options);
        Setup {
            tmp,
            server,
            repo,
            dir,
            base,
        }
    }

    /// A first poll, which only notes where the poller starts.
    fn started(version: u8, options: &str) -> Setup {
        let s = Setup::new(version, options);
        let (code, log) = poll(&s.dir);
        assert_eq!(code, 0, "{log}");
        s
    }

    fn push(&mut self, user: &str, commits: &[(&str, &str, &[&str], &str)]) -> Vec<String> {
        self.repo.push(&self.server, user, commits)
    }

    fn push1(&mut self, user: &str, file: &str, msg: &str) -> String {
        self.repo.push1(&self.server, user, file, msg)
    }
}

fn master(root: &Path, server: &Server, options: &str) -> std::path::PathBuf {
    Script::steps(TRUE)
        .worker_expr(r#"Worker("w1", secret("pw"))"#)
        .key(&format!(
            r#"change_source: [HgPoller(#{{ hgURL: "{}", branch: "repo", pollInterval: 1, {options} }})]"#,
            server.url
        ))
        .builder("b", &["w1"], "")
        .secret("pw", "pw")
        .write(root)
}

fn poll(dir: &Path) -> (i32, String) {
    let out = kiln(dir, &["poll", "."], Duration::from_secs(120));
    (out.code.unwrap_or(-1), out.stderr)
}

/// The revisions of the stored changes, oldest first.
fn stored_revisions(dir: &Path) -> Vec<String> {
    common::revisions(&stored(dir))
}

/// The stored changes; each is on the poller's branch.
fn stored(dir: &Path) -> Vec<common::ChangeRow> {
    let rows = common::changes(dir);
    for r in &rows {
        assert_eq!(
            r.branch.as_deref(),
            Some("repo"),
            "a change's branch is the poller's branch"
        );
    }
    rows
}

fn pushes_are_read_in_both_answer_forms(version: u8) {
    let mut s = Setup::new(version, "");
    let (code, log) = poll(&s.dir);
    assert_eq!(code, 0, "{log}");
    assert_has(&log, &format!("starting after {}", s.base));
    assert!(!s.server.last_request().contains_key("fromchange"));

    let p2 = s.push(
        "pusher@m.org",
        &[
            ("B <b@x>", "default", &["x.c", "y.c"], "Bug 2 - two"),
            ("C <c@x>", "GECKO_REL", &["rel.c"], "on a relbranch"),
            ("D <d@x>", "default", &["z.c"], "Bug 3 - three"),
        ],
    );
    let p3 = s.push1("late@m.org", "w.c", "Bug 4 - four");
    let (code, log) = poll(&s.dir);
    assert_eq!(code, 0, "{log}");
    assert_eq!(s.server.last_request().get("fromchange"), Some(&s.base));
    assert_has(
        &log,
        "skipped 1 changeset(s) on named branches other than default",
    );

    let rows = stored(&s.dir);
    assert_eq!(
        common::revisions(&rows),
        [p2[0].clone(), p2[2].clone(), p3.clone()]
    );
    let first = &rows[0];
    assert_eq!(first.author, "pusher@m.org");
    assert_eq!(first.comments, "Bug 2 - two");
    assert_eq!(first.files, ["x.c", "y.c"]);
    assert_eq!(first.properties["changeset_author"], "B <b@x>");
    assert_eq!(first.properties["named_branch"], "default");
    assert_eq!(first.properties["pushid"], 2);
    assert_eq!(rows[2].properties["pushid"], 3);

    // The relbranch changeset still moved the poller on.
    let (code, log) = poll(&s.dir);
    assert_eq!(code, 0, "{log}");
    assert_eq!(s.server.last_request().get("fromchange"), Some(&p3));
    assert_eq!(stored(&s.dir).len(), 3);
}

#[test]
fn version_1_answers() {
    pushes_are_read_in_both_answer_forms(1);
}

#[test]
fn version_2_answers() {
    pushes_are_read_in_both_answer_forms(2);
}

#[test]
fn tips_only_and_max_changes_over_the_pushlog() {
    let mut s = Setup::started(2, "tipsOnly: true, maxChanges: 2");
    s.push1("p1@m.org", "one", "one");
    let p2 = s.push(
        "p2@m.org",
        &[
            ("B <b@x>", "default", &["dom/a.cpp"], "code"),
            ("C <c@x>", "default", &["README"], "docs"),
        ],
    );
    let p3 = s.push1("p3@m.org", "three", "three");
    let (code, log) = poll(&s.dir);
    assert_eq!(code, 0, "{log}");
    assert_has(&log, "1 change(s) left out: more than maxChanges (2)");
    let rows = stored(&s.dir);
    // The newest two pushes, one change each (the tip); the tip of push 2
    // carries the files of the whole push.
    assert_eq!(stored_revisions(&s.dir), [p2[1].clone(), p3]);
    assert_eq!(rows[0].files, ["dom/a.cpp", "README"]);
    assert_eq!(rows[0].author, "p2@m.org");
}

#[test]
fn errors_store_nothing_and_the_poller_recovers() {
    let mut s = Setup::started(1, "");
    let one = s.push1("p@m.org", "b", "one");

    s.server.set(|p| p.fault = Fault::ServerError);
    let (code, log) = poll(&s.dir);
    assert_eq!(code, 1);
    assert_has(&log, "answered 500 Internal Server Error");
    assert!(
        log.contains(&s.server.url),
        "the repository is named: {log}"
    );

    s.server.set(|p| p.fault = Fault::Truncated);
    let (code, log) = poll(&s.dir);
    assert_eq!(code, 1);
    assert_has(&log, "malformed answer from");
    assert_eq!(stored(&s.dir).len(), 0);

    s.server.set(|p| p.fault = Fault::None);
    let (code, log) = poll(&s.dir);
    assert_eq!(code, 0, "{log}");
    assert_eq!(stored_revisions(&s.dir), [one]);

    // The server goes away: a clear error, nothing stored.
    let Setup { server, dir, .. } = s;
    let url = server.url.clone();
    drop(server);
    let (code, log) = poll(&dir);
    assert_eq!(code, 1);
    assert_has(&log, &format!("cannot reach {url}repo/json-pushes"));
    assert_eq!(stored(&dir).len(), 1);
}

#[test]
fn a_stripped_repository_is_reported_afresh_within_max_changes() {
    let mut s = Setup::started(2, "maxChanges: 2");

    // The server's history is replaced: the node kiln last saw is gone.
    s.server.set(|p| p.pushes.clear());
    s.repo.next_id = 1;
    let a = s.push1("p@m.org", "x1", "new one");
    let b = s.push1("p@m.org", "x2", "new two");
    let c = s.push1("p@m.org", "x3", "new three");
    let (code, log) = poll(&s.dir);
    assert_eq!(code, 0, "{log}");
    assert_has(&log, "no longer has");
    let revs = stored_revisions(&s.dir);
    assert_eq!(revs, [b, c.clone()]);
    assert!(!revs.contains(&a));
    // And from there on, as usual.
    assert_eq!(poll(&s.dir).0, 0);
    assert_eq!(s.server.last_request().get("fromchange"), Some(&c));
}

/// The poller through the library: a hanging server times out (here after
/// 1 s instead of the default 30), and stored changes reach the bus.
#[test]
fn a_hanging_server_times_out_and_stored_changes_reach_the_bus() {
    let mut s = Setup::new(2, "");
    let server_url = s.server.url.clone();
    let cfg = kiln::config::HgPoller {
        hg_url: server_url,
        branch: "repo".into(),
        pushlog_url_override: None,
        tips_only: false,
        max_changes: 100,
        repo_branch: Some("default".into()),
        poll_interval: 1,
        store_rev: Some("got_revision".into()),
        category: None,
        project: Some("firefox".into()),
        origin: None,
    };
    let rt = common::runtime();
    rt.block_on(async {
        let store = kiln::store::Store::open(&s.tmp.path().join("state.sqlite")).expect("store");
        let mut rx = store.change_bus().subscribe();
        let mut ctx = kiln::changes::Context::new(store, s.tmp.path()).expect("context");
        ctx.timeout = Duration::from_secs(1);
        let mut poller = kiln::changes::Poller::new(&kiln::config::ChangeSource::HgPoller(cfg));
        assert_eq!(poller.poll(&ctx).await.expect("first poll"), 0);

        let one = s.push1("p@m.org", "b", "one");
        s.server.set(|p| p.fault = Fault::Hang);
        let started = std::time::Instant::now();
        let err = format!("{:#}", poller.poll(&ctx).await.expect_err("a timeout"));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "bounded by the timeout"
        );
        assert!(
            err.contains("cannot reach") && err.contains("json-pushes"),
            "{err}"
        );
        assert!(rx.try_recv().is_err(), "nothing published");

        s.server.set(|p| p.fault = Fault::None);
        assert_eq!(poller.poll(&ctx).await.expect("poll"), 1);
        let change = rx.try_recv().expect("published");
        assert_eq!(change.change.revision.as_deref(), Some(one.as_str()));
        assert_eq!(change.change.project, "firefox");
        assert_eq!(change.change.properties["got_revision"].0, one.as_str());
        assert!(change.changeid > 0);
    });
}

/// A running master whose pushlog server fails in turn with a 500, an
/// HTML page and a truncated answer while pushes land: it stays up, backs
/// off, shows the failure per change source (API, metrics), and once the
/// server answers again stores every push exactly once.
#[test]
fn a_running_master_shows_a_failing_pushlog_and_stores_every_push_once_when_it_recovers() {
    let mut s = Setup::new(2, "");
    let mut master = common::Master::start(&s.dir);
    let url = master.http_url();
    let sources = || -> Value {
        serde_json::from_str(&common::http_get(&format!("{url}/api/v2/changesources")))
            .expect("json")
    };
    common::wait_until(Duration::from_secs(60), "a first poll", || {
        (sources()["changesources"][0]["state"] == "ok").then_some(())
    });
    let mut pushed = vec![];
    for (fault, says) in [
        (Fault::ServerError, "500 Internal Server Error"),
        (Fault::HtmlPage, "malformed answer from"),
        (Fault::Truncated, "malformed answer from"),
    ] {
        s.server.set(|p| p.fault = fault);
        pushed.push(s.push1("p@m.org", "b", &format!("during {fault:?}")));
        let (status, _) = common::post_form(&format!("{url}/change_hook/poller"), &[]);
        assert_eq!(status, 200);
        let failing = common::wait_until(Duration::from_secs(60), says, || {
            let v = sources()["changesources"][0].clone();
            (v["state"] == "failing" && v["last_error"].as_str().is_some_and(|e| e.contains(says)))
                .then_some(v)
        });
        assert!(failing["failing_since"].as_i64().is_some(), "{failing}");
        assert!(failing["retry_at"].as_i64().is_some(), "{failing}");
        assert_eq!(stored(&s.dir).len(), 0, "a failed poll stores nothing");
    }
    let metrics = common::http_get(&format!("{url}/metrics"));
    let errors: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kiln_poll_errors_total{source=\"HgPoller "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("poll errors in\n{metrics}"));
    assert!(errors >= 3, "{metrics}");

    s.server.set(|p| p.fault = Fault::None);
    let (status, _) = common::post_form(&format!("{url}/change_hook/poller"), &[]);
    assert_eq!(status, 200);
    common::wait_until(Duration::from_secs(60), "the pushes stored", || {
        (stored(&s.dir).len() == 3).then_some(())
    });
    assert_eq!(stored_revisions(&s.dir), pushed);
    let ok = sources()["changesources"][0].clone();
    assert_eq!(ok["state"], "ok", "{ok}");
    assert_eq!(ok["last_error"], Value::Null, "{ok}");
    // Polling on asks the server again and stores nothing more.
    let asked = || {
        s.server
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .requests
            .len()
    };
    let before = asked();
    let (status, _) = common::post_form(&format!("{url}/change_hook/poller"), &[]);
    assert_eq!(status, 200);
    common::wait_until(Duration::from_secs(60), "another poll", || {
        (asked() > before).then_some(())
    });
    common::holds_for(Duration::from_secs(2), "no push stored twice", || {
        stored_revisions(&s.dir) == pushed
    });
    assert_eq!(master.stop(), Some(0));
}
