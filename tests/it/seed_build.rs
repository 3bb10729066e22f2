//! The seed's flow end to end: examples/mozilla-staging, made a master dir
//! by its local/make-master.sh (a master_config.json of its own), against a real "mozilla-central" and the
//! project's mozharness stand-in served by `hg serve`; a push to
//! mozilla-central builds every enabled platform on a kiln worker and a
//! stock buildbot-worker, each running the ScriptFactory's steps.

use crate::common;
use crate::common::assert_has;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::workers::*;
use common::{hg_commit, post_form, repo_root, run, wait_until, HgServe, Master};

fn build_property(dir: &Path, buildid: i64, name: &str) -> Option<serde_json::Value> {
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    let text: Option<String> = c
        .query_row(
            "SELECT value_json FROM build_properties WHERE buildid = ?1 AND name = ?2",
            rusqlite::params![buildid, name],
            |r| r.get(0),
        )
        .ok();
    text.map(|t| serde_json::from_str(&t).expect("property json"))
}

#[test]
fn a_push_to_mozilla_central_builds_every_enabled_platform_with_the_script_factory() {
    let tmp = tempfile::tempdir().expect("tmp");
    let local = repo_root().join("examples/mozilla-staging/local");
    let repos = tmp.path().join("repos");
    run(
        tmp.path(),
        "bash",
        &[
            &local.join("setup-repos.sh").display().to_string(),
            &repos.display().to_string(),
        ],
    );
    let conf = repos.join("hgweb.conf").display().to_string();
    let hg = HgServe::start(&repos, &["--web-conf", &conf]);
    // A staging master on Linux builds the Unix platforms of one branch.
    let dir = tmp.path().join("master");
    run(
        tmp.path(),
        "bash",
        &[
            &local.join("make-master.sh").display().to_string(),
            &dir.display().to_string(),
            &hg.url,
            "0",
            "0",
        ],
    );
    let password = std::fs::read_to_string(dir.join("secrets/worker-password"))
        .expect("password")
        .trim()
        .to_string();

    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let url = master.http_url();
    // One worker per platform pool: linux and linux64 share one, so their
    // builds take turns on it, a reboot between them.
    let _linux = KilnWorker::start(tmp.path(), "bld-linux64-ec2-stage-001", &password, port);
    let mac = StockWorker::start(tmp.path(), "bld-lion-r5-stage-001", &password, port);
    master.wait_for_log("first poll:", 1, Duration::from_secs(60));
    master.wait_for_log("connected worker=", 2, Duration::from_secs(60));

    let central = repos.join("mozilla-central");
    let push = hg_commit(
        &central,
        "dev <dev@mozilla.example>",
        &["browser/app/nsBrowserApp.cpp"],
        "Bug 1 - make the browser start faster",
    );
    // The poller's interval is a minute; the poller hook asks for it now.
    let (status, body) = post_form(&format!("{url}/change_hook/poller"), &[]);
    assert_eq!(status, 200, "{body}");

    wait_until(Duration::from_secs(240), "three finished builds", || {
        finished(&dir, 3).then_some(())
    });
    let all = builds(&dir);
    let steps: Vec<String> = [
        "get_basedir",
        "clone_scripts",
        "download_props",
        "run_script",
        "cleanup",
        "reboot",
    ]
    .map(String::from)
    .to_vec();
    for b in &all {
        assert_eq!(
            b.result,
            Some(Results::Success),
            "every build succeeds: {all:?}\nclone_scripts of build 1: {}\n{}",
            build_stdio(&dir, 1, "clone_scripts"),
            master.log()
        );
        let names: Vec<String> = b.steps.iter().map(|s| s.0.clone()).collect();
        assert_eq!(names, steps, "{all:?}");
        assert!(
            b.steps.iter().all(|s| s.1 == Some(Results::Success)),
            "{all:?}"
        );
    }

    // config.rhai's fileIsImportant (a closure in a module) ran cleanly.
    let log = master.log();
    assert!(!log.contains("closure at"), "{log}");

    let mut built = builds(&dir);
    built.sort_by(|a, b| a.builder.cmp(&b.builder));
    let builders: Vec<(&str, &str)> = built
        .iter()
        .map(|b| (b.builder.as_str(), b.worker.as_str()))
        .collect();
    assert_eq!(
        builders,
        [
            ("Linux mozilla-central build", "bld-linux64-ec2-stage-001"),
            (
                "Linux x86-64 mozilla-central build",
                "bld-linux64-ec2-stage-001"
            ),
            ("OS X 10.7 mozilla-central build", "bld-lion-r5-stage-001"),
        ]
    );
    let configs = [
        "builds/releng_base_linux_32_builds.py",
        "builds/releng_base_linux_64_builds.py",
        "builds/releng_base_mac_64_builds.py",
    ];
    let worker_dirs = [
        tmp.path().join("kiln-worker-bld-linux64-ec2-stage-001"),
        tmp.path().join("kiln-worker-bld-linux64-ec2-stage-001"),
        mac.dir.clone(),
    ];
    for ((build, config), worker_dir) in built.iter().zip(configs).zip(&worker_dirs) {
        let (id, builder) = (build.id, &build.builder);
        // basedir is what get_basedir printed: the build's own directory.
        let basedir = build_property(&dir, id, "basedir").expect("basedir property");
        let basedir = PathBuf::from(basedir.as_str().expect("a string"));
        assert_eq!(basedir.parent(), Some(worker_dir.as_path()), "{builder}");
        let builddir = build_property(&dir, id, "builddir").expect("builddir");
        assert_eq!(builddir.as_str(), Some(basedir.to_str().expect("utf-8")));
        assert_eq!(
            build_property(&dir, id, "revision"),
            Some(push.clone().into())
        );

        let clone = build_stdio(&dir, id, "clone_scripts");
        assert_has(&clone, &format!("{}/build/mozharness", hg.url));
        // The script ran with the arguments ScriptFactory gave it, and read
        // this build's properties from buildprops.json.
        let script = build_stdio(&dir, id, "run_script");
        for expected in [
            format!("fx_desktop_build: branch mozilla-central, pool staging, config {config}"),
            format!("builder {builder} build 1 on"),
            format!("basedir {}", basedir.display()),
            format!("building revision {push} of {}/mozilla-central", hg.url),
            format!(
                "change {} by dev <dev@mozilla.example>: Bug 1 - make the browser start faster (browser/app/nsBrowserApp.cpp)",
                &push[..12]
            ),
            "fx_desktop_build: done".to_string(),
        ] {
            assert!(script.contains(&expected), "{expected:?} in:\n{script}");
        }
        // The cleanup removed the properties file; the reboot dropped the worker.
        assert!(!basedir.join("buildprops.json").exists());
        assert!(basedir.join("scripts/scripts/fx_desktop_build.py").exists());
        let reboot = build_stdio(&dir, id, "reboot");
        assert_has(&reboot, "SCHEDULED REBOOT");
        assert_has(
            &reboot,
            "the worker will be disconnected when the build ends",
        );
    }
    // Each reboot is a disconnection, and each worker came back.
    master.wait_for_log("disconnecting the worker", 3, Duration::from_secs(30));
    wait_until(Duration::from_secs(60), "both workers back", || {
        (connected(&dir).len() == 2).then_some(())
    });
    assert_eq!(master.stop(), Some(0));
    drop(hg);
}
