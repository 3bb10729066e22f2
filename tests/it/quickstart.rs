//! README's first command: `kiln quickstart` makes a demo master with a
//! local Git repository and two local workers; a commit builds.

use crate::common;
use crate::common::assert_has;

use std::process::Stdio;
use std::time::Duration;

use common::wait_until;
use common::workers::{builds, Results};

/// A `kiln quickstart` running in the foreground, its stderr captured.
/// `stop` asks it to end (SIGTERM) and waits for it and its workers;
/// dropped without that (a failing test), it is stopped the same way, so
/// no master and no worker is left behind.
struct Quickstart {
    child: std::process::Child,
    log: common::Captured,
    dir: std::path::PathBuf,
}

impl Quickstart {
    /// Starts `kiln quickstart DIR ARGS...` and waits until `workers`
    /// workers are connected and `pollers` pollers have polled once.
    fn start(
        dir: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
        workers: usize,
        pollers: usize,
    ) -> Quickstart {
        let mut child = common::quickstart(dir)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kiln quickstart");
        let log = common::capture(child.stderr.take().expect("stderr"));
        let q = Quickstart {
            child,
            log,
            dir: dir.to_path_buf(),
        };
        let what = format!("{workers} workers and {pollers} first polls");
        wait_until(Duration::from_secs(90), &what, || {
            let text = q.text();
            (text.matches("connected worker=").count() >= workers
                && text.matches("first poll").count() >= pollers)
                .then_some(())
        });
        q
    }

    /// What it has said so far.
    fn text(&self) -> String {
        common::captured(&self.log)
    }

    /// Asks it to end and waits for it, then for its workers: both must
    /// end on their own.
    fn stop(mut self) {
        assert!(
            self.end(),
            "the quickstart did not end on SIGTERM within 60 s"
        );
        assert!(
            processes_under(&self.dir).is_empty(),
            "workers left behind: {:?}",
            processes_under(&self.dir)
        );
    }

    /// SIGTERM, then SIGKILL after 60 s; whether it ended on the first.
    fn end(&mut self) -> bool {
        let mut on_its_own = true;
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: plain kill(2) on our child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while std::time::Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None))
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(self.child.try_wait(), Ok(None)) {
                on_its_own = false;
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline && !processes_under(&self.dir).is_empty() {
            std::thread::sleep(Duration::from_millis(50));
        }
        on_its_own
    }
}

impl Drop for Quickstart {
    fn drop(&mut self) {
        self.end();
    }
}

/// kiln processes (the quickstart's workers) whose command line names `dir`.
fn processes_under(dir: &std::path::Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains("worker start") && cmd.contains(&needle) {
                found.push(cmd);
            }
        }
    }
    found
}

#[test]
fn the_quickstart_builds_a_commit_on_its_two_workers_and_stops_them_with_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("demo");
    let q = Quickstart::start(&dir, &[], &[], 2, 1);
    assert_has(&q.text(), "kiln quickstart in");

    let repo = dir.join("repo");
    std::fs::write(repo.join("README"), "a change\n").expect("edit");
    common::run(&repo, "git", &["commit", "-qam", "Make a change"]);
    wait_until(Duration::from_secs(60), "two finished builds", || {
        (builds(&dir).iter().filter(|b| b.result.is_some()).count() >= 2).then_some(())
    });
    let all = builds(&dir);
    assert_eq!(all.len(), 2, "{all:?}");
    for b in &all {
        assert_eq!(b.result, Some(Results::Success), "{all:?}\n{}", q.text());
        let steps: Vec<&str> = b.steps.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(steps, ["checkout", "list", "build"]);
    }
    let out = common::workers::stdio(&dir, "build");
    assert_has(&out, ": Make a change");
    assert_eq!(processes_under(&dir).len(), 2);
    q.stop();
}

/// The push commands the Mozilla quickstart printed, by branch.
fn push_commands(banner: &str) -> std::collections::BTreeMap<String, String> {
    banner
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let (branch, rest) = l.split_once(' ')?;
            let cmd = rest.trim();
            (cmd.starts_with("(cd ") && cmd.contains("hg push"))
                .then(|| (branch.to_string(), cmd.to_string()))
        })
        .collect()
}

