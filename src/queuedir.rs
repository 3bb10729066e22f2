//! Queue directories, as Mozilla's `mozilla_buildtools.queuedir` kept them,
//! and the runner that works through one (Mozilla's command_runner).
//!
//! A queue is a directory with `tmp/`, `new/`, `cur/`, `logs/` and `dead/`.
//! An item is written whole into `tmp/`, synced, and renamed into `new/`:
//! it exists for the runner only once complete. The runner renames an item
//! from `new/` to `cur/` while it runs it (a rename is atomic, so two
//! runners never take the same item), deletes it when its command
//! succeeds, and otherwise renames it back into `new/` with its retry count
//! and the time before which it must not run again (exponential backoff),
//! until it has failed `max_retries` times: then it goes to `dead/` with
//! its log. Nothing is lost across a crash: [`QueueDir::recover`] (run
//! before a runner starts) puts what was in `cur/` back into `new/`, and
//! moves a complete item left in `tmp/` into `new/` (a torn one, never
//! added, is removed).
//!
//! An item's name is `ID` or `ID+rN@T` (failed N times, not to run before
//! the Unix time T); its content is a JSON [`Item`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// One queued command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub command: Vec<String>,
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// When it was queued (Unix seconds).
    #[serde(default)]
    pub created: i64,
    /// Where the command runs (a master queues its master dir, so that a
    /// script's relative `bin/postrun.py` means the master's); the
    /// runner's own directory when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct QueueDir {
    root: PathBuf,
}

