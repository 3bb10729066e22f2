//! Databases that stay small: the janitor (`JanitorConfigurator`) deletes
//! old logs at its times while the master runs, and `kiln cleanupdb`
//! compresses, prunes and gives the space back; a deleted log reads as
//! deleted, not as an error.

use crate::common;
use crate::common::assert_has;

use std::path::Path;
use std::time::Duration;

use common::workers::*;
use common::{http_get, kiln, kiln_ok, wait_until, Master};
use serde_json::Value;

fn get(url: &str) -> Value {
    serde_json::from_str(&http_get(url)).unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// A master whose builder `b` writes `lines` lines of compiler output and
/// fails, its logs stored with `method`, with `more` keys.
fn chatty(lines: usize, method: &str, more: &str) -> String {
    let mut s = one_builder(&format!(
        r#"f.addStep(ShellCommand(#{{ name: "compile", command: "for i in $(seq 1 {lines}); do echo compiling dom/base/nsGlobalWindow$i.cpp with -O2 -fno-exceptions; done; exit 1" }}));"#
    ))
    .key(&format!("logCompressionMethod: \"{method}\""));
    if !more.is_empty() {
        s = s.key(more);
    }
    s.render()
}

/// The id of build `number`'s compile log.
fn compile_log(url: &str, number: i64) -> i64 {
    let steps = get(&format!(
        "{url}/api/v2/builds/{}/steps",
        buildid(url, number)
    ));
    let stepid = &steps["steps"][0]["stepid"];
    get(&format!("{url}/api/v2/steps/{stepid}/logs"))["logs"][0]["logid"]
        .as_i64()
        .expect("logid")
}

fn buildid(url: &str, number: i64) -> i64 {
    get(&format!("{url}/api/v2/builds?number={number}"))["builds"][0]["buildid"]
        .as_i64()
        .expect("buildid")
}

fn sqlite(dir: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(dir.join("state.sqlite")).expect("db")
}

#[test]
fn the_janitor_deletes_old_logs_at_its_time_and_the_api_and_page_say_so() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Every minute, the logs of builds that ended over a second ago.
    let janitor =
        r#"configurators: [JanitorConfigurator(#{ logHorizon: 1, minute: "*", hour: "*" })]"#;
    let dir = master_script(tmp.path(), &chatty(20_000, "raw", janitor));
    let mut master = Master::start(&dir);
    let _w = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    force_and_wait(&master, "b", 1);
    let url = master.http_url();
    let old = compile_log(&url, 1);
    assert_has(
        &http_get(&format!("{url}/api/v2/logs/{old}/raw")),
        "compiling dom/base/nsGlobalWindow20000.cpp",
    );

    // The sweep whose time comes a second or more after the build ended
    // deletes its log (an earlier one may find nothing old enough).
    wait_until(
        Duration::from_secs(150),
        "a janitor pass that deletes the log",
        || {
            let log = master.log();
            log.lines()
                .any(|l| l.contains("janitor: deleted") && l.contains(": 1 logs"))
                .then_some(())
        },
    );
    let line = master
        .log()
        .lines()
        .find(|l| l.contains("janitor: deleted") && l.contains(": 1 logs"))
        .map(String::from)
        .unwrap_or_default();
    // A new database gives the space back as it goes.
    assert!(!line.contains(" 0 pages given back"), "{line}");
    let c = sqlite(&dir);
    assert_eq!(common::scalar(&c, "PRAGMA auto_vacuum"), 2);
    assert_eq!(common::scalar(&c, "PRAGMA freelist_count"), 0);

    // The log reads as deleted: its type, its text, the failure summary.
    let log = get(&format!("{url}/api/v2/logs/{old}"));
    assert_eq!(log["logs"][0]["type"], "d", "{log}");
    assert_has(
        &http_get(&format!("{url}/api/v2/logs/{old}/raw")),
        "this log was deleted by the janitor",
    );
    let contents = get(&format!("{url}/api/v2/logs/{old}/contents"));
    assert_eq!(contents["logchunks"], serde_json::json!([]), "{contents}");
    let failure = get(&format!("{url}/api/v2/builds/{}/failure", buildid(&url, 1)));
    assert_eq!(failure["failure"]["deleted"], true, "{failure}");
    assert_eq!(failure["failure"]["name"], "compile", "{failure}");

    // A build after it keeps its log until its own horizon passes.
    force_and_wait(&master, "b", 2);
    let new = compile_log(&url, 2);
    assert_has(
        &http_get(&format!("{url}/api/v2/logs/{new}/raw")),
        "compiling dom/base/nsGlobalWindow1.cpp",
    );
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn cleanupdb_compresses_and_prunes_gives_the_space_back_and_refuses_a_running_master() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_script(tmp.path(), &chatty(20_000, "raw", ""));
    let mut master = Master::start(&dir);
    let _w = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    force_and_wait(&master, "b", 1);
    force_and_wait(&master, "b", 2);
    kiln(&dir, &["cleanupdb", "."], Duration::from_secs(60)).fails_with("a master is running in");
    assert_eq!(master.stop(), Some(0));
    let text = all_log_text(&dir);
    let size = |dir: &Path| -> u64 {
        ["state.sqlite", "state.sqlite-wal"]
            .iter()
            .map(|f| std::fs::metadata(dir.join(f)).map_or(0, |m| m.len()))
            .sum()
    };
    let raw_size = size(&dir);

    // With zstd now in the config: every chunk compressed, nothing deleted.
    std::fs::write(dir.join("master.rhai"), chatty(20_000, "zstd", "")).expect("save");
    let out = kiln_ok(&dir, &["cleanupdb", "."]);
    assert_has(&out.stdout, "kept every log");
    assert_has(&out.stdout, "compressed ");
    assert_has(&out.stdout, " chunks with zstd");
    assert_eq!(all_log_text(&dir), text, "the logs read the same");
    let zstd_size = size(&dir);
    assert!(
        zstd_size * 3 < raw_size,
        "{raw_size} -> {zstd_size}\n{}",
        out.stdout
    );
    let c = sqlite(&dir);
    assert_eq!(
        common::scalar(
            &c,
            "SELECT count(*) FROM logchunks WHERE compressed <> 4 AND last_line - first_line > 50"
        ),
        0
    );
    drop(c);

    // --log-horizon 0: every finished build's logs go.
    let out = kiln_ok(&dir, &["cleanupdb", ".", "--log-horizon", "0"]);
    assert_has(
        &out.stdout,
        "deleted the logs of builds that ended over 0 s ago: ",
    );
    let c = sqlite(&dir);
    assert_eq!(common::scalar(&c, "SELECT count(*) FROM logchunks"), 0);
    assert_eq!(
        common::scalar(&c, "SELECT count(*) FROM logs WHERE type <> 'd'"),
        0
    );
    // The database was rewritten: it now keeps the janitor's pages free
    // as it goes.
    assert_eq!(common::scalar(&c, "PRAGMA auto_vacuum"), 2);
    drop(c);
    assert!(size(&dir) < zstd_size, "{zstd_size} -> {}", size(&dir));

    // The history is all there: the builds, their steps, their (deleted) logs.
    let mut master = Master::start(&dir);
    let url = master.http_url();
    let builds = get(&format!("{url}/api/v2/builders/b/builds"));
    assert_eq!(
        builds["builds"].as_array().map(Vec::len),
        Some(2),
        "{builds}"
    );
    let log = compile_log(&url, 2);
    assert_has(
        &http_get(&format!("{url}/api/v2/logs/{log}/raw")),
        "this log was deleted by the janitor",
    );
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn a_janitor_without_a_horizon_or_with_two_configurators_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_script(
        tmp.path(),
        &chatty(
            1,
            "zstd",
            r#"configurators: [JanitorConfigurator(#{ hour: 3 })]"#,
        ),
    );
    kiln(&dir, &["checkconfig", "."], Duration::from_secs(60)).fails_with("`logHorizon`");
    std::fs::write(
        dir.join("master.rhai"),
        chatty(
            1,
            "zstd",
            r#"configurators: [JanitorConfigurator(#{ logHorizon: 60 }), JanitorConfigurator(#{ logHorizon: 90 })]"#,
        ),
    )
    .expect("save");
    kiln(&dir, &["checkconfig", "."], Duration::from_secs(60))
        .fails_with("more than one JanitorConfigurator");
    // Buildbot's build_data_horizon is accepted with a warning: kiln has
    // no build data.
    std::fs::write(
        dir.join("master.rhai"),
        chatty(
            1,
            "zstd",
            r#"configurators: [JanitorConfigurator(#{ logHorizon: 60, build_data_horizon: 600, hour: 25 })]"#,
        ),
    )
    .expect("save");
    kiln(&dir, &["checkconfig", "."], Duration::from_secs(60))
        .fails_with("`hour` in JanitorConfigurator must be");
    std::fs::write(
        dir.join("master.rhai"),
        chatty(
            1,
            "zstd",
            r#"configurators: [JanitorConfigurator(#{ logHorizon: 60, build_data_horizon: 600 })]"#,
        ),
    )
    .expect("save");
    let out = kiln_ok(&dir, &["checkconfig", "."]);
    assert_has(
        &out.stderr,
        "`build_data_horizon` in JanitorConfigurator has nothing to delete",
    );
}
