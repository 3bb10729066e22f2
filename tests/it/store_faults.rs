//! The database's disk fills while a build writes its log: the master
//! stays up, says so (`/health`, `/metrics`), holds the writes, and when
//! there is room again the build ends as it would have, its log whole and
//! written once. The disk is a real one: a small tmpfs (the test runs as
//! root, as `.ci/test` does).

use crate::common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::workers::*;
use common::{http_get, wait_until, Master};

/// A tmpfs of `size` mounted at `at`, unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).expect("mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs to fill a real disk, which needs root (as .ci/test runs): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(at.to_path_buf())
    }

    /// Writes `name` until the disk is full.
    fn fill(&self, name: &str) {
        let mut f = std::fs::File::create(self.0.join(name)).expect("filler");
        let block = vec![0u8; 64 * 1024];
        for _ in 0..100_000 {
            if f.write_all(&block).and_then(|_| f.sync_all()).is_err() {
                return;
            }
        }
        panic!("{} never filled", self.0.display());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_full_disk_holds_the_build_log_and_the_build_ends_whole_when_there_is_room() {
    let tmp = tempfile::tempdir().expect("tmp");
    let disk = SmallDisk::mount(&tmp.path().join("disk"), "24m");
    let go = tmp.path().join("go");
    // The step waits (at most 60 s) for `go`, then writes 20,000 lines.
    let steps = format!(
        r#"f.addStep(ShellCommand(#{{ name: "count", command: ["sh", "-c", "for i in $(seq 600); do [ -e {go} ] && break; sleep 0.1; done; seq 20000"] }}));"#,
        go = go.display()
    );
    let dir = Script::steps(&steps)
        .worker("w1", "pw-one")
        .builder("b", &["w1"], "")
        .write_to(&disk.0.join("master"));
    let mut master = Master::start(&dir);
    let url = master.http_url();
    let _w1 = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    force(&master, "b");
    wait_until(Duration::from_secs(30), "the step running", || {
        builds(&dir)
            .first()
            .filter(|b| b.steps.iter().any(|s| s.0 == "count"))
            .map(|_| ())
    });

    disk.fill("filler");
    std::fs::write(&go, "").expect("go");
    wait_until(
        Duration::from_secs(60),
        "the master saying the database is full",
        || {
            let m = http_get(&format!("{url}/metrics"));
            (metric(&m, "kiln_store_faults_total{kind=\"full\"}") > 0
                && metric(&m, "kiln_store_waiting") > 0)
                .then_some(())
        },
    );
    let health = http_get(&format!("{url}/health"));
    assert!(health.contains(r#""status":"degraded""#), "{health}");
    assert!(health.contains("full"), "{health}");
    assert!(builds(&dir)[0].result.is_none(), "the build waits");

    std::fs::remove_file(disk.0.join("filler")).expect("room again");
    wait_until(Duration::from_secs(60), "the build finished", || {
        finished(&dir, 1).then_some(())
    });
    let b = &builds(&dir)[0];
    assert_eq!(b.result, Some(Results::Success), "{b:?}");
    let text = all_log_text(&dir);
    let numbers: Vec<u32> = text
        .lines()
        .filter_map(|l| l.strip_prefix('o')?.parse().ok())
        .collect();
    let in_order = numbers
        .iter()
        .enumerate()
        .all(|(i, n)| *n as usize == i + 1);
    assert!(
        numbers.len() == 20000 && in_order,
        "every line once, in order: {} lines, first {:?}; the log begins {:?}",
        numbers.len(),
        &numbers[..numbers.len().min(5)],
        &text[..text.len().min(300)]
    );
    let health = http_get(&format!("{url}/health"));
    assert!(health.contains(r#""status":"ok""#), "{health}");
    common::assert_has(&master.log(), "the database takes writes again");
    assert_eq!(master.stop(), Some(0));
}