const PARTS: [&str; 5] = ["tmp", "new", "cur", "logs", "dead"];

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// (id, failures so far, not before)
fn parse_name(name: &str) -> (&str, u32, i64) {
    let Some((id, rest)) = name.split_once("+r") else {
        return (name, 0, 0);
    };
    let (n, at) = rest.split_once('@').unwrap_or((rest, "0"));
    (id, n.parse().unwrap_or(0), at.parse().unwrap_or(0))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

impl QueueDir {
    /// Opens the queue at `root`, making its directories if needed.
    pub fn open(root: &Path) -> anyhow::Result<QueueDir> {
        for part in PARTS {
            let d = root.join(part);
            std::fs::create_dir_all(&d)
                .with_context(|| format!("cannot make the queue directory {}", d.display()))?;
        }
        Ok(QueueDir {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn part(&self, part: &str, name: &str) -> PathBuf {
        self.root.join(part).join(name)
    }

    /// Queues `item`; returns its id once it is in `new/`.
    pub fn add(&self, item: &Item) -> anyhow::Result<String> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let id = format!(
            "{nanos}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let tmp = self.part("tmp", &id);
        {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            f.write_all(&serde_json::to_vec(item)?)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.part("new", &id))
            .with_context(|| format!("cannot move {id} into {}/new", self.root.display()))?;
        sync_dir(&self.root.join("new"));
        Ok(id)
    }

    /// Names in `part`, oldest first.
    fn names(&self, part: &str) -> anyhow::Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(self.root.join(part))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.') && !n.ends_with(".log"))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Items waiting in `new/` (also those backing off).
    pub fn waiting(&self) -> anyhow::Result<Vec<String>> {
        self.names("new")
    }

    pub fn dead(&self) -> anyhow::Result<Vec<String>> {
        self.names("dead")
    }

    /// Takes the oldest item that may run now: moves it to `cur/` and
    /// returns its name and content. An unreadable item goes to `dead/`.
    pub fn pop(&self) -> anyhow::Result<Option<(String, Item)>> {
        let now = unix_now();
        for name in self.names("new")? {
            if parse_name(&name).2 > now {
                continue;
            }
            let cur = self.part("cur", &name);
            if std::fs::rename(self.part("new", &name), &cur).is_err() {
                continue; // another runner took it
            }
            let parsed = std::fs::read(&cur)
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(serde_json::from_slice::<Item>(&b)?));
            match parsed {
                Ok(item) => return Ok(Some((name, item))),
                Err(e) => {
                    self.bury(&name, &format!("unreadable queue item: {e:#}\n"))?;
                }
            }
        }
        Ok(None)
    }

    /// The item ran: it leaves the queue.
    pub fn done(&self, name: &str) -> anyhow::Result<()> {
        std::fs::remove_file(self.part("cur", name))?;
        let _ = std::fs::remove_file(self.part("logs", &format!("{}.log", parse_name(name).0)));
        Ok(())
    }

    /// The item failed: back into `new/` after a backoff (`base` × 2^N), or
    /// into `dead/` once it has failed `max_retries` times. Returns
    /// whether it is dead.
    pub fn failed(
        &self,
        name: &str,
        log: &str,
        max_retries: u32,
        base: Duration,
    ) -> anyhow::Result<bool> {
        let (id, failures, _) = parse_name(name);
        let failures = failures + 1;
        let log_path = self.part("logs", &format!("{id}.log"));
        {
            use std::io::Write as _;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)?;
            writeln!(f, "--- attempt {failures} ---")?;
            f.write_all(log.as_bytes())?;
        }
        if failures >= max_retries {
            let all = std::fs::read_to_string(&log_path).unwrap_or_default();
            self.bury(name, &all)?;
            let _ = std::fs::remove_file(&log_path);
            return Ok(true);
        }
        let delay = base
            .as_secs()
            .saturating_mul(1 << (failures - 1).min(16))
            .min(3600);
        let next = format!("{id}+r{failures}@{}", unix_now() + delay as i64);
        std::fs::rename(self.part("cur", name), self.part("new", &next))?;
        sync_dir(&self.root.join("new"));
        Ok(false)
    }

    /// Moves an item from `cur/` to `dead/`, with its log beside it.
    fn bury(&self, name: &str, log: &str) -> anyhow::Result<()> {
        let id = parse_name(name).0;
        std::fs::write(self.part("dead", &format!("{id}.log")), log)?;
        std::fs::rename(self.part("cur", name), self.part("dead", id))?;
        Ok(())
    }

    /// After a crash: what was running goes back to `new/`; a complete
    /// item left in `tmp/` goes to `new/`, a torn one is removed. Returns
    /// how many items it put back.
    pub fn recover(&self) -> anyhow::Result<usize> {
        let mut n = 0;
        for name in self.names("cur")? {
            std::fs::rename(self.part("cur", &name), self.part("new", &name))?;
            n += 1;
        }
        for name in self.names("tmp")? {
            let path = self.part("tmp", &name);
            let whole = std::fs::read(&path)
                .ok()
                .is_some_and(|b| serde_json::from_slice::<Item>(&b).is_ok());
            if whole {
                std::fs::rename(&path, self.part("new", &name))?;
                n += 1;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        sync_dir(&self.root.join("new"));
        Ok(n)
    }
}

/// How a runner treats its queue.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Failures before an item goes to `dead/`.
    pub max_retries: u32,
    /// The first retry's delay; each later one doubles it.
    pub backoff: Duration,
    /// A command running longer is killed (and counts as a failure).
    pub timeout: Duration,
    /// How often `new/` is looked at when it is empty.
    pub poll: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            max_retries: 5,
            backoff: Duration::from_secs(60),
            timeout: Duration::from_secs(3600),
            poll: Duration::from_secs(1),
        }
    }
}

/// Runs one item's command; Ok(()) when it exits 0, else its output and
/// why it failed.
async fn run_item(item: &Item, timeout: Duration) -> Result<(), String> {
    let Some((program, args)) = item.command.split_first() else {
        return Err("the item has an empty command\n".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).envs(&item.env);
    if let Some(dir) = &item.cwd {
        cmd.current_dir(dir);
    }
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    let out = match tokio::time::timeout(timeout, cmd.output()).await {
        Err(_) => {
            return Err(format!(
                "{program}: still running after {timeout:?}; killed\n"
            ))
        }
        Ok(Err(e)) => return Err(format!("cannot run {program}: {e}\n")),
        Ok(Ok(out)) => out,
    };
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{}{}{program} exited with {}\n",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        out.status
    ))
}

