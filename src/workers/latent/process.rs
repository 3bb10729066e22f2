//! The processes behind latent workers: a kind's start and stop commands,
//! a local worker's child process, and the checks that a pid read from a
//! file is still one of this master's workers before it is signalled.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tokio::process::Command;

use super::MasterAddr;
use crate::config::Worker;

/// Runs a start or stop command with the worker's name, password and the
/// master's address in its environment; fails with its exit status and
/// the end of its output.
pub(super) async fn run_command(
    argv: &[String],
    env: &BTreeMap<String, String>,
    worker: &Worker,
    addr: &MasterAddr,
    limit: Duration,
) -> Result<(), String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("the command is empty".into());
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .envs(env)
        .env("KILN_WORKER_NAME", &worker.name)
        .env("KILN_WORKER_PASSWORD", worker.password.expose())
        .env("KILN_MASTER", &addr.addr)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // Its own process group, so that a command that runs too long is
        // ended with everything it started and still waits on.
        .process_group(0)
        .kill_on_drop(true);
    if let Some(ca) = &addr.ca {
        cmd.env("KILN_MASTER_CA", ca);
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot run `{program}`: {e}"))?;
    let pid = child.id();
    let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Err(_) => {
            if let Some(pid) = pid {
                // SAFETY: kill(2) on the process group this function
                // created: a group id is not reused while any member of
                // the group lives, so this reaches only what the command
                // started (or no one).
                unsafe {
                    libc::kill(-(pid as i32), libc::SIGKILL);
                }
            }
            return Err(format!("`{program}` ran longer than {} s", limit.as_secs()));
        }
        Ok(Err(e)) => return Err(format!("cannot run `{program}`: {e}")),
        Ok(Ok(out)) => out,
    };
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if text.is_empty() {
        text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    let tail: String = text
        .lines()
        .rev()
        .take(5)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    Err(format!("`{program}` exited with {}: {tail}", out.status))
}

/// Asks the worker process to end (SIGTERM), then kills it.
pub(super) async fn end_child(name: &str, mut child: tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a pid this process spawned and still owns
        // (its Child is not reaped yet), so the pid cannot be reused.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
    match tokio::time::timeout(Duration::from_secs(15), child.wait()).await {
        Ok(_) => {}
        Err(_) => {
            tracing::warn!(worker = %name, "latent worker did not end on SIGTERM; killing it");
            let _ = child.kill().await;
        }
    }
}

/// Ends a process of a previous run (SIGTERM, then SIGKILL).
pub(super) async fn end_pid(pid: i32) {
    // SAFETY: kill(2) on a pid checked just before to be kiln's worker of
    // this basedir (see `is_worker_process`).
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // SAFETY: as above.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Whether `pid` is kiln's worker running in `dir` (its command line says
/// `worker start DIR`), so that a reused pid is never signalled.
pub(super) fn is_worker_process(pid: i32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let dir = dir.as_os_str().as_encoded_bytes();
    args.windows(3)
        .any(|w| w[0] == b"worker" && w[1] == b"start" && w[2] == dir)
}

/// On Linux the child gets SIGTERM when the master's thread that started
/// it exits, so a master killed with SIGKILL leaves no worker behind.
pub(super) fn die_with_the_master(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    // SAFETY: the closure runs in the child between fork and exec and
    // calls only prctl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
