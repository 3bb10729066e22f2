//! Status handlers: a QueuedCommandHandler queues its command when a build
//! finishes and the master runs it; `kiln queue-run` works through a queue
//! directory, retrying and burying what keeps failing.

use crate::common;
use crate::common::kiln_ok;

use std::time::Duration;

use common::workers::*;
use common::{wait_until, Master};

#[test]
fn a_finished_build_queues_the_handlers_command_and_the_master_runs_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("postrun.out");
    let dir = master_script(
        tmp.path(),
        &format!(
            r#"
let f = BuildFactory();
f.addStep(ShellCommand(#{{ command: ["true"] }}));
let commands = QueueDir("commands", "queue/commands");
#{{
    protocols: #{{ msgpack_experimental_v7: #{{ port: 0 }} }},
    www: #{{ port: 0 }},
    workers: [Worker("w1", "pw-one")],
    schedulers: [ForceScheduler(#{{ name: "force", builderNames: ["linux"] }})],
    builders: [BuilderConfig(#{{ name: "linux", workernames: ["w1"], factory: f }})],
    status: [QueuedCommandHandler(#{{
        command: ["sh", "-c", "echo \"$1 $2 $3 results=$KILN_RESULTS\" >> {}", "postrun", WithProperties("--worker=%(workername)s")],
        queuedir: commands,
    }})],
}}
"#,
            out.display()
        ),
    );
    let master = Master::start(&dir);
    let _w = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    force(&master, "linux");
    force(&master, "linux");
    let text = wait_until(Duration::from_secs(60), "two postruns", || {
        let t = std::fs::read_to_string(&out).unwrap_or_default();
        (t.lines().count() >= 2).then_some(t)
    });
    assert_eq!(
        text, "--worker=w1 linux 1 results=0\n--worker=w1 linux 2 results=0\n",
        "the rendered command, then the builder and build number"
    );
    let queue = dir.join("queue/commands");
    wait_until(Duration::from_secs(30), "an empty queue", || {
        ["new", "cur", "tmp", "dead"]
            .iter()
            .all(|p| {
                std::fs::read_dir(queue.join(p))
                    .map(|d| d.count() == 0)
                    .unwrap_or(false)
            })
            .then_some(())
    });
}

#[test]
fn queue_run_runs_retries_and_buries_items_and_requeues_what_a_crash_left_running() {
    let tmp = tempfile::tempdir().expect("tmp");
    let q = tmp.path().join("q");
    for part in ["tmp", "new", "cur", "logs", "dead"] {
        std::fs::create_dir_all(q.join(part)).expect("mkdir");
    }
    let ran = tmp.path().join("ran");
    let item = |cmd: &[&str]| serde_json::json!({ "command": cmd }).to_string();
    std::fs::write(
        q.join("new/1-1-0"),
        item(&["sh", "-c", &format!("echo ok >> {}", ran.display())]),
    )
    .expect("item");
    std::fs::write(
        q.join("new/1-1-1"),
        item(&["sh", "-c", "echo nope >&2; exit 4"]),
    )
    .expect("item");
    // A crash left this one running.
    std::fs::write(
        q.join("cur/1-1-2"),
        item(&["sh", "-c", &format!("echo recovered >> {}", ran.display())]),
    )
    .expect("item");
    let out = kiln_ok(
        tmp.path(),
        &[
            "queue-run",
            "q",
            "--once",
            "--max-retries",
            "2",
            "--backoff",
            "0",
        ],
    );
    assert!(
        out.stdout
            .contains("2 item(s) ran, 2 failed attempt(s), 1 moved to dead/; 0 waiting"),
        "{}",
        out.stdout
    );
    let mut lines: Vec<String> = std::fs::read_to_string(&ran)
        .expect("ran")
        .lines()
        .map(String::from)
        .collect();
    lines.sort();
    assert_eq!(lines, ["ok", "recovered"]);
    let log = std::fs::read_to_string(q.join("dead/1-1-1.log")).expect("the dead item's log");
    assert_eq!(log.matches("nope").count(), 2, "{log}");
    assert!(q.join("dead/1-1-1").exists());
}
