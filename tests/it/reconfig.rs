//! Hot reconfig on a running master: edits to the entry script, an
//! imported module and a symlinked file reload it; builds, pollers and
//! requests live through reloads; broken edits leave the old config
//! running; `kiln reconfig` and the API report each reload.

use crate::common;
use crate::common::assert_has;
use crate::common::kiln_ok;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::workers::*;
use common::{hg_commit, holds_for, http_get, kiln, post_form, run, wait_until, Master};

/// One stored reload.
#[derive(Debug, Clone)]
struct Row {
    trigger: String,
    applied: bool,
    diff: String,
    errors: String,
}

fn reloads(dir: &Path) -> Vec<Row> {
    let Ok(c) = rusqlite::Connection::open(dir.join("state.sqlite")) else {
        return vec![];
    };
    let Ok(mut st) = c.prepare("SELECT trigger, applied, diff, errors FROM reloads ORDER BY id")
    else {
        return vec![];
    };
    st.query_map([], |r| {
        Ok(Row {
            trigger: r.get(0)?,
            applied: r.get::<_, i64>(1)? != 0,
            diff: r.get(2)?,
            errors: r.get(3)?,
        })
    })
    .map(|rows| rows.filter_map(Result::ok).collect())
    .unwrap_or_default()
}

/// Waits for the reload after the first `seen`, and returns it.
fn next_reload(dir: &Path, seen: usize) -> Row {
    wait_until(Duration::from_secs(120), "a reload", || {
        reloads(dir).get(seen).cloned()
    })
}

/// Each build of `builder`: (number, results, step names).
fn builds_of(dir: &Path, builder: &str) -> Vec<BuildRow> {
    builds(dir)
        .into_iter()
        .filter(|b| b.builder == builder)
        .collect()
}

