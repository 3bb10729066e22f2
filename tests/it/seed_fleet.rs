//! The seed's fleet end to end: examples/mozilla-fleet's make-fleet.sh
//! makes four staging masters with roles (scheduler, build-linux,
//! build-mac, tests) on one PostgreSQL database, against a real
//! "mozilla-central" and the mozharness stand-in served by `hg serve`. A
//! push is polled and scheduled by the scheduler master alone, built on
//! the build masters' workers, and its good builds are followed by unit
//! tests on the test master's workers (a Dependent scheduler).

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::workers::*;
use common::{hg_commit, http_get, post_form, repo_root, run, wait_until, HgServe, Master};
use kiln_testpg::PgServer;
use serde_json::Value;

fn get(url: &str) -> Value {
    serde_json::from_str(&http_get(url)).unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// The raw text of step `step`'s first log in build `buildid`.
fn step_log(url: &str, buildid: i64, step: &str) -> String {
    let steps = get(&format!("{url}/api/v2/builds/{buildid}/steps"));
    let Some(s) = steps["steps"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == step))
    else {
        panic!("no step {step} in build {buildid}: {steps}");
    };
    let logs = get(&format!("{url}/api/v2/steps/{}/logs", s["stepid"]));
    let logid = &logs["logs"][0]["logid"];
    http_get(&format!("{url}/api/v2/logs/{logid}/raw"))
}

/// A finished build as (builder name, master name, results).
#[derive(Debug, Clone, PartialEq)]
struct Built {
    buildid: i64,
    builder: String,
    master: String,
    results: i64,
}

/// Every finished build, with builder and master names, read through `url`.
fn finished_builds(url: &str) -> Vec<Built> {
    let names = |collection: &str, id: &str| -> BTreeMap<i64, String> {
        get(&format!("{url}/api/v2/{collection}"))[collection]
            .as_array()
            .expect(collection)
            .iter()
            .map(|b| {
                (
                    b[id].as_i64().expect("id"),
                    b["name"].as_str().expect("name").to_string(),
                )
            })
            .collect()
    };
    let builders = names("builders", "builderid");
    let masters = names("masters", "masterid");
    let builds = get(&format!("{url}/api/v2/builds?complete=true"));
    let mut out: Vec<Built> = builds["builds"]
        .as_array()
        .expect("builds")
        .iter()
        .map(|b| Built {
            buildid: b["buildid"].as_i64().expect("buildid"),
            builder: builders
                .get(&b["builderid"].as_i64().expect("builderid"))
                .cloned()
                .unwrap_or_default(),
            master: masters
                .get(&b["masterid"].as_i64().expect("masterid"))
                .cloned()
                .unwrap_or_default(),
            results: b["results"].as_i64().unwrap_or(-1),
        })
        .collect();
    out.sort_by(|a, b| a.builder.cmp(&b.builder));
    out
}

fn start_master(fleet: &Path, name: &str) -> Master {
    Master::start(&fleet.join(name))
}

#[test]
fn a_push_is_scheduled_by_one_master_built_on_two_and_tested_on_a_fourth() {
    let tmp = tempfile::tempdir().expect("tmp");
    let staging = repo_root().join("examples/mozilla-staging/local");
    let repos = tmp.path().join("repos");
    let setup = staging.join("setup-repos.sh").display().to_string();
    run(tmp.path(), "bash", &[&setup, &repos.display().to_string()]);
    let conf = repos.join("hgweb.conf").display().to_string();
    let hg = HgServe::start(&repos, &["--web-conf", &conf]);

    let server = PgServer::start();
    let db = server.create_db("fleet");
    let fleet = tmp.path().join("fleet");
    let make = repo_root().join("examples/mozilla-fleet/local/make-fleet.sh");
    run(
        tmp.path(),
        "bash",
        &[
            &make.display().to_string(),
            &fleet.display().to_string(),
            &hg.url,
            &db,
            "0",
        ],
    );
    let password = std::fs::read_to_string(fleet.join("scheduler/secrets/worker-password"))
        .expect("password")
        .trim()
        .to_string();

    let mut scheduler = start_master(&fleet, "scheduler");
    let mut linux = start_master(&fleet, "build-linux");
    let mut mac = start_master(&fleet, "build-mac");
    let mut tests = start_master(&fleet, "tests");
    let root = tmp.path();
    let _w = [
        KilnWorker::connect(&linux, root, "bld-linux64-ec2-stage-001", &password),
        KilnWorker::connect(&mac, root, "bld-lion-r5-stage-001", &password),
        KilnWorker::connect(&tests, root, "tst-linux64-ec2-stage-001", &password),
        KilnWorker::connect(&tests, root, "t-yosemite-r7-stage-001", &password),
    ];
    scheduler.wait_for_log("first poll:", 1, Duration::from_secs(60));

    let push = hg_commit(
        &repos.join("mozilla-central"),
        "dev <dev@mozilla.example>",
        &["browser/app/nsBrowserApp.cpp"],
        "Bug 2 - start the browser on every platform",
    );
    let url = scheduler.http_url();
    let (status, body) = post_form(&format!("{url}/change_hook/poller"), &[]);
    assert_eq!(status, 200, "{body}");

    let built = wait_until(
        Duration::from_secs(300),
        "three builds and two test runs",
        || {
            let b = finished_builds(&url);
            (b.len() >= 5).then_some(b)
        },
    );
    let summary: Vec<(&str, &str, i64)> = built
        .iter()
        .map(|b| (b.builder.as_str(), b.master.as_str(), b.results))
        .collect();
    assert_eq!(
        summary,
        [
            ("Linux mozilla-central build", "fleet-build-linux", 0),
            ("Linux x86-64 mozilla-central build", "fleet-build-linux", 0),
            (
                "Linux x86-64 mozilla-central opt test mochitest",
                "fleet-tests",
                0
            ),
            ("OS X 10.7 mozilla-central build", "fleet-build-mac", 0),
            (
                "OS X 10.7 mozilla-central opt test mochitest",
                "fleet-tests",
                0
            ),
        ],
        "{built:#?}\n{}",
        tests.log()
    );
    // The tests ran the stand-in's desktop_unittest.py on the pushed revision.
    for b in built.iter().filter(|b| b.master == "fleet-tests") {
        let script = step_log(&url, b.buildid, "run_script");
        for expected in [
            "desktop_unittest: mochitest on branch mozilla-central".to_string(),
            format!("testing revision {push} of {}/mozilla-central", hg.url),
            "mochitest: 4 passed, 0 failed".to_string(),
        ] {
            assert!(script.contains(&expected), "{expected:?} in:\n{script}");
        }
    }
    // Only the scheduler master polled: the others have no change source.
    for m in [&linux, &mac, &tests] {
        assert!(!m.log().contains("first poll:"), "{}", m.log());
    }
    // Each master stops cleanly, the others staying up until their turn.
    for m in [&mut tests, &mut mac, &mut linux, &mut scheduler] {
        assert_eq!(m.stop(), Some(0), "{}", m.log());
    }
    drop(hg);
    drop(server);
}
