//! Latent workers: kiln's worker started by the master as a child process
//! (`LocalLatentWorker`) and through the user's commands
//! (`CommandLatentWorker`, here shell scripts that start and stop a kiln
//! worker in the background, as a cloud CLI would). Real processes
//! throughout; every test checks that none is left behind.

use crate::common;
use crate::common::assert_has;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::workers::*;
use common::{holds_for, wait_until, Master};
use serde_json::Value;

/// The processes running `worker start` on a directory below `root`.
fn worker_processes(root: &Path) -> Vec<i32> {
    let root = root.as_os_str().as_encoded_bytes();
    let mut found = vec![];
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args
            .windows(3)
            .any(|w| w[0] == b"worker" && w[1] == b"start" && w[2].starts_with(root))
        {
            found.push(pid);
        }
    }
    found
}

/// Whether a process runs with exactly these arguments.
fn running(argv: &[&[u8]]) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|&b| b == 0).filter(|a| !a.is_empty()).collect();
                args == argv
            })
        })
}

/// Waits until no worker process of `root` runs.
fn no_worker_left(root: &Path, limit: Duration) {
    wait_until(limit, "every latent worker process to end", || {
        worker_processes(root).is_empty().then_some(())
    });
}

/// Each latent worker's state as the API shows it, by name.
fn latent_states(master: &Master) -> Vec<(String, String, String)> {
    let v: Value = serde_json::from_str(&common::http_get(&format!(
        "{}/api/v2/workers",
        master.http_url()
    )))
    .expect("json");
    let mut out: Vec<(String, String, String)> = v["workers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|w| w.get("latent").is_some())
        .map(|w| {
            (
                w["name"].as_str().unwrap_or_default().to_string(),
                w["latent"]["state"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                w["latent"]["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

fn all_in(master: &Master, state: &str) -> bool {
    let s = latent_states(master);
    !s.is_empty() && s.iter().all(|(_, st, _)| st == state)
}

/// A step that waits for `release` beside the master dir, after marking
/// that it started.
fn waits_for_release(root: &Path) -> String {
    format!(
        r#"f.addStep(ShellCommand(#{{ name: "wait", command: ["sh", "-c", "touch {0}/started-$$; while [ ! -e {0}/release ]; do sleep 0.05; done"] }}));"#,
        root.display()
    )
}

#[test]
fn a_pool_of_local_latent_workers_grows_for_a_burst_and_shrinks_to_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut script = Script::steps(&waits_for_release(tmp.path()));
    let names = ["l0", "l1", "l2"];
    for n in names {
        script = script.worker_expr(&format!(
            r#"LocalLatentWorker("{n}", "pw-{n}", #{{ build_wait_timeout: 2, max_builds: 1 }})"#
        ));
    }
    // Two builders, so that three requests can build at once.
    let dir = script
        .builder("a", &names, "collapseRequests: false")
        .builder("b", &names, "collapseRequests: false")
        .write(tmp.path());
    let mut master = Master::start(&dir);
    assert_eq!(
        latent_states(&master),
        names.map(|n| (n.to_string(), "stopped".to_string(), String::new())),
        "listed before they ever start"
    );
    assert!(worker_processes(tmp.path()).is_empty());

    // Two requests of `a` and one of `b`: three workers start, no more.
    force(&master, "a");
    force(&master, "a");
    force(&master, "b");
    wait_until(Duration::from_secs(60), "three builds running", || {
        let started = std::fs::read_dir(tmp.path())
            .expect("ls")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("started-"))
            .count();
        (started == 3).then_some(())
    });
    assert_eq!(worker_processes(tmp.path()).len(), 3);
    assert!(all_in(&master, "building"), "{:?}", latent_states(&master));
    std::fs::write(tmp.path().join("release"), "").expect("release");
    wait_until(Duration::from_secs(60), "the three builds", || {
        finished(&dir, 3).then_some(())
    });
    let b = builds(&dir);
    assert!(
        b.iter().all(|b| b.result == Some(Results::Success)),
        "{b:?}"
    );
    let mut on: Vec<&str> = b.iter().map(|b| b.worker.as_str()).collect();
    on.sort();
    assert_eq!(on, names, "one build on each");
    // Idle for build_wait_timeout (2 s): all stopped, no process left.
    wait_until(
        Duration::from_secs(30),
        "every latent worker stopped",
        || all_in(&master, "stopped").then_some(()),
    );
    no_worker_left(tmp.path(), Duration::from_secs(10));
    let metrics = common::http_get(&format!("{}/metrics", master.http_url()));
    assert_has(&metrics, "kiln_latent_starts_total 3");
    assert_has(&metrics, "kiln_latent_failed_starts_total 0");
    assert_has(&metrics, "kiln_latent_workers{state=\"stopped\"} 3");
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn build_wait_timeout_0_stops_the_worker_after_each_build_and_a_clean_stop_leaves_none() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = Script::steps(TRUE)
        .worker_expr(r#"LocalLatentWorker("once", "pw", #{ build_wait_timeout: 0 })"#)
        .worker_expr(r#"LocalLatentWorker("forever", "pw", #{ build_wait_timeout: -1 })"#)
        .builder("b", &["once"], "")
        .builder("c", &["forever"], "")
        .write(tmp.path());
    let mut master = Master::start(&dir);
    force_and_wait(&master, "b", 1);
    master.wait_for_log(
        "stopping latent worker: its build ended",
        1,
        Duration::from_secs(30),
    );
    force_and_wait(&master, "b", 2);
    master.wait_for_log(
        "stopping latent worker: its build ended",
        2,
        Duration::from_secs(30),
    );
    // `forever` (-1) stays up after its build, until the master stops.
    force_and_wait(&master, "c", 3);
    wait_until(Duration::from_secs(30), "once stopped", || {
        latent_states(&master)
            .iter()
            .any(|(n, s, _)| n == "once" && s == "stopped")
            .then_some(())
    });
    holds_for(Duration::from_secs(2), "forever stays idle", || {
        latent_states(&master)
            .iter()
            .any(|(n, s, _)| n == "forever" && s == "idle")
    });
    assert_eq!(worker_processes(tmp.path()).len(), 1);
    assert_eq!(master.stop(), Some(0));
    no_worker_left(tmp.path(), Duration::from_secs(10));
    assert_has(&master.log(), "stopped 1 latent worker(s)");
}

/// Ends, when dropped, every instance the command workers of `root`
/// started (their pid files), so that a failing test leaves none behind:
/// they run in sessions of their own, which nothing else would end.
struct Instances<'a>(&'a Path);

impl Drop for Instances<'_> {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.0) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !(name.starts_with("instance-") && name.ends_with(".pid")) {
                continue;
            }
            let pid = std::fs::read_to_string(e.path())
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok());
            if let Some(pid) = pid.filter(|p| worker_processes(self.0).contains(p)) {
                // SAFETY: a pid checked just before to be a worker of this
                // test's directory.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// Scripts that start and stop a kiln worker in the background, as a
/// cloud CLI starts and stops an instance; `start` takes extra shell to
/// misbehave with.
fn command_worker(root: &Path, name: &str, start_extra: &str, more: &str) -> String {
    let scripts = root.join("scripts");
    std::fs::create_dir_all(&scripts).expect("mkdir");
    let start = scripts.join(format!("start-{name}.sh"));
    let stop = scripts.join(format!("stop-{name}.sh"));
    std::fs::write(
        &start,
        format!(
            r#"#!/bin/sh
set -e
{start_extra}
d="$ROOT/instance-$KILN_WORKER_NAME"
mkdir -p "$d"
rm -f "$d/kiln-worker.json"
"$KILN" worker create "$d" --master "$KILN_MASTER" --name "$KILN_WORKER_NAME" --password "${{PASSWORD:-$KILN_WORKER_PASSWORD}}" >/dev/null
setsid "$KILN" worker start "$d" >"$d.log" 2>&1 </dev/null &
echo $! >"$d.pid"
echo started >>"$ROOT/calls-$KILN_WORKER_NAME"
"#
        ),
    )
    .expect("start script");
    std::fs::write(
        &stop,
        r#"#!/bin/sh
d="$ROOT/instance-$KILN_WORKER_NAME"
if [ -f "$d.pid" ]; then
  pid=$(cat "$d.pid")
  kill "$pid" 2>/dev/null || true
  i=0
  while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  rm -f "$d.pid"
fi
echo stopped >>"$ROOT/calls-$KILN_WORKER_NAME"
"#,
    )
    .expect("stop script");
    for f in [&start, &stop] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    format!(
        r#"CommandLatentWorker("{name}", "pw-{name}", #{{ start: ["{start}"], stop: ["{stop}"],
            env: #{{ ROOT: "{root}", KILN: "{kiln}" }}{more} }})"#,
        start = start.display(),
        stop = stop.display(),
        root = root.display(),
        kiln = env!("CARGO_BIN_EXE_kiln"),
    )
}

fn calls(root: &Path, name: &str) -> Vec<String> {
    std::fs::read_to_string(root.join(format!("calls-{name}")))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn failed_starts_are_retried_on_another_latent_worker_and_the_request_still_builds() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path();
    let _instances = Instances(root);
    let dir = Script::steps(TRUE)
        // Its start command fails.
        .worker_expr(&command_worker(
            root,
            "broken",
            "echo no capacity in us-east-1 >&2; exit 3",
            "",
        ))
        // Its start command succeeds but nothing ever connects.
        .worker_expr(&command_worker(
            root,
            "silent",
            "exit 0",
            ", missing_timeout: 2",
        ))
        // Its start command hangs.
        .worker_expr(&command_worker(
            root,
            "hangs",
            "sleep 600",
            ", missing_timeout: 2",
        ))
        // It connects with a wrong password.
        .worker_expr(&command_worker(root, "wrongpw", "export PASSWORD=nope", ""))
        .worker_expr(&command_worker(root, "good", "", ""))
        .builder("b", &["broken", "silent", "hangs", "wrongpw", "good"], "")
        .key("latentStartConcurrency: 1")
        .write(root);
    let mut master = Master::start(&dir);
    let b = force_and_wait(&master, "b", 1);
    assert_eq!(b[0].result, Some(Results::Success));
    assert_eq!(b[0].worker, "good");
    let states = latent_states(&master);
    let state_of = |n: &str| states.iter().find(|s| s.0 == n).cloned().expect("listed");
    let broken = state_of("broken");
    assert_eq!(broken.1, "failed", "{states:?}");
    assert_has(&broken.2, "exited with exit status: 3");
    assert_has(&broken.2, "no capacity in us-east-1");
    let silent = state_of("silent");
    assert_eq!(silent.1, "failed", "{states:?}");
    assert_has(&silent.2, "did not connect within missing_timeout (2 s)");
    let hangs = state_of("hangs");
    assert_eq!(hangs.1, "failed", "{states:?}");
    assert_has(&hangs.2, "ran longer than 2 s");
    let wrong = state_of("wrongpw");
    assert_eq!(wrong.1, "failed", "{states:?}");
    assert_has(
        &wrong.2,
        "the master refused it: wrong password for worker `wrongpw`",
    );
    // Each failed start was followed by its stop command: nothing runs.
    assert_eq!(calls(root, "broken"), ["stopped"]);
    assert_eq!(calls(root, "silent"), ["stopped"]);
    assert_eq!(calls(root, "hangs"), ["stopped"]);
    // The hanging command was ended with what it started.
    assert!(
        !running(&[b"sleep", b"600"]),
        "the start command's sleep is left"
    );
    assert_eq!(calls(root, "wrongpw"), ["started", "stopped"]);
    let metrics = common::http_get(&format!("{}/metrics", master.http_url()));
    assert_has(&metrics, "kiln_latent_failed_starts_total 4");
    assert_eq!(master.stop(), Some(0));
    assert_eq!(calls(root, "good"), ["started", "stopped"]);
    no_worker_left(root, Duration::from_secs(10));
}

#[test]
fn a_latent_worker_lost_mid_build_gives_retry_and_a_fresh_start_builds_it_again() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = Script::steps(&waits_for_release(tmp.path()))
        .worker_expr(r#"LocalLatentWorker("l0", "pw", #{ build_wait_timeout: 60 })"#)
        .builder("b", &["l0"], "")
        .write(tmp.path());
    let mut master = Master::start(&dir);
    force(&master, "b");
    let pid = wait_until(Duration::from_secs(60), "the build to run", || {
        let p = worker_processes(tmp.path());
        (p.len() == 1 && builds(&dir).len() == 1).then(|| p[0])
    });
    // The instance dies (the worker is killed, as a spot instance is).
    // SAFETY: a pid just read from /proc as this test's worker.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    std::fs::write(tmp.path().join("release"), "").expect("release");
    wait_until(
        Duration::from_secs(60),
        "the build again, on a fresh start",
        || finished(&dir, 2).then_some(()),
    );
    let b = builds(&dir);
    assert_eq!(b[0].result, Some(Results::Retry), "{b:?}");
    assert_eq!(b[1].result, Some(Results::Success), "{b:?}");
    assert_eq!(requests(&dir), [done(Results::Success)]);
    assert_eq!(master.stop(), Some(0));
    no_worker_left(tmp.path(), Duration::from_secs(10));
}

#[test]
fn a_reload_that_removes_a_busy_latent_worker_lets_its_build_finish_then_stops_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let script = |workers: &[&str]| {
        let mut s = Script::steps(&waits_for_release(tmp.path()));
        for w in workers {
            s = s.worker_expr(&format!(
                r#"LocalLatentWorker("{w}", "pw", #{{ build_wait_timeout: -1 }})"#
            ));
        }
        s.builder("b", workers, "").render()
    };
    let dir = master_script(tmp.path(), &script(&["old"]));
    let mut master = Master::start(&dir);
    force(&master, "b");
    wait_until(Duration::from_secs(60), "the build to run on old", || {
        (builds(&dir).len() == 1 && worker_processes(tmp.path()).len() == 1).then_some(())
    });
    std::fs::write(dir.join("master.rhai"), script(&["new"])).expect("save");
    master.wait_for_log("config reloaded", 1, Duration::from_secs(30));
    // The build goes on; `old` is not stopped under it.
    holds_for(Duration::from_secs(1), "old keeps building", || {
        worker_processes(tmp.path()).len() == 1 && builds(&dir)[0].result.is_none()
    });
    std::fs::write(tmp.path().join("release"), "").expect("release");
    wait_until(Duration::from_secs(60), "the build", || {
        finished(&dir, 1).then_some(())
    });
    assert_eq!(builds(&dir)[0].result, Some(Results::Success));
    assert_eq!(builds(&dir)[0].worker, "old");
    wait_until(Duration::from_secs(30), "old stopped and gone", || {
        let s = latent_states(&master);
        (worker_processes(tmp.path()).is_empty()
            && !s.iter().any(|(n, st, _)| n == "old" && st != "stopped"))
        .then_some(())
    });
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn a_killed_master_leaves_no_latent_worker_behind() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path();
    let _instances = Instances(root);
    let dir = Script::steps(TRUE)
        .worker_expr(r#"LocalLatentWorker("local", "pw", #{ build_wait_timeout: -1 })"#)
        .worker_expr(&command_worker(
            root,
            "cloud",
            "",
            ", build_wait_timeout: -1",
        ))
        .builder("b", &["local"], "")
        .builder("c", &["cloud"], "")
        .write(root);
    let mut master = Master::start(&dir);
    force_and_wait(&master, "b", 1);
    force_and_wait(&master, "c", 2);
    assert_eq!(worker_processes(root).len(), 2);
    master.kill();
    // The local worker dies with the master; the cloud one outlives it, as
    // an instance would.
    wait_until(Duration::from_secs(30), "the local worker to end", || {
        (worker_processes(root).len() == 1).then_some(())
    });
    let cloud_pid: i32 = std::fs::read_to_string(root.join("instance-cloud.pid"))
        .expect("pid")
        .trim()
        .parse()
        .expect("a pid");
    assert_eq!(worker_processes(root), [cloud_pid]);
    // The next start runs the stop command of what the last one started.
    let mut master = Master::start(&dir);
    master.wait_for_log(
        "a previous run started this latent worker",
        1,
        Duration::from_secs(30),
    );
    no_worker_left(root, Duration::from_secs(30));
    wait_until(Duration::from_secs(30), "the stop command to end", || {
        (calls(root, "cloud") == ["started", "stopped"]).then_some(())
    });
    assert!(all_in(&master, "stopped"), "{:?}", latent_states(&master));
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn latent_worker_options_are_checked() {
    let tmp = tempfile::tempdir().expect("tmp");
    for (worker, expected) in [
        (
            r#"LocalLatentWorker("l", "pw", #{ build_wait_timeout: -2 })"#,
            "got -2",
        ),
        (
            r#"CommandLatentWorker("c", "pw", #{ start: [], stop: ["true"] })"#,
            "`start` in CommandLatentWorker is empty",
        ),
        (
            r#"CommandLatentWorker("c", "pw", #{ start: ["true"] })"#,
            "CommandLatentWorker needs `stop`",
        ),
        (
            r#"LocalLatentWorker("l", "pw", #{ build_wait_timout: 5 })"#,
            "build_wait_timeout",
        ),
    ] {
        let dir: PathBuf = Script::steps(TRUE)
            .worker_expr(worker)
            .builder("b", &["l"], "")
            .write(tmp.path());
        let out = common::kiln(&dir, &["checkconfig", "."], Duration::from_secs(60));
        out.fails_with(expected);
    }
}

#[test]
fn a_reload_that_changes_a_busy_latent_worker_stops_it_after_its_build_then_uses_the_new_config() {
    let tmp = tempfile::tempdir().expect("tmp");
    let script = |timeout: i64| {
        Script::steps(&waits_for_release(tmp.path()))
            .worker_expr(&format!(
                r#"LocalLatentWorker("l", "pw", #{{ build_wait_timeout: {timeout} }})"#
            ))
            .builder("b", &["l"], "")
            .render()
    };
    let dir = master_script(tmp.path(), &script(-1));
    let mut master = Master::start(&dir);
    force(&master, "b");
    wait_until(Duration::from_secs(60), "the build to run", || {
        (builds(&dir).len() == 1 && worker_processes(tmp.path()).len() == 1).then_some(())
    });
    std::fs::write(dir.join("master.rhai"), script(0)).expect("save");
    master.wait_for_log("config reloaded", 1, Duration::from_secs(30));
    assert_has(&master.log(), "workers: ~1 (l)");
    holds_for(Duration::from_secs(1), "the build goes on", || {
        worker_processes(tmp.path()).len() == 1 && builds(&dir)[0].result.is_none()
    });
    std::fs::write(tmp.path().join("release"), "").expect("release");
    wait_until(Duration::from_secs(60), "the build", || {
        finished(&dir, 1).then_some(())
    });
    // Stopped once its build ended (its config changed) ...
    no_worker_left(tmp.path(), Duration::from_secs(30));
    // ... and started anew with the new config: 0 stops it after the build.
    let b = force_and_wait(&master, "b", 2);
    assert_eq!(b[1].result, Some(Results::Success));
    no_worker_left(tmp.path(), Duration::from_secs(30));
    master.wait_for_log(
        "stopping latent worker: its build ended",
        1,
        Duration::from_secs(30),
    );
    assert_eq!(master.stop(), Some(0));
}