/// (complete, claimed) of each request for `builder`.
fn requests_of(dir: &Path, builder: &str) -> Vec<(i64, bool)> {
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    let rows: Vec<(i64, bool)> = c
        .prepare(
            "SELECT q.complete, EXISTS (SELECT 1 FROM buildrequest_claims c WHERE c.brid = q.id)
             FROM buildrequests q JOIN builders r ON r.id = q.builderid WHERE r.name = ?1 ORDER BY q.id",
        )
        .expect("prepare")
        .query_map([builder], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    rows
}

/// Revisions of every stored change, in order.
fn change_revisions(dir: &Path) -> Vec<String> {
    let Ok(c) = rusqlite::Connection::open(dir.join("state.sqlite")) else {
        return vec![];
    };
    let Ok(mut st) = c.prepare("SELECT revision FROM changes ORDER BY changeid") else {
        return vec![];
    };
    st.query_map([], |r| r.get(0))
        .map(|rows| rows.filter_map(Result::ok).collect())
        .unwrap_or_default()
}

/// Replaces a file the way `std::fs::write` does (truncate, write).
fn save(path: &Path, text: &str) {
    std::fs::write(path, text).expect("save");
}

/// Builder `long` (whose step is `long_step`) on w1, and `other` on
/// `other_worker` with a quick step.
fn builds_config(long_step: &str, other: &str, other_worker: &str) -> String {
    Script::default()
        .rhai(&format!(
            "let long = BuildFactory();\nlong.addStep({long_step});\n\
             let quick = BuildFactory();\n\
             quick.addStep(ShellCommand(#{{ name: \"quick\", command: [\"echo\", \"quick\"] }}));"
        ))
        .worker("w1", "pw-one")
        .worker("w2", "pw-two")
        .builder_expr(
            "long",
            r#"BuilderConfig(#{ name: "long", workernames: ["w1"], factory: long })"#,
        )
        .builder_expr(
            other,
            &format!(
                "BuilderConfig(#{{ name: {other:?}, workernames: [{other_worker:?}], factory: quick }})"
            ),
        )
        .render()
}

/// Before: `long` waits for `release` beside the workers' dirs; `gone` is
/// on w2, which never connects, so its requests wait.
fn builds_before() -> String {
    builds_config(
        r#"ShellCommand(#{ name: "old", command: "while [ ! -e ../../../release ]; do sleep 0.1; done; echo old steps" })"#,
        "gone",
        "w2",
    )
}

/// After: `long` has another step, `gone` is gone and `added` is new.
fn builds_after() -> String {
    builds_config(
        r#"ShellCommand(#{ name: "new", command: ["echo", "new steps"] })"#,
        "added",
        "w1",
    )
}

#[test]
fn a_running_build_keeps_its_steps_while_one_save_changes_adds_and_removes_builders() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_script(tmp.path(), &builds_before());
    let master = Master::start(&dir);
    let _w1 = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    force(&master, "long");
    master.wait_for_log("build 1 started", 1, Duration::from_secs(60));
    force(&master, "gone");

    // One save: `long` gets new steps, `added` comes, `gone` goes.
    save(&dir.join("master.rhai"), &builds_after());
    let r = next_reload(&dir, 0);
    assert!(r.applied, "{r:?}\n{}", master.log());
    assert!(r.trigger.starts_with("file changed: "), "{r:?}");
    assert!(r.trigger.ends_with("master.rhai"), "{r:?}");
    assert!(
        r.diff
            .contains("builders: +1 (added), -1 (gone), ~1 (long)"),
        "{r:?}"
    );
    assert!(r.diff.contains("schedulers: ~1 (force)"), "{r:?}");
    assert!(
        r.diff.contains(
            "builder `gone` was removed: 0 running build(s) finish, 1 pending request(s) stay in the store"
        ),
        "{r:?}"
    );

    // The new builder builds while the old build still runs.
    force(&master, "added");
    force(&master, "long");
    wait_until(Duration::from_secs(60), "the new builder's build", || {
        builds_of(&dir, "added")
            .first()
            .and_then(|b| b.result)
            .map(|_| ())
    });
    assert_eq!(builds_of(&dir, "long").len(), 1, "long build 1 still runs");
    assert_eq!(builds_of(&dir, "long")[0].result, None);

    std::fs::write(tmp.path().join("release"), "").expect("release");
    wait_until(Duration::from_secs(60), "both builds of long", || {
        let b = builds_of(&dir, "long");
        (b.len() == 2 && b.iter().all(|b| b.result.is_some())).then_some(())
    });
    let long = builds_of(&dir, "long");
    let long: Vec<_> = long.iter().map(BuildRow::summary).collect();
    assert_eq!(
        long,
        [
            (1, Some(Results::Success), vec!["old"]),
            (2, Some(Results::Success), vec!["new"]),
        ],
        "the running build kept its steps; the next took the new ones"
    );
    assert_eq!(
        builds_of(&dir, "added")[..]
            .iter()
            .map(BuildRow::summary)
            .collect::<Vec<_>>(),
        [(1, Some(Results::Success), vec!["quick"])]
    );
    // The removed builder took nothing; its request is still waiting.
    assert!(builds_of(&dir, "gone").is_empty());
    assert_eq!(requests_of(&dir, "gone"), [(0, false)]);
    assert_eq!(requests_of(&dir, "long"), [(1, true), (1, true)]);
}

/// A master that imports `lib` (beside it) and `settings` (a symlink into
/// a "config repository", as the seed's master dirs are made).
fn module_master(root: &Path) -> std::path::PathBuf {
    let repo = root.join("configrepo");
    std::fs::create_dir_all(&repo).expect("mkdir");
    save(
        &repo.join("settings.rhai"),
        r#"export const BUILDERS = ["a"];"#,
    );
    let dir = master_script(
        root,
        r#"
import "settings" as settings;
import "lib" as lib;
let builders = [];
for name in settings::BUILDERS {
    builders.push(BuilderConfig(#{ name: name, workernames: ["w1"], factory: lib::factory() }));
}
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    workers: [Worker("w1", "pw-one")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: settings::BUILDERS })],
    builders: builders,
}
"#,
    );
    std::os::unix::fs::symlink("../configrepo/settings.rhai", dir.join("settings.rhai"))
        .expect("symlink");
    save(
        &dir.join("lib.rhai"),
        r#"fn factory() { let f = BuildFactory(); f.addStep(ShellCommand(#{ command: ["echo", "one"] })); f }"#,
    );
    dir
}

