//! A master on PostgreSQL: builds, the API, reloads and restarts on a real
//! server that the test starts, and clear errors when the database cannot
//! be reached.

use crate::common;
use crate::common::assert_has;

use std::time::Duration;

use common::workers::*;
use common::{http_get, kiln, wait_until, Master};
use kiln_testpg::PgServer;
use serde_json::Value;

fn get(url: &str) -> Value {
    serde_json::from_str(&http_get(url)).unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// One builder `b` on worker w1, its state in `db_url` with the password
/// in `secrets/db`.
fn pg_master(root: &std::path::Path, db_url: &str, password: &str) -> std::path::PathBuf {
    Script::steps(
        r#"f.addStep(ShellCommand(#{ name: "hello", command: ["echo", "hello postgres"] }));"#,
    )
    .key(&format!(
        r#"db: #{{ db_url: "{db_url}", password: secret("db") }}"#
    ))
    .worker("w1", "pw-one")
    .builder("b", &["w1"], "")
    .secret("db", &format!("{password}\n"))
    .write(root)
}

/// The master's finished builds, as its API shows them: (number, results).
fn finished_builds(url: &str) -> Vec<(i64, i64)> {
    let v = get(&format!("{url}/api/v2/builds?complete=true&order=number"));
    v["builds"]
        .as_array()
        .expect("builds")
        .iter()
        .map(|b| {
            (
                b["number"].as_i64().expect("number"),
                b["results"].as_i64().expect("results"),
            )
        })
        .collect()
}

#[test]
fn a_master_on_postgresql_builds_reloads_and_keeps_its_history_across_a_restart() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = PgServer::start();
    server.create_db("kiln");
    let dir = pg_master(
        tmp.path(),
        &server.url_without_password("kiln"),
        kiln_testpg::PASSWORD,
    );
    let mut master = Master::start(&dir);
    let url = master.http_url();
    let w1 = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    force(&master, "b");
    wait_until(Duration::from_secs(60), "a finished build", || {
        (!finished_builds(&url).is_empty()).then_some(())
    });
    assert_eq!(finished_builds(&url), [(1, 0)], "{}", master.log());
    // The rows are in PostgreSQL: the request is complete, the log is kept.
    assert_eq!(
        server.psql("kiln", "SELECT complete, results FROM buildrequests"),
        "1|0\n"
    );
    // The log is in PostgreSQL, each chunk raw or zstd (the default; a
    // chunk that would not shrink stays raw), and reads back through the
    // API.
    assert_eq!(
        server.psql(
            "kiln",
            "SELECT count(*) FROM logchunks WHERE compressed NOT IN (0, 4)"
        ),
        "0\n"
    );
    let logs = get(&format!("{url}/api/v2/logs?name=stdio"));
    let logid = logs["logs"][0]["logid"].as_i64().expect("a log");
    assert_has(
        &http_get(&format!("{url}/api/v2/logs/{logid}/raw")),
        "hello postgres",
    );
    // The pid file names the database without its password; `kiln
    // reconfig` reads the password from the config.
    let pid = std::fs::read_to_string(dir.join("kiln.pid")).expect("pid file");
    assert_has(&pid, &server.url_without_password("kiln"));
    assert!(!pid.contains(kiln_testpg::PASSWORD), "{pid}");
    let out = kiln(&dir, &["reconfig", "."], Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "{}\n{}", out.stderr, master.log());

    assert_eq!(master.stop(), Some(0));
    drop(w1);
    let master = Master::start(&dir);
    let url = master.http_url();
    // A worker dir of its own: the first one names the old master's port.
    let again = tmp.path().join("again");
    std::fs::create_dir_all(&again).expect("mkdir");
    let _w1 = KilnWorker::connect(&master, &again, "w1", "pw-one");
    assert_eq!(finished_builds(&url), [(1, 0)], "the history is kept");
    force(&master, "b");
    wait_until(Duration::from_secs(60), "the second build", || {
        (finished_builds(&url).len() == 2).then_some(())
    });
    assert_eq!(finished_builds(&url), [(1, 0), (2, 0)]);
}

#[test]
fn a_master_whose_database_cannot_be_reached_exits_1_and_says_why() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut server = PgServer::start();
    server.create_db("kiln");
    let url = server.url_without_password("kiln");

    // `kiln start` exits 1 naming the database; its error text.
    let refused = |dir: &std::path::Path| {
        let out = kiln(dir, &["start", "."], Duration::from_secs(60));
        assert_eq!(out.code, Some(1), "{}", out.stderr);
        assert_has(&out.stderr, &format!("cannot reach the database {url}"));
        out
    };
    let dir = pg_master(tmp.path(), &url, "not-the-password");
    let out = refused(&dir);
    assert_has(&out.stderr, "password authentication failed");
    assert!(!out.stderr.contains("not-the-password"), "{}", out.stderr);
    assert!(!dir.join("kiln.pid").exists(), "no pid file is left");

    server.stop();
    std::fs::write(dir.join("secrets/db"), kiln_testpg::PASSWORD).expect("secret");
    let out = refused(&dir);
    assert_has(&out.stderr.to_lowercase(), "connection refused");
}

#[test]
fn a_database_that_goes_away_mid_build_is_waited_for_and_the_build_ends_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut server = PgServer::start();
    server.create_db("kiln");
    let started = tmp.path().join("started");
    let release = tmp.path().join("release");
    let dir = one_builder(&format!(
        r#"f.addStep(ShellCommand(#{{ name: "wait", command: ["sh", "-c", "touch {0}; while [ ! -e {1} ]; do sleep 0.05; done"] }}));"#,
        started.display(),
        release.display()
    ))
    .key(&format!(r#"db: #{{ db_url: "{}" }}"#, server.url("kiln")))
    .write(tmp.path());
    let master = Master::start(&dir);
    let url = master.http_url();
    let _w1 = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    force(&master, "b");
    wait_until(Duration::from_secs(60), "the step to run", || {
        started.exists().then_some(())
    });
    // The database goes away while the step runs, and the step ends while
    // it is away: its result waits for the database.
    server.stop();
    std::fs::write(&release, "").expect("release");
    master.wait_for_log("cannot be reached", 2, Duration::from_secs(30));
    server.restart().expect("the server starts again");
    master.wait_for_log("can be reached again", 1, Duration::from_secs(60));
    wait_until(Duration::from_secs(60), "the build to finish", || {
        (!finished_builds(&url).is_empty()).then_some(())
    });
    assert_eq!(finished_builds(&url), [(1, 0)], "{}", master.log());
    assert_eq!(
        server.psql(
            "kiln",
            "SELECT count(*), min(complete), min(results) FROM buildrequests"
        ),
        "1|1|0\n",
        "one request, complete with SUCCESS"
    );
    assert_eq!(server.psql("kiln", "SELECT count(*) FROM builds"), "1\n");
}
