//! `kiln bench SCENARIO`: measurements that need kiln's insides, run in
//! the release build and reported as plain figures (BENCHMARKS.md says
//! which commands produced which numbers).

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;

use crate::schedulers::{Clock, Schedulers};
use crate::script::{load_master, Limits};
use crate::store::{NewChange, Store, DB_FILE};

/// A master of `schedulers` single-branch schedulers (treeStableTimer
/// `()`), each over its own branch and `builders` builders.
fn scheduler_master(schedulers: usize, builders: usize) -> String {
    let mut s = String::from(
        "let f = BuildFactory();\nf.addStep(ShellCommand(#{ command: [\"true\"] }));\nlet c = #{ workers: [Worker(\"w\", \"pw\")], builders: [], schedulers: [] };\n",
    );
    let _ = write!(
        s,
        "for b in 0..{schedulers} {{\n    let names = [];\n    for p in 0..{builders} {{\n        let n = `branch-${{b}} p${{p}}`;\n        names.push(n);\n        c.builders.push(BuilderConfig(#{{ name: n, workernames: [\"w\"], factory: f }}));\n    }}\n    c.schedulers.push(Scheduler(#{{ name: `branch-${{b}}`, branch: `projects/branch-${{b}}`, treeStableTimer: (), builderNames: names }}));\n}}\nc\n"
    );
    s
}

/// 10,000 changes (by default) over 200 single-branch schedulers of 5
/// builders: the time from the first change stored to the last build
/// request stored, and the store's write rate.
pub fn schedulers(changes: usize, schedulers: usize, builders: usize) -> anyhow::Result<()> {
    if schedulers == 0 || builders == 0 {
        bail!("--schedulers and --builders must be at least 1");
    }
    let tmp = std::env::temp_dir().join(format!("kiln-bench-schedulers-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).context("cannot create a scratch dir")?;
    let result = run_schedulers(&tmp, changes, schedulers, builders);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn run_schedulers(
    dir: &Path,
    changes: usize,
    schedulers: usize,
    builders: usize,
) -> anyhow::Result<()> {
    std::fs::write(
        dir.join("master.rhai"),
        scheduler_master(schedulers, builders),
    )?;
    let loaded = load_master(dir, Limits::default())
        .map_err(|f| anyhow::anyhow!("the generated master does not load: {f:?}"))?;
    let store = Store::open(&dir.join(DB_FILE))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let cancel = CancellationToken::new();
        let sched = Schedulers::start(
            &loaded.config,
            loaded.runtime(),
            store.clone(),
            Clock::new(),
            &cancel,
        );
        // Every scheduler has started (and recorded where it starts).
        let ready = Instant::now();
        while (0..schedulers).any(|b| sched.handled_up_to(&format!("branch-{b}")).is_none()) {
            if ready.elapsed() > Duration::from_secs(60) {
                bail!("the schedulers did not start within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let want = (changes * builders) as i64;
        let started = Instant::now();
        let cpu0 = cpu_seconds();
        // Changes arrive in pushes of 10, as a busy hook or poller stores them.
        for first in (0..changes).step_by(10) {
            let batch: Vec<NewChange> = (first..(first + 10).min(changes))
                .map(|i| NewChange {
                    author: "dev <dev@example.com>".into(),
                    comments: format!("push {i}"),
                    branch: Some(format!("projects/branch-{}", i % schedulers)),
                    revision: Some(format!("{:040x}", i + 1)),
                    repository: "r".into(),
                    project: "p".into(),
                    files: vec!["a.c".into()],
                    when_timestamp: 1_700_000_000,
                    ..Default::default()
                })
                .collect();
            store.add_changes("bench", batch, vec![]).await?;
        }
        let stored_changes = started.elapsed();
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let n = store.count_requests().await?;
            if n >= want {
                break;
            }
            if Instant::now() > deadline {
                bail!("only {n} of {want} build requests after 600 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let all = started.elapsed();
        let cpu = cpu_seconds() - cpu0;
        cancel.cancel();
        sched.stopped().await;
        // Rows written: per change its sourcestamp, change, file; per
        // buildset its row, sourcestamp and change links, scheduler
        // property, and a request per builder.
        let rows = changes * 3 + changes * (4 + builders);
        println!(
            "{changes} changes, {schedulers} schedulers x {builders} builders: {} build requests",
            want
        );
        println!(
            "changes stored after       {:8.3} s",
            stored_changes.as_secs_f64()
        );
        println!("last request stored after  {:8.3} s", all.as_secs_f64());
        println!(
            "rate                       {:8.0} changes/s, {:.0} requests/s, {:.0} rows/s",
            changes as f64 / all.as_secs_f64(),
            want as f64 / all.as_secs_f64(),
            rows as f64 / all.as_secs_f64()
        );
        println!("CPU                        {cpu:8.3} s");
        Ok(())
    })
}

/// This process's user + system CPU time.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}