#[test]
fn edits_to_a_module_and_a_symlinked_file_reload_however_the_editor_saves() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = module_master(tmp.path());
    let settings = tmp.path().join("configrepo/settings.rhai");
    let master = Master::start(&dir);
    master.wait_for_log("master running", 1, Duration::from_secs(60));

    // An imported module, saved in place.
    save(
        &dir.join("lib.rhai"),
        r#"fn factory() { let f = BuildFactory(); f.addStep(ShellCommand(#{ command: ["echo", "two"] })); f }"#,
    );
    let r = next_reload(&dir, 0);
    assert!(r.applied, "{r:?}");
    assert!(r.trigger.ends_with("lib.rhai"), "{r:?}");
    assert_eq!(r.diff, "builders: ~1 (a)");

    // The file in the config repository that the master dir links to.
    save(&settings, r#"export const BUILDERS = ["a", "b"];"#);
    let r = next_reload(&dir, 1);
    assert!(r.applied, "{r:?}");
    assert!(r.trigger.ends_with("configrepo/settings.rhai"), "{r:?}");
    assert_eq!(r.diff, "builders: +1 (b)\nschedulers: ~1 (force)");

    // Saved by writing a temporary file and renaming it over the old one.
    let tmpfile = tmp.path().join("configrepo/.settings.rhai.swp");
    save(&tmpfile, r#"export const BUILDERS = ["a", "b", "c"];"#);
    std::fs::rename(&tmpfile, &settings).expect("rename");
    let r = next_reload(&dir, 2);
    assert!(r.applied, "{r:?}");
    assert_eq!(r.diff, "builders: +1 (c)\nschedulers: ~1 (force)");

    // Deleted and created again.
    std::fs::remove_file(dir.join("lib.rhai")).expect("rm");
    // Apart in time, as an editor that deletes and writes anew does.
    std::thread::sleep(Duration::from_millis(50));
    save(
        &dir.join("lib.rhai"),
        r#"fn factory() { let f = BuildFactory(); f.addStep(ShellCommand(#{ command: ["echo", "three"] })); f }"#,
    );
    let r = next_reload(&dir, 3);
    assert!(r.applied, "{r:?}");
    assert_eq!(r.diff, "builders: ~3 (a, b, c)");

    // Twenty saves in quick succession: one reload (two at most), never a
    // half-applied config, and it ends on the last save.
    for i in 0..20 {
        let names: Vec<String> = (0..=i).map(|n| format!("\"n{n}\"")).collect();
        save(
            &settings,
            &format!("export const BUILDERS = [{}];", names.join(", ")),
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = next_reload(&dir, 4);
    holds_for(Duration::from_millis(1500), "two reloads at most", || {
        reloads(&dir).len() <= 6
    });
    let all = reloads(&dir);
    assert!(
        (5..=6).contains(&all.len()),
        "one or two reloads for the burst: {all:#?}"
    );
    assert!(all.iter().all(|r| r.applied), "{all:#?}");
    assert!(r.diff.starts_with("builders: +"), "{r:?}");
    // Nothing is left to apply: the running config is the last save's.
    let out = kiln_ok(&dir, &["reconfig", "."]);
    assert_has(&out.stdout, "no changes");

    // Files that leave the import graph are no longer watched; new ones are.
    let seen = reloads(&dir).len();
    save(
        &dir.join("master.rhai"),
        r#"
import "other" as other;
#{ workers: [Worker("w1", "pw-one")], builders: [BuilderConfig(#{ name: "x", workernames: ["w1"], factory: other::f() })] }
"#,
    );
    save(
        &dir.join("other.rhai"),
        r#"fn f() { let f = BuildFactory(); f.addStep(ShellCommand(#{ command: ["true"] })); f }"#,
    );
    let r = next_reload(&dir, seen);
    assert!(r.applied, "{r:?}");
    assert!(r.diff.starts_with("builders: +1 (x)"), "{r:?}");
    save(
        &dir.join("other.rhai"),
        r#"fn f() { let f = BuildFactory(); f.addStep(ShellCommand(#{ command: ["false"] })); f }"#,
    );
    let r = next_reload(&dir, seen + 1);
    assert!(r.trigger.ends_with("other.rhai"), "{r:?}");
    assert_eq!(r.diff, "builders: ~1 (x)");
    let n = reloads(&dir).len();
    save(&settings, r#"export const BUILDERS = ["zzz"];"#);
    holds_for(
        Duration::from_millis(1500),
        "settings.rhai is no longer imported: saving it reloads nothing",
        || reloads(&dir).len() == n,
    );
}

const POLLED: &str = r#"
let f = BuildFactory();
f.addStep(ShellCommand(#{ command: ["true"] }));
#{
    www: #{ port: 0 },
    workers: [Worker("w1", "pw-one")],
    change_source: [HgPoller(#{ hgURL: "../repo", branch: "", pollInterval: INTERVAL })],
    schedulers: [Scheduler(#{ name: "on-push", branch: (), treeStableTimer: (), builderNames: ["b"] })],
    builders: [BuilderConfig(#{ name: "b", workernames: ["w1"], factory: f })],
}
"#;

fn polled(interval: &str) -> String {
    POLLED.replace("INTERVAL", interval)
}

/// A repository `repo` with one changeset, and a master polling it every
/// second.
fn polled_master(root: &Path) -> (PathBuf, PathBuf) {
    let repo = root.join("repo");
    std::fs::create_dir_all(&repo).expect("mkdir");
    run(&repo, "hg", &["init", "-q"]);
    hg_commit(&repo, "A <a@x>", &["base"], "base");
    (repo, master_script(root, &polled("1")))
}

#[test]
fn a_broken_edit_keeps_the_old_config_running_and_kiln_reconfig_says_why() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (repo, dir) = polled_master(tmp.path());
    // The endless loop ends at this limit, which the config is far below.
    let master = Master::start_with(&dir, &["--max-operations", "2000000"]);
    master.wait_for_log("first poll", 1, Duration::from_secs(60));
    let entry = dir.join("master.rhai");

    let mut seen = 0;
    let broken = [
        (
            format!("let f = BuildFactory(;\n{}", polled("1")),
            "master.rhai:1:",
        ),
        (
            polled("1").replace(r#"builderNames: ["b"]"#, r#"builderNames: ["nosuch"]"#),
            "nosuch",
        ),
        (format!("loop {{ }}\n{}", polled("1")), "operation limit"),
    ];
    for (i, (text, expected)) in broken.iter().enumerate() {
        save(&entry, text);
        let r = next_reload(&dir, seen);
        seen += 1;
        assert!(!r.applied, "{r:?}");
        assert!(r.errors.contains(expected), "{expected}: {}", r.errors);
        // kiln reconfig asks again, and fails the same way.
        let out = kiln(&dir, &["reconfig", "."], Duration::from_secs(120));
        seen += 1;
        assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
        assert_has(&out.stderr, expected);
        assert_has(&out.stderr, "keeps running its previous config");
        // The old config still polls and builds requests from pushes.
        let rev = hg_commit(&repo, "B <b@x>", &[&format!("f{i}")], "a push");
        wait_until(Duration::from_secs(60), "the push to be polled", || {
            change_revisions(&dir).contains(&rev).then_some(())
        });
    }
    assert_eq!(reloads(&dir).len(), seen);
    let log = master.log();
    assert_has(&log, "reload failed");
    assert_has(&log, "the running config is unchanged");

    // The fixed save applies.
    save(&entry, &polled("2"));
    let r = next_reload(&dir, seen);
    assert!(r.applied, "{r:?}");
    assert_eq!(r.diff, "change sources: ~1 (HgPoller:../repo)");
}

#[test]
fn a_poller_whose_interval_changes_misses_and_repeats_no_push() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (repo, dir) = polled_master(tmp.path());
    // Reloads through the API only.
    let master = Master::start_with(&dir, &["--no-watch"]);
    let url = master.http_url();
    master.wait_for_log("first poll", 1, Duration::from_secs(60));

    let one = hg_commit(&repo, "B <b@x>", &["one"], "one");
    wait_until(Duration::from_secs(60), "push one", || {
        (change_revisions(&dir) == [one.clone()]).then_some(())
    });
    // A push lands as the config changes: the old poller may or may not
    // have seen it; the new one starts from what was stored.
    let two = hg_commit(&repo, "B <b@x>", &["two"], "two");
    save(&dir.join("master.rhai"), &polled("2"));
    holds_for(
        Duration::from_millis(700),
        "--no-watch: no reload on save",
        || reloads(&dir).is_empty(),
    );
    let (status, body) = post_form(&format!("{url}/api/v2/reconfig"), &[]);
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("json");
    let r = &answer["reloads"][0];
    assert_eq!(r["applied"], true, "{body}");
    assert_eq!(r["diff"], "change sources: ~1 (HgPoller:../repo)", "{body}");
    assert!(
        r["trigger"].as_str().unwrap_or("").starts_with("api ("),
        "{body}"
    );
    let three = hg_commit(&repo, "B <b@x>", &["three"], "three");
    wait_until(Duration::from_secs(60), "pushes two and three", || {
        (change_revisions(&dir).len() >= 3).then_some(())
    });
    // Two more intervals: nothing is polled twice.
    holds_for(Duration::from_secs(4), "no push stored twice", || {
        change_revisions(&dir).len() == 3
    });
    assert_eq!(change_revisions(&dir), [one, two, three]);
    assert_eq!(
        master.log().matches("first poll").count(),
        1,
        "the new poller started from the stored state"
    );

    // The API lists reloads, newest first.
    let list: serde_json::Value =
        serde_json::from_str(&http_get(&format!("{url}/api/v2/reloads"))).expect("json");
    assert_eq!(list["meta"]["total"], 1);
    assert_eq!(
        list["reloads"][0]["diff"],
        "change sources: ~1 (HgPoller:../repo)"
    );
    assert!(list["reloads"][0]["duration_ms"].as_f64().unwrap_or(-1.0) > 0.0);
}

#[test]
fn a_worker_whose_password_changes_is_disconnected_and_must_use_the_new_one() {
    let tmp = tempfile::tempdir().expect("tmp");
    let script = |pw: &str| {
        Script::steps(TRUE)
            .worker("w1", pw)
            .worker("w2", "pw-two")
            .builder("b", &["w1", "w2"], "")
            .render()
    };
    let dir = master_script(tmp.path(), &script("pw-one"));
    let master = Master::start(&dir);
    let port = worker_port(&master);
    let _w1 = StockWorker::start(tmp.path(), "w1", "pw-one", port);
    let _w2 = KilnWorker::start(tmp.path(), "w2", "pw-two", port);
    master.wait_for_log("connected worker=", 2, Duration::from_secs(60));
    save(&dir.join("master.rhai"), &script("pw-new"));
    let r = next_reload(&dir, 0);
    assert!(r.applied, "{r:?}");
    assert_eq!(r.diff, "workers: ~1 (w1)");
    master.wait_for_log(
        "its password changed: disconnecting it",
        1,
        Duration::from_secs(30),
    );
    // w1 tries again with its old password and is refused; w2 is untouched.
    master.wait_for_log("wrong password for worker `w1`", 1, Duration::from_secs(60));
    wait_until(
        Duration::from_secs(30),
        "w1 gone, w2 still connected",
        || (connected(&dir) == ["w2"]).then_some(()),
    );
    assert_eq!(master.log().matches("connected worker=w2").count(), 1);
}

#[test]
fn ports_rebind_and_a_reload_that_cannot_be_applied_whole_is_not_applied_at_all() {
    let tmp = tempfile::tempdir().expect("tmp");
    let script = |www: u16, db: &str, builders: &[&str]| {
        let list: Vec<String> = builders
            .iter()
            .map(|b| {
                format!(r#"BuilderConfig(#{{ name: "{b}", workernames: ["w1"], factory: f }})"#)
            })
            .collect();
        format!(
            r#"
let f = BuildFactory();
f.addStep(ShellCommand(#{{ command: ["true"] }}));
#{{
    db: #{{ db_url: "{db}" }},
    www: #{{ port: {www} }},
    workers: [Worker("w1", "pw-one")],
    builders: [{}],
}}
"#,
            list.join(", ")
        )
    };
    let db = "sqlite:///state.sqlite";
    let dir = master_script(tmp.path(), &script(0, db, &["a"]));
    let master = Master::start(&dir);
    let old_url = master.http_url();
    master.wait_for_log("master running", 1, Duration::from_secs(60));

    // A port another process holds: the whole reload is refused, so the
    // builder added in the same save is not applied either.
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = held.local_addr().expect("addr").port();
    save(&dir.join("master.rhai"), &script(busy, db, &["a", "b"]));
    let r = next_reload(&dir, 0);
    assert!(!r.applied, "{r:?}");
    assert!(
        r.errors.contains("nothing of this reload was applied"),
        "{r:?}"
    );
    assert!(
        r.errors
            .contains(&format!("cannot listen on 127.0.0.1:{busy}")),
        "{r:?}"
    );
    // The old server still answers.
    assert!(http_get(&format!("{old_url}/health")).contains(r#""status":"ok""#));

    // A new database needs a restart: refused with a message saying so.
    save(
        &dir.join("master.rhai"),
        &script(0, "sqlite:///other.sqlite", &["a", "b"]),
    );
    let r = next_reload(&dir, 1);
    assert!(!r.applied, "{r:?}");
    assert!(r.errors.contains("db.db_url changed"), "{r:?}");
    assert!(r.errors.contains("restart the master"), "{r:?}");

    // A free port: the HTTP server moves there; the old address is closed.
    drop(held);
    let free = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    save(&dir.join("master.rhai"), &script(free, db, &["a", "b"]));
    let r = next_reload(&dir, 2);
    assert!(r.applied, "{r:?}");
    assert_eq!(r.diff, "builders: +1 (b)\nsettings: www");
    let new_url = format!("http://127.0.0.1:{free}");
    let list: serde_json::Value =
        serde_json::from_str(&http_get(&format!("{new_url}/api/v2/reloads"))).expect("json");
    assert_eq!(list["meta"]["total"], 3);
    assert_eq!(list["reloads"][0]["applied"], true);
    assert_eq!(list["reloads"][1]["applied"], false);
    wait_until(Duration::from_secs(10), "the old port to close", || {
        std::net::TcpStream::connect(old_url.trim_start_matches("http://"))
            .is_err()
            .then_some(())
    });
}

#[test]
fn a_removed_worker_finishes_its_build_and_is_let_go() {
    let tmp = tempfile::tempdir().expect("tmp");
    let script = |workers: &str, on: &str| {
        format!(
            r#"
let f = BuildFactory();
f.addStep(ShellCommand(#{{ name: "wait", command: "while [ ! -e ../../../release ]; do sleep 0.1; done" }}));
#{{
    protocols: #{{ msgpack_experimental_v7: #{{ port: 0 }} }},
    www: #{{ port: 0 }},
    workers: [{workers}],
    schedulers: [ForceScheduler(#{{ name: "force", builderNames: ["b"] }})],
    builders: [BuilderConfig(#{{ name: "b", workernames: ["{on}"], factory: f }})],
}}
"#
        )
    };
    let dir = master_script(
        tmp.path(),
        &script(r#"Worker("w1", "pw-one"), Worker("w2", "pw-two")"#, "w1"),
    );
    let master = Master::start(&dir);
    let _w1 = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    force(&master, "b");
    master.wait_for_log("build 1 started", 1, Duration::from_secs(60));

    save(
        &dir.join("master.rhai"),
        &script(r#"Worker("w2", "pw-two")"#, "w2"),
    );
    let r = next_reload(&dir, 0);
    assert!(r.applied, "{r:?}");
    assert_eq!(r.diff, "builders: ~1 (b)\nworkers: -1 (w1)");
    master.wait_for_log(
        "shuts down when its 1 running build(s) end",
        1,
        Duration::from_secs(30),
    );
    assert_eq!(connected(&dir), ["w1"], "still there while it builds");

    std::fs::write(tmp.path().join("release"), "").expect("release");
    wait_until(Duration::from_secs(60), "the build to finish", || {
        finished(&dir, 1).then_some(())
    });
    assert_eq!(
        builds_of(&dir, "b")
            .iter()
            .map(BuildRow::summary)
            .collect::<Vec<_>>(),
        [(1, Some(Results::Success), vec!["wait"])]
    );
    master.wait_for_log("idle: telling it to shut down", 1, Duration::from_secs(30));
    wait_until(Duration::from_secs(30), "w1 to be gone", || {
        connected(&dir).is_empty().then_some(())
    });
}