/// Works through `queue` until `cancel` fires (or, with `once`, until no
/// item may run now). Returns (succeeded, failed attempts, dead).
pub async fn run(
    queue: &QueueDir,
    opts: &RunOptions,
    once: bool,
    cancel: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<(usize, usize, usize)> {
    let recovered = queue.recover()?;
    if recovered > 0 {
        tracing::warn!(queue = %queue.root.display(), "{recovered} item(s) left by a crash were queued again");
    }
    let (mut ok, mut failed, mut dead) = (0, 0, 0);
    loop {
        if cancel.is_cancelled() {
            break;
        }
        let Some((name, item)) = queue.pop()? else {
            if once {
                break;
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(opts.poll) => continue,
            }
        };
        // Stopping leaves a running item in cur/ (its command is killed):
        // the next runner's recover() queues it again.
        let outcome = tokio::select! {
            r = run_item(&item, opts.timeout) => r,
            _ = cancel.cancelled() => break,
        };
        match outcome {
            Ok(()) => {
                queue.done(&name)?;
                ok += 1;
            }
            Err(log) => {
                failed += 1;
                if queue.failed(&name, &log, opts.max_retries, opts.backoff)? {
                    dead += 1;
                    tracing::error!(queue = %queue.root.display(), "{name} failed {} times; moved to dead/", opts.max_retries);
                } else {
                    tracing::warn!(queue = %queue.root.display(), "{name} failed; it will be retried");
                }
            }
        }
    }
    Ok((ok, failed, dead))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(cmd: &[&str]) -> Item {
        Item {
            command: cmd.iter().map(|s| s.to_string()).collect(),
            env: Default::default(),
            created: 0,
            cwd: None,
        }
    }

    fn ls(q: &QueueDir, part: &str) -> Vec<String> {
        q.names(part).expect("ls")
    }

    #[test]
    fn a_crash_between_any_two_moves_loses_nothing() {
        let tmp = tempfile::tempdir().expect("tmp");
        let q = QueueDir::open(tmp.path()).expect("open");

        // Crash after writing tmp/, before the rename: the item is whole.
        std::fs::write(
            q.part("tmp", "1-1-0"),
            serde_json::to_vec(&item(&["true"])).expect("json"),
        )
        .expect("w");
        // A torn write (the crash came mid-write): it was never added.
        std::fs::write(q.part("tmp", "1-1-1"), b"{\"command\": [\"tr").expect("w");
        // Crash while an item ran: it is in cur/.
        let running = q.add(&item(&["echo", "b"])).expect("add");
        let (name, _) = q.pop().expect("pop").expect("an item");
        assert_eq!(name, running);
        assert_eq!(ls(&q, "cur"), std::slice::from_ref(&running));

        assert_eq!(q.recover().expect("recover"), 2);
        assert_eq!(ls(&q, "tmp"), Vec::<String>::new());
        assert_eq!(ls(&q, "cur"), Vec::<String>::new());
        let mut waiting = ls(&q, "new");
        waiting.sort();
        let mut expected = vec!["1-1-0".to_string(), running];
        expected.sort();
        assert_eq!(waiting, expected);

        // Crash after a failure's log, before its rename back: still in
        // cur/, and recovered again with its name (and so its count).
        let (name, _) = q.pop().expect("pop").expect("item");
        std::fs::rename(q.part("cur", &name), q.part("cur", &format!("{name}+r2@0"))).expect("mv");
        q.recover().expect("recover");
        assert!(ls(&q, "new").contains(&format!("{name}+r2@0")));
    }

    #[tokio::test]
    async fn successes_leave_failures_back_off_and_die_with_their_log() {
        let tmp = tempfile::tempdir().expect("tmp");
        let q = QueueDir::open(tmp.path()).expect("open");
        let marker = tmp.path().join("ran");
        q.add(&item(&[
            "sh",
            "-c",
            &format!("echo ran >> {}", marker.display()),
        ]))
        .expect("add");
        q.add(&item(&["sh", "-c", "echo broken-postrun >&2; exit 3"]))
            .expect("add");
        // An item that names its directory runs there.
        let home = tempfile::tempdir().expect("cwd");
        q.add(&Item {
            cwd: Some(home.path().to_path_buf()),
            ..item(&["sh", "-c", "echo here > ./relative"])
        })
        .expect("add");
        let opts = RunOptions {
            max_retries: 3,
            backoff: Duration::ZERO,
            timeout: Duration::from_secs(30),
            poll: Duration::from_millis(10),
        };
        let cancel = tokio_util::sync::CancellationToken::new();
        let (ok, failed, dead) = run(&q, &opts, true, &cancel).await.expect("run");
        assert_eq!((ok, failed, dead), (2, 3, 1));
        assert!(home.path().join("relative").exists(), "ran in its cwd");
        assert_eq!(std::fs::read_to_string(&marker).expect("marker"), "ran\n");
        assert!(ls(&q, "new").is_empty() && ls(&q, "cur").is_empty());
        let dead = q.dead().expect("dead");
        assert_eq!(dead.len(), 1);
        let log =
            std::fs::read_to_string(q.part("dead", &format!("{}.log", dead[0]))).expect("log");
        assert_eq!(log.matches("broken-postrun").count(), 3, "{log}");
        assert!(log.contains("--- attempt 3 ---"), "{log}");

        // With a backoff, a failed item waits in new/ with its count.
        q.add(&item(&["false"])).expect("add");
        let slow = RunOptions {
            backoff: Duration::from_secs(600),
            ..opts
        };
        let (_, failed, dead) = run(&q, &slow, true, &cancel).await.expect("run");
        assert_eq!((failed, dead), (1, 0));
        let waiting = q.waiting().expect("new");
        assert_eq!(waiting.len(), 1);
        let (_, n, at) = parse_name(&waiting[0]);
        assert_eq!(n, 1);
        assert!(
            at >= unix_now() + 590,
            "not before ten minutes: {}",
            waiting[0]
        );
        assert!(q.pop().expect("pop").is_none(), "it may not run yet");
    }
}

/// Property-based checks: any item name parses, and a retry's name gives
/// back what it was made of; any bytes in an item file are run or buried
/// in `dead/`, never lost and never a panic. `PROPTEST_CASES=N` runs more
/// (bench/fuzz.sh).
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn fuzz_any_name_parses_and_retry_names_round_trip(
            name in ".{0,40}",
            id in "[0-9a-z.-]{1,24}",
            failures in any::<u32>(),
            at in 0i64..i64::MAX,
        ) {
            let _ = parse_name(&name);
            let made = format!("{id}+r{failures}@{at}");
            prop_assert_eq!(parse_name(&made), (id.as_str(), failures, at));
        }

        #[test]
        fn fuzz_any_item_file_is_run_or_buried(
            bytes in prop_oneof![
                vec(any::<u8>(), 0..200),
                Just(br#"{"command": ["true"]}"#.to_vec()),
                Just(br#"{"command": "true", "env": 5}"#.to_vec()),
                Just(br#"{"command": [], "created": "yesterday"}"#.to_vec()),
            ],
        ) {
            let tmp = tempfile::tempdir().expect("tmp");
            let q = QueueDir::open(tmp.path()).expect("open");
            std::fs::write(q.part("new", "item1"), &bytes).expect("write");
            match q.pop().expect("pop") {
                Some((name, item)) => {
                    prop_assert_eq!(name, "item1");
                    prop_assert_eq!(Some(item), serde_json::from_slice::<Item>(&bytes).ok());
                }
                None => {
                    prop_assert!(serde_json::from_slice::<Item>(&bytes).is_err());
                    prop_assert!(q.part("dead", "item1").exists(), "buried, not lost");
                    let log = std::fs::read_to_string(q.part("dead", "item1.log")).expect("log");
                    prop_assert!(log.contains("unreadable queue item"), "{}", log);
                }
            }
        }
    }
}
