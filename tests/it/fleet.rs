//! Several masters on one PostgreSQL database (`multiMaster`): a master
//! killed mid-build is declared dead by the others, its build ends RETRY
//! and runs again on another master's worker; a clean stop is seen at once.

use crate::common;
use crate::common::assert_has;
use crate::common::kiln_ok;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::workers::*;
use common::{http_get, sse_until, wait_until, Master};
use kiln_testpg::PgServer;
use serde_json::Value;

fn get(url: &str) -> Value {
    serde_json::from_str(&http_get(url)).unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// Master `name` of the fleet: builder `b` on workers w1..w3 (each
/// connects to one master), its one step waiting for `release` to exist.
fn fleet_master(root: &Path, name: &str, db_url: &str, release: &Path) -> PathBuf {
    fleet_script(name, db_url)
        .rhai(&format!(
            r#"f.addStep(ShellCommand(#{{ name: "wait", command: ["sh", "-c", "while [ ! -e {} ]; do sleep 0.05; done; echo released"] }}));"#,
            release.display()
        ))
        .worker("w1", "pw")
        .worker("w2", "pw")
        .worker("w3", "pw")
        .builder("b", &["w1", "w2", "w3"], "")
        .write_to(&root.join(name))
}

/// A script for master `name` of a fleet on `db_url` (heartbeat 1 s, dead
/// after 3).
fn fleet_script(name: &str, db_url: &str) -> Script {
    Script::default()
        .key(&format!(r#"masterName: "{name}""#))
        .key("multiMaster: #{ heartbeat: 1, dead_after: 3 }")
        .key(&format!(r#"db: #{{ db_url: "{db_url}" }}"#))
}

/// A PostgreSQL server with an empty database, a temp dir and the path of
/// the file that releases the fleet's builds.
struct Fleet {
    tmp: tempfile::TempDir,
    /// Kept running until the test ends.
    _server: PgServer,
    db: String,
    release: PathBuf,
}

impl Fleet {
    fn new() -> Fleet {
        let tmp = tempfile::tempdir().expect("tmp");
        let server = PgServer::start();
        let db = server.create_db("fleet");
        let release = tmp.path().join("release");
        Fleet {
            tmp,
            _server: server,
            db,
            release,
        }
    }

    /// Master `m<i>` (of `fleet_master`), started.
    fn master(&self, i: usize) -> Master {
        Master::start(&fleet_master(
            self.tmp.path(),
            &format!("m{i}"),
            &self.db,
            &self.release,
        ))
    }

    /// Worker `w<i>` connected to `master`.
    fn worker(&self, master: &Master, i: usize) -> KilnWorker {
        KilnWorker::connect(master, &master.dir, &format!("w{i}"), "pw")
    }
}

/// `/api/v2/masters` as (name, active).
fn masters(url: &str) -> Vec<(String, bool)> {
    get(&format!("{url}/api/v2/masters"))["masters"]
        .as_array()
        .expect("masters")
        .iter()
        .map(|m| {
            (
                m["name"].as_str().expect("name").to_string(),
                m["active"].as_bool().expect("active"),
            )
        })
        .collect()
}

#[test]
fn a_killed_masters_build_ends_retry_and_runs_again_on_another_and_a_clean_stop_is_seen_at_once() {
    let f = Fleet::new();
    let release = f.release.clone();
    let mut fleet: Vec<(Master, KilnWorker)> = (1..=3)
        .map(|i| {
            let master = f.master(i);
            let worker = f.worker(&master, i);
            (master, worker)
        })
        .collect();
    let url = fleet[1].0.http_url();
    assert_eq!(
        masters(&url),
        [
            ("m1".into(), true),
            ("m2".into(), true),
            ("m3".into(), true)
        ]
    );

    // A build starts on some master; that master dies mid-build.
    force(&fleet[0].0, "b");
    let first = wait_until(Duration::from_secs(60), "a running build", || {
        let b = get(&format!("{url}/api/v2/builds?complete=false"));
        b["builds"].as_array().and_then(|a| a.first()).cloned()
    });
    let runner = get(&format!("{url}/api/v2/masters/{}", first["masterid"]))["masters"][0]["name"]
        .as_str()
        .expect("name")
        .to_string();
    let i: usize = runner[1..].parse().expect("m<i>");
    let (mut dead, dead_worker) = fleet.remove(i - 1);
    dead.kill();
    drop(dead_worker);
    let url = fleet[0].0.http_url();

    // Declared dead within dead_after (3 s) and a heartbeat or two; the
    // build ends RETRY and its request runs again on a live master.
    let retried = wait_until(Duration::from_secs(30), "the build to end RETRY", || {
        let b = get(&format!("{url}/api/v2/builds/{}", first["buildid"]));
        (b["builds"][0]["results"] == 5).then(|| b["builds"][0].clone())
    });
    assert_eq!(
        retried["state_string"],
        format!("retry: master {runner} stopped answering")
    );
    assert!(
        masters(&url).contains(&(runner.clone(), false)),
        "{:?}",
        masters(&url)
    );
    let again = wait_until(
        Duration::from_secs(30),
        "the request's second build",
        || {
            let b = get(&format!(
                "{url}/api/v2/builds?buildrequestid={}&complete=false",
                first["buildrequestid"]
            ));
            b["builds"].as_array().and_then(|a| a.first()).cloned()
        },
    );
    assert_ne!(again["masterid"], first["masterid"]);
    std::fs::write(&release, "").expect("release");
    wait_until(Duration::from_secs(60), "the request to complete", || {
        let r = get(&format!(
            "{url}/api/v2/buildrequests/{}",
            first["buildrequestid"]
        ));
        (r["buildrequests"][0]["complete"] == true).then_some(())
    });
    let builds = get(&format!(
        "{url}/api/v2/builds?buildrequestid={}&order=buildid",
        first["buildrequestid"]
    ));
    let results: Vec<&Value> = builds["builds"]
        .as_array()
        .expect("builds")
        .iter()
        .map(|b| &b["results"])
        .collect();
    assert_eq!(
        results,
        [&Value::from(5), &Value::from(0)],
        "one RETRY, then one SUCCESS"
    );

    // A clean stop deregisters at once.
    let (mut stopped, _w) = fleet.remove(0);
    let name = stopped
        .dir
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert_eq!(stopped.stop(), Some(0));
    let url = fleet[0].0.http_url();
    assert!(
        masters(&url).contains(&(name, false)),
        "{:?}",
        masters(&url)
    );
}

#[test]
fn a_request_made_on_one_master_builds_at_once_on_another_and_both_event_streams_show_it() {
    let f = Fleet::new();
    std::fs::write(&f.release, "").expect("release");
    let (ma, mb) = (f.master(1), f.master(2));
    // Only m2 has a worker: m1 makes the request, m2 builds it.
    let _w2 = f.worker(&mb, 2);
    let url = ma.http_url();
    let events = sse_until(
        &format!("{url}/api/v2/events?topics=builds"),
        Duration::from_secs(60),
        || force(&ma, "b"),
        |evs| evs.iter().any(|(_, d)| d["event"] == "finished"),
    );
    let builds: Vec<&Value> = events.iter().map(|(_, d)| d).collect();
    assert!(
        builds.iter().any(|d| d["event"] == "new"),
        "m1's stream shows the build m2 started: {builds:?}"
    );
    let done = builds
        .iter()
        .find(|d| d["event"] == "finished")
        .expect("finished");
    assert_eq!(done["data"]["results"], 0, "{done}");
    let m2 = get(&format!("{url}/api/v2/masters/m2"));
    assert_eq!(
        done["data"]["masterid"], m2["masters"][0]["masterid"],
        "{done}"
    );
}

/// Master `name` polling the hg repository `repo` with a change-driven
/// scheduler for builder `b` (no workers: the requests wait).
fn polling_master(root: &Path, name: &str, db_url: &str, repo: &Path) -> PathBuf {
    fleet_script(name, db_url)
        .rhai(TRUE)
        .key(&format!(
            r#"change_source: [HgPoller(#{{ hgURL: "{}", branch: "", pollInterval: 1 }})]"#,
            repo.display()
        ))
        .without_force()
        .scheduler_expr(
            r#"Scheduler(#{ name: "on-push", branch: (), treeStableTimer: (), builderNames: ["b"] })"#,
        )
        .worker("w1", "pw")
        .builder("b", &["w1"], "")
        .write_to(&root.join(name))
}

/// (changes, buildsets) the fleet stored, by revision.
fn stored(url: &str) -> (Vec<String>, usize) {
    let changes = get(&format!("{url}/api/v2/changes?order=changeid"));
    let revs = changes["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| c["revision"].as_str().unwrap_or_default().to_string())
        .collect();
    let buildsets = get(&format!("{url}/api/v2/buildsets"));
    (
        revs,
        buildsets["meta"]["total"].as_u64().unwrap_or(0) as usize,
    )
}

#[test]
fn one_master_at_a_time_polls_and_schedules_and_another_takes_over_when_it_dies() {
    let f = Fleet::new();
    let (tmp, db) = (&f.tmp, &f.db);
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(&repo).expect("mkdir");
    common::run(&repo, "hg", &["init", "-q"]);
    common::hg_commit(&repo, "a <a@x>", &["base"], "base");
    let mut m1 = Master::start(&polling_master(tmp.path(), "m1", db, &repo));
    m1.wait_for_log("master running", 1, Duration::from_secs(30));
    // m1 started first and holds both leases; m2 waits with them.
    let m2 = Master::start(&polling_master(tmp.path(), "m2", db, &repo));
    let url2 = m2.http_url();
    m2.wait_for_log("runs 0 of the 2 clustered", 1, Duration::from_secs(30));
    // The first poll takes the repository's tip as seen.
    m1.wait_for_log("first poll", 1, Duration::from_secs(30));

    let mut revs = vec![];
    for i in 0..3 {
        revs.push(common::hg_commit(
            &repo,
            "a <a@x>",
            &["f"],
            &format!("push {i}"),
        ));
        wait_until(Duration::from_secs(30), "the push to be built", || {
            (stored(&url2) == (revs.clone(), revs.len())).then_some(())
        });
    }
    m1.kill();
    // While m1 is silent, nobody polls; m2 takes over within dead_after.
    revs.push(common::hg_commit(
        &repo,
        "a <a@x>",
        &["f"],
        "while m1 is dead",
    ));
    m2.wait_for_log(
        "took the lease of change_source:",
        1,
        Duration::from_secs(30),
    );
    m2.wait_for_log(
        "took the lease of scheduler:on-push",
        1,
        Duration::from_secs(30),
    );
    revs.push(common::hg_commit(&repo, "a <a@x>", &["f"], "after"));
    wait_until(Duration::from_secs(30), "m2 to store both pushes", || {
        (stored(&url2).0.len() == revs.len()).then_some(())
    });
    // Every push once, as a change and as a buildset; none twice.
    wait_until(Duration::from_secs(30), "a buildset per push", || {
        (stored(&url2).1 >= revs.len()).then_some(())
    });
    assert_eq!(stored(&url2), (revs.clone(), revs.len()), "{}", m2.log());
}

#[test]
fn stop_and_cancel_sent_to_one_master_stop_a_build_running_on_another() {
    // Nothing releases the step: only a stop ends it.
    let f = Fleet::new();
    let (ma, mb) = (f.master(1), f.master(2));
    let _w2 = f.worker(&mb, 2);
    let url = ma.http_url();
    let running = |n: usize| {
        wait_until(Duration::from_secs(60), "a build running on m2", || {
            let v = get(&format!("{url}/api/v2/builds?complete=false&order=buildid"));
            let list = v["builds"].as_array().cloned().unwrap_or_default();
            (list.len() == n).then(|| list[n - 1].clone())
        })
    };
    let ended = |id: &Value| {
        wait_until(Duration::from_secs(60), "the build to end", || {
            let v = get(&format!("{url}/api/v2/builds/{id}"));
            (v["builds"][0]["complete"] == true).then(|| v["builds"][0]["results"].clone())
        })
    };
    let post = |path: String, method: &str| {
        let (code, body) = common::http(
            "POST",
            &format!("{url}{path}"),
            None,
            &[("Content-Type", "application/json")],
            common::Body::Json(serde_json::json!({
                "jsonrpc": "2.0", "id": 1, "method": method, "params": { "reason": "enough" }
            })),
        );
        assert_eq!(code, 200, "{body}");
        body
    };

    // Stop, sent to m1, of a build that m2 runs.
    force(&ma, "b");
    let first = running(1);
    post(format!("/api/v2/builds/{}", first["buildid"]), "stop");
    assert_eq!(ended(&first["buildid"]), 6, "CANCELLED");

    // Cancel, sent to m1, of a request that m2 builds.
    force(&ma, "b");
    let second = running(1);
    let body = post(
        format!("/api/v2/buildrequests/{}", second["buildrequestid"]),
        "cancel",
    );
    assert_has(&body, "on master m2");
    assert_eq!(ended(&second["buildid"]), 6, "CANCELLED");
    // The request is completed just after its build ends.
    let request = format!("{url}/api/v2/buildrequests/{}", second["buildrequestid"]);
    let r = wait_until(Duration::from_secs(30), "the request to complete", || {
        let r = get(&request);
        (r["buildrequests"][0]["complete"] == true).then_some(r)
    });
    assert_eq!(r["buildrequests"][0]["results"], 6, "{r}");
}

#[test]
fn a_scheduler_master_without_builders_makes_requests_that_a_build_master_builds() {
    let f = Fleet::new();
    std::fs::write(&f.release, "").expect("release");
    // The scheduler master names builder `b`, which only m1 has.
    let sched = f.tmp.path().join("scheduler");
    std::fs::create_dir_all(&sched).expect("mkdir");
    std::fs::write(
        sched.join("master.rhai"),
        format!(
            r#"#{{
    masterName: "scheduler",
    multiMaster: #{{ heartbeat: 1, dead_after: 3 }},
    db: #{{ db_url: "{}" }},
    www: #{{ port: 0 }},
    schedulers: [ForceScheduler(#{{ name: "force", builderNames: ["b"] }})],
}}
"#,
            f.db
        ),
    )
    .expect("master.rhai");
    kiln_ok(&sched, &["checkconfig", "."]);
    let scheduler = Master::start(&sched);
    let builder = f.master(1);
    let _w1 = f.worker(&builder, 1);
    force(&scheduler, "b");
    let url = scheduler.http_url();
    let build = wait_until(Duration::from_secs(60), "the build", || {
        let v = get(&format!("{url}/api/v2/builds?complete=true"));
        v["builds"].as_array().and_then(|a| a.first()).cloned()
    });
    assert_eq!(build["results"], 0, "{build}");
    let m1 = get(&format!("{url}/api/v2/masters/m1"));
    assert_eq!(build["masterid"], m1["masters"][0]["masterid"]);
}

#[test]
fn a_trigger_step_waits_for_builds_that_another_master_runs() {
    let f = Fleet::new();
    let write = |name: &str, body: &str| {
        let dir = f.tmp.path().join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let head = format!(
            r#"masterName: "{name}", multiMaster: #{{ heartbeat: 1, dead_after: 3 }}, db: #{{ db_url: "{}" }},
    protocols: #{{ msgpack_experimental_v7: #{{ port: 0 }} }}, www: #{{ port: 0 }},"#,
            f.db
        );
        std::fs::write(dir.join("master.rhai"), body.replace("HEAD", &head)).expect("master.rhai");
        dir
    };
    // m1 runs the parent, whose Trigger step waits; only m2 has the child.
    let a = write(
        "m1",
        r#"let parent = BuildFactory();
parent.addStep(Trigger(#{ name: "trigger", schedulerNames: ["tr"], waitForFinish: true }));
#{ HEAD
    workers: [Worker("w1", "pw")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["parent"] }),
                 Triggerable(#{ name: "tr", builderNames: ["child"] })],
    builders: [BuilderConfig(#{ name: "parent", workernames: ["w1"], factory: parent })],
}"#,
    );
    let b = write(
        "m2",
        r#"let child = BuildFactory();
child.addStep(ShellCommand(#{ name: "child", command: ["sh", "-c", "sleep 1; echo child"] }));
#{ HEAD
    workers: [Worker("w2", "pw")],
    builders: [BuilderConfig(#{ name: "child", workernames: ["w2"], factory: child })],
}"#,
    );
    let (ma, mb) = (Master::start(&a), Master::start(&b));
    let _w1 = KilnWorker::connect(&ma, &a, "w1", "pw");
    let _w2 = KilnWorker::connect(&mb, &b, "w2", "pw");
    force(&ma, "parent");
    let url = ma.http_url();
    let builds = wait_until(Duration::from_secs(60), "both builds to finish", || {
        let v = get(&format!("{url}/api/v2/builds?complete=true&order=buildid"));
        let list = v["builds"].as_array().cloned().unwrap_or_default();
        (list.len() == 2).then_some(list)
    });
    // The child finished first, on m2; the parent, on m1, after it.
    let names: Vec<i64> = builds
        .iter()
        .map(|b| b["results"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(names, [0, 0], "{builds:?}\n{}", ma.log());
    let m2 = get(&format!("{url}/api/v2/masters/m2"))["masters"][0]["masterid"].clone();
    let child = builds
        .iter()
        .find(|b| b["masterid"] == m2)
        .expect("the child ran on m2");
    let parent = builds
        .iter()
        .find(|b| b["masterid"] != m2)
        .expect("the parent ran on m1");
    assert!(parent["complete_at"].as_i64() >= child["complete_at"].as_i64());
}

/// A MasterLock counts the builds of every master of the fleet: with an
/// exclusive one, a second request waits although another master has an
/// idle worker for it, and builds once the first build gave the lock back.
#[test]
fn a_master_lock_counts_the_builds_of_every_master() {
    let f = Fleet::new();
    let write = |name: &str| {
        fleet_script(name, &f.db)
            .rhai(&format!(
                r#"f.addStep(ShellCommand(#{{ name: "wait", command: ["sh", "-c", "while [ ! -e {} ]; do sleep 0.05; done"] }}));
let one = MasterLock("one");"#,
                f.release.display()
            ))
            .worker("w1", "pw")
            .worker("w2", "pw")
            .builder("b", &["w1", "w2"], r#"locks: [one.access("exclusive")]"#)
            .write_to(&f.tmp.path().join(name))
    };
    let m1 = Master::start(&write("m1"));
    let m2 = Master::start(&write("m2"));
    let _w1 = f.worker(&m1, 1);
    let _w2 = f.worker(&m2, 2);
    force(&m1, "b");
    force(&m1, "b");
    let url = m1.http_url();
    let running = || {
        get(&format!("{url}/api/v2/builds?complete=false"))["builds"]
            .as_array()
            .map_or(0, Vec::len)
    };
    wait_until(Duration::from_secs(60), "a build holding the lock", || {
        (running() == 1).then_some(())
    });
    common::holds_for(Duration::from_secs(3), "one build at a time", || {
        running() == 1
    });
    std::fs::write(&f.release, "").expect("release");
    // What was last seen is kept, so that a timeout says what it saw.
    let last = std::cell::RefCell::new(serde_json::Value::Null);
    let builds = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(Duration::from_secs(60), "both builds", || {
            let v = get(&format!("{url}/api/v2/builds?order=started_at"));
            let list = v["builds"].as_array().cloned().unwrap_or_default();
            *last.borrow_mut() = v;
            let done = list.iter().filter(|b| b["complete"] == true).count();
            (list.len() == 2 && done == 2).then_some(list)
        })
    }))
    .unwrap_or_else(|_| {
        panic!(
            "both builds did not end; builds seen: {}\nm1: {}\nm2: {}",
            last.borrow(),
            m1.log(),
            m2.log()
        )
    });
    assert!(builds.iter().all(|b| b["results"] == 0), "{builds:?}");
    assert!(
        builds[1]["started_at"].as_i64() >= builds[0]["complete_at"].as_i64(),
        "the second started once the first ended: {builds:?}"
    );
}