/// The Mozilla quickstart: the seed's staging master with four Mercurial
/// branches and a worker per platform pool. The commands it prints push
/// to a branch; each push builds on every platform its branch enables,
/// through the ScriptFactory's steps; a "bustage" push fails, and the
/// failure summary shows the compiler's error.
#[test]
fn the_mozilla_quickstart_builds_every_enabled_platform_of_the_branches_pushed_to() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("mozilla");
    let q = Quickstart::start(
        &dir,
        &["--mozilla"],
        &[("FX_STANDIN_BUILD_SECONDS", "0.2")],
        4,
        4,
    );
    let banner = q.text();
    for worker in [
        "bld-linux64-ec2-stage-001",
        "bld-linux64-ec2-stage-002",
        "bld-lion-r5-stage-001",
        "b-2008-ix-stage-001",
    ] {
        assert_has(&banner, &format!("connected worker={worker}"));
    }
    let url = common::http_url_of(&banner);
    let pushes = push_commands(&banner);
    let branches: Vec<&str> = pushes.keys().map(String::as_str).collect();
    assert_eq!(
        branches,
        ["cedar", "mozilla-aurora", "mozilla-central", "try"]
    );

    // The printed commands, as a developer would paste them; try's with a
    // comment that breaks the build.
    common::run(tmp.path(), "bash", &["-c", &pushes["mozilla-central"]]);
    common::run(tmp.path(), "bash", &["-c", &pushes["cedar"]]);
    let busted = pushes["try"].replace("Bug 1 - a change", "Bug 3 - bustage in the DOM");
    common::run(tmp.path(), "bash", &["-c", &busted]);

    // mozilla-central and try build five platforms each, cedar three.
    wait_until(Duration::from_secs(240), "thirteen finished builds", || {
        (builds(&dir).iter().filter(|b| b.result.is_some()).count() >= 13).then_some(())
    });
    let all = builds(&dir);
    assert_eq!(all.len(), 13, "{all:?}");
    let mut by_branch: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for b in &all {
        let branch = ["mozilla-central", "cedar", "try"]
            .into_iter()
            .find(|br| b.builder.contains(&format!(" {br} ")))
            .unwrap_or_else(|| panic!("a builder of a pushed branch: {}", b.builder));
        by_branch
            .entry(branch)
            .or_default()
            .push(b.builder.as_str());
        let steps: Vec<&str> = b.steps.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(
            &steps[..5],
            [
                "get_basedir",
                "clone_scripts",
                "download_props",
                "run_script",
                "cleanup"
            ],
            "{b:?}"
        );
        let want = if branch == "try" {
            Results::Failure
        } else {
            Results::Success
        };
        assert_eq!(
            b.result,
            Some(want),
            "{b:?}\n{}",
            common::workers::build_stdio(&dir, b.id, "run_script")
        );
    }
    let mut central = by_branch["mozilla-central"].clone();
    central.sort();
    assert_eq!(
        central,
        [
            "Linux mozilla-central build",
            "Linux x86-64 mozilla-central build",
            "OS X 10.7 mozilla-central build",
            "WINNT 5.2 mozilla-central build",
            "WINNT 6.1 x86-64 mozilla-central build",
        ]
    );
    assert_eq!(by_branch["cedar"].len(), 3);
    assert_eq!(by_branch["try"].len(), 5);

    // What made a try build fail: the compiler's error, from run_script.
    let failed = all
        .iter()
        .find(|b| b.builder.contains(" try "))
        .expect("a try build");
    let summary: serde_json::Value =
        reqwest::blocking::get(format!("{url}/api/v2/builds/{}/failure", failed.id))
            .expect("GET")
            .json()
            .expect("json");
    assert_eq!(summary["failure"]["name"], "run_script", "{summary}");
    let lines = summary["failure"]["lines"].to_string();
    assert_has(&lines, "error: use of undeclared identifier 'mBustage'");
    // postrun.py noted every build, as Mozilla's noted them for TBPL.
    wait_until(Duration::from_secs(30), "postrun for every build", || {
        let log = std::fs::read_to_string(dir.join("postrun.log")).unwrap_or_default();
        (log.lines().count() >= 13).then_some(())
    });

    q.stop();
}
