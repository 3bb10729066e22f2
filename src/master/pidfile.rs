//! The pid file: which process is the master of a dir, and its database
//! (for `kiln reconfig`, which must not depend on the config loading).
//!
//! The file holds three lines: the pid, the database's path, and the
//! process's start time (`/proc/PID/stat` field 22, clock ticks since
//! boot). A pid alone can name another process once the master is gone
//! and the pid is reused; the start time cannot, so a signal goes only to
//! the process that wrote the file.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The running master's process id, in the master dir.
pub const PID_FILE: &str = "kiln.pid";

/// The start time of process `pid`, from `/proc` (`None` without `/proc`,
/// or when the process is gone or has exited and waits to be reaped: a
/// zombie keeps its pid and start time but is no master).
fn start_time(pid: i32) -> Option<u64> {
    parse_start_time(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_start_time(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces or
    // parentheses itself: the fields after it follow the last ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    // Field 3, the state: Z (zombie) and X (dead) are ended processes.
    if matches!(fields.next()?, "Z" | "X") {
        return None;
    }
    // The start time is field 22.
    fields.nth(22 - 4)?.parse().ok()
}

/// What a master's pid file says of it.
#[derive(Debug)]
pub struct PidInfo {
    pub pid: i32,
    /// The master's database: an SQLite file, or a PostgreSQL URL without
    /// its password (absent in files of older masters).
    pub db: Option<String>,
    /// The master's start time (absent in files of older masters).
    started: Option<u64>,
}

impl PidInfo {
    /// Reads `dir`'s pid file, if there is one that names a pid.
    pub fn read(dir: &Path) -> Option<PidInfo> {
        let text = std::fs::read_to_string(dir.join(PID_FILE)).ok()?;
        let mut lines = text.lines().map(str::trim);
        let pid = lines.next()?.parse().ok().filter(|&p: &i32| p > 0)?;
        let db = lines.next().filter(|l| !l.is_empty()).map(String::from);
        let started = lines.next().and_then(|l| l.parse().ok());
        Some(PidInfo { pid, db, started })
    }

    /// Whether the process that wrote the file is still running: its pid
    /// is alive with the recorded start time (or, for a file without one,
    /// is a kiln).
    pub fn is_running(&self) -> bool {
        match (self.started, start_time(self.pid)) {
            (Some(recorded), Some(now)) => recorded == now,
            (Some(_), None) => !Path::new("/proc/self/stat").exists() && alive(self.pid),
            (None, _) => alive(self.pid) && cmdline_is_kiln(self.pid),
        }
    }

    /// Sends `signal` to the master, unless its pid now names another
    /// process. The check and the signal go through a pidfd where the
    /// kernel has them, so that the pid cannot be reused between the two.
    pub fn signal(&self, signal: i32) -> anyhow::Result<()> {
        let pid = self.pid;
        // SAFETY: pidfd_open takes a pid and flags and returns a new file
        // descriptor or -1; it touches no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ESRCH) {
                bail!("pid {pid} is gone");
            }
            // No pidfd (an old kernel): check, then signal.
            if !self.is_running() {
                bail!("pid {pid} is no longer the master");
            }
            // SAFETY: plain kill(2).
            if unsafe { libc::kill(pid, signal) } != 0 {
                bail!(
                    "cannot signal pid {pid}: {}",
                    std::io::Error::last_os_error()
                );
            }
            return Ok(());
        }
        let fd = fd as i32;
        // The fd now pins this process: if it is the master, the signal
        // below reaches the master and nothing else.
        let result = if !self.is_running() {
            Err(anyhow::anyhow!("pid {pid} is no longer the master"))
        } else {
            // SAFETY: pidfd_send_signal on the descriptor opened above,
            // with no siginfo (null) and no flags.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd,
                    signal,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
            if r != 0 {
                Err(anyhow::anyhow!(
                    "cannot signal pid {pid}: {}",
                    std::io::Error::last_os_error()
                ))
            } else {
                Ok(())
            }
        };
        // SAFETY: closing the descriptor this function opened.
        unsafe { libc::close(fd) };
        result
    }
}

fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn cmdline_is_kiln(pid: i32) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmd) => String::from_utf8_lossy(&cmd).contains("kiln"),
        // Without /proc, trust the pid file.
        Err(_) => true,
    }
}

/// The pid file, removed when the master ends.
pub(super) struct PidFile(PathBuf);

impl PidFile {
    pub(super) fn take(dir: &Path, db: &crate::store::Target) -> anyhow::Result<PidFile> {
        let path = dir.join(PID_FILE);
        let me = std::process::id() as i32;
        if let Some(other) = PidInfo::read(dir) {
            if other.pid != me && other.is_running() {
                bail!(
                    "a master is already running in {} (pid {}); `kiln stop {}` stops it",
                    dir.display(),
                    other.pid,
                    dir.display()
                );
            }
            tracing::info!(
                "removing a stale {PID_FILE} (pid {} is not running)",
                other.pid
            );
        }
        let mut f = std::fs::File::create(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        writeln!(f, "{me}")?;
        match db {
            crate::store::Target::Sqlite(path) => {
                writeln!(f, "{}", crate::diagnostics::canonical(path).display())?
            }
            // Without its password: a client reads it from the config.
            pg => writeln!(f, "{pg}")?,
        }
        if let Some(t) = start_time(me) {
            writeln!(f, "{t}")?;
        }
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let dir = self.0.parent().unwrap_or(Path::new("."));
        if PidInfo::read(dir).is_some_and(|p| p.pid == std::process::id() as i32) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_reads_as_running_and_a_reused_pid_does_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = std::process::id();
        let started = start_time(me as i32).expect("this test needs /proc");
        std::fs::write(dir.path().join(PID_FILE), format!("{me}\n/db\n{started}\n"))
            .expect("write");
        let info = PidInfo::read(dir.path()).expect("read");
        assert_eq!(info.db.as_deref(), Some("/db"));
        assert!(info.is_running());
        // The same pid with another start time: the master that wrote the
        // file is gone and the pid belongs to someone else now.
        std::fs::write(
            dir.path().join(PID_FILE),
            format!("{me}\n/db\n{}\n", started + 1),
        )
        .expect("write");
        let reused = PidInfo::read(dir.path()).expect("read");
        assert!(!reused.is_running());
        let err = reused.signal(libc::SIGTERM).expect_err("must not signal");
        assert!(err.to_string().contains("no longer the master"), "{err}");
    }

    #[test]
    fn a_process_name_with_spaces_and_parentheses_does_not_shift_the_fields() {
        let fields: Vec<String> = (3..=30).map(|i| i.to_string()).collect();
        let stat = format!("42 (kiln (a) b) {}", fields.join(" "));
        assert_eq!(parse_start_time(&stat), Some(22));
        let zombie = format!("42 (kiln) Z {}", fields[1..].join(" "));
        assert_eq!(parse_start_time(&zombie), None, "an exited process");
        assert_eq!(parse_start_time("42 (kiln) S 1"), None, "a short line");
        assert!(start_time(i32::MAX).is_none(), "no such process");
    }

    #[test]
    fn a_master_that_exited_but_is_not_yet_reaped_is_not_running() {
        use std::io::Write as _;
        // A child that runs until its stdin closes.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read x"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let pid = child.id() as i32;
        let started = start_time(pid).expect("this test needs /proc");
        let info = PidInfo {
            pid,
            db: None,
            started: Some(started),
        };
        assert!(info.is_running());
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin).expect("write");
        drop(stdin);
        // Not reaped: the pid stays, as a zombie, until wait().
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while info.is_running() {
            assert!(std::time::Instant::now() < deadline, "sh did not exit");
            std::thread::yield_now();
        }
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "still a zombie"
        );
        child.wait().expect("reap");
    }
}
