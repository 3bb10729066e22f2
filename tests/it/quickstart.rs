//! README's first command: `kiln quickstart` makes a demo master with a
//! local Git repository and two local workers; a commit builds.

use crate::common;
use crate::common::assert_has;

use std::process::Stdio;
use std::time::Duration;

use common::wait_until;
use common::workers::{builds, Results};

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
    let mut child = common::quickstart(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln quickstart");
    let log = common::capture(child.stderr.take().expect("stderr"));
    let text = || common::captured(&log);
    wait_until(Duration::from_secs(60), "both workers", || {
        (text().matches("connected worker=").count() >= 2 && text().contains("first poll"))
            .then_some(())
    });
    assert_has(&text(), "kiln quickstart in");

    let repo = dir.join("repo");
    std::fs::write(repo.join("README"), "a change\n").expect("edit");
    common::run(&repo, "git", &["commit", "-qam", "Make a change"]);
    wait_until(Duration::from_secs(60), "two finished builds", || {
        (builds(&dir).iter().filter(|b| b.result.is_some()).count() >= 2).then_some(())
    });
    let all = builds(&dir);
    assert_eq!(all.len(), 2, "{all:?}");
    for b in &all {
        assert_eq!(b.result, Some(Results::Success), "{all:?}\n{}", text());
        let steps: Vec<&str> = b.steps.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(steps, ["checkout", "list", "build"]);
    }
    let out = common::workers::stdio(&dir, "build");
    assert_has(&out, ": Make a change");
    assert_eq!(processes_under(&dir).len(), 2);

    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait_until(Duration::from_secs(60), "the quickstart to end", || {
        child.try_wait().expect("wait").map(|_| ())
    });
    wait_until(Duration::from_secs(10), "its workers to end", || {
        processes_under(&dir).is_empty().then_some(())
    });
}
