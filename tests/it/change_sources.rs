//! Change sources against real repositories: Mercurial (local path and
//! `hg serve`), git, a pushlog server answering in the real `json-pushes`
//! format, the base change hook and `kiln sendchange`, and a master that is
//! stopped and started between pushes.

use crate::common;
use crate::common::assert_has;
use crate::common::kiln_ok;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::workers::{Script, TRUE};
use common::{changes, revisions};
use common::{hg_commit, holds_for, http_get, kiln, post_form, run, wait_until, HgServe, Master};

/// A master dir whose change sources are `sources` (Rhai expressions).
/// An HgPoller of the local repository `repo`, polling every second.
fn local_poller(repo: &Path) -> String {
    format!(
        r#"HgPoller(#{{ hgURL: "{}", branch: "", pollInterval: 1 }})"#,
        repo.display()
    )
}

fn master_dir(root: &Path, sources: &str) -> PathBuf {
    Script::steps(TRUE)
        .key(r#"title: "test""#)
        .worker_expr(r#"Worker("w1", secret("pw"))"#)
        .key(&format!("change_source: [{sources}]"))
        .builder("b", &["w1"], "")
        .secret("pw", "pw\n")
        .write(root)
}

fn poll(dir: &Path) -> String {
    let out = kiln(dir, &["poll", "."], Duration::from_secs(120));
    assert_eq!(out.code, Some(0), "kiln poll failed:\n{}", out.stderr);
    out.stderr
}

fn hg_repo(root: &Path, name: &str) -> PathBuf {
    let repo = root.join(name);
    std::fs::create_dir_all(&repo).expect("mkdir");
    run(&repo, "hg", &["init", "-q"]);
    repo
}

#[test]
fn plain_hg_over_a_local_path_reports_each_changeset_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let repo = hg_repo(tmp.path(), "repo");
    let first = hg_commit(&repo, "Alice <alice@m.org>", &["a.c"], "one");
    let dir = master_dir(tmp.path(), &local_poller(&repo));

    // The first poll records where the repository is and reports nothing.
    let log = poll(&dir);
    assert_has(&log, &format!("starting after {first}"));
    assert_eq!(changes(&dir), vec![]);

    let two = hg_commit(&repo, "Bob <bob@m.org>", &["b.c", "dir/c.h"], "two");
    let three = hg_commit(&repo, "Carol <carol@m.org>", &["a.c"], "three");
    poll(&dir);
    let rows = changes(&dir);
    assert_eq!(revisions(&rows), [two.clone(), three.clone()]);
    assert_eq!(rows[0].author, "Bob <bob@m.org>");
    assert_eq!(rows[0].comments, "two");
    assert_eq!(rows[0].files, ["b.c", "dir/c.h"]);
    assert_eq!(rows[0].branch, None);
    assert_eq!(
        rows[1].properties["changeset_author"],
        "Carol <carol@m.org>"
    );
    assert_eq!(rows[1].properties["named_branch"], "default");

    // Nothing new: nothing stored.
    poll(&dir);
    assert_eq!(changes(&dir).len(), 2);
}

#[test]
fn tips_only_max_changes_and_repo_branch_shape_what_is_stored() {
    let tmp = tempfile::tempdir().expect("tmp");
    let repo = hg_repo(tmp.path(), "repo");
    hg_commit(&repo, "A <a@x>", &["base"], "base");
    let sources = format!(
        r#"HgPoller(#{{ hgURL: "{0}", branch: "", pollInterval: 1, tipsOnly: true }}),
           HgPoller(#{{ hgURL: "{1}", branch: "", pollInterval: 1, maxChanges: 2 }})"#,
        repo.display(),
        // The same repository through another path, so that the two pollers differ.
        tmp.path().join("link").display()
    );
    std::os::unix::fs::symlink(&repo, tmp.path().join("link")).expect("symlink");
    let dir = master_dir(tmp.path(), &sources);
    poll(&dir);

    hg_commit(&repo, "B <b@x>", &["x.c", "y.c"], "first of the push");
    hg_commit(&repo, "C <c@x>", &["z.c"], "second of the push");
    let tip = hg_commit(&repo, "D <d@x>", &["x.c", "w.c"], "tip of the push");
    poll(&dir);
    let rows = changes(&dir);
    let tips: Vec<&common::ChangeRow> = rows
        .iter()
        .filter(|r| r.comments == "tip of the push")
        .collect();
    // tipsOnly: one change, the tip, with the union of the push's files;
    // maxChanges 2: the two newest changesets.
    let by_tips_only = rows
        .iter()
        .filter(|r| r.files == ["x.c", "y.c", "z.c", "w.c"])
        .count();
    assert_eq!(by_tips_only, 1, "{rows:#?}");
    assert_eq!(tips.len(), 2);
    assert!(tips
        .iter()
        .all(|r| r.revision.as_deref() == Some(tip.as_str())));
    assert_eq!(rows.len(), 3, "{rows:#?}");
    assert!(rows.iter().any(|r| r.comments == "second of the push"));
    assert!(!rows.iter().any(|r| r.comments == "first of the push"));

    // repo_branch: changesets on another named branch are skipped.
    let tmp2 = tempfile::tempdir().expect("tmp");
    let repo2 = hg_repo(tmp2.path(), "repo");
    hg_commit(&repo2, "A <a@x>", &["base"], "base");
    let dir2 = master_dir(tmp2.path(), &local_poller(&repo2));
    poll(&dir2);
    run(&repo2, "hg", &["branch", "-q", "GECKO_RELBRANCH"]);
    hg_commit(&repo2, "R <r@x>", &["rel.c"], "on the relbranch");
    run(&repo2, "hg", &["update", "-q", "default"]);
    let on_default = hg_commit(&repo2, "M <m@x>", &["main.c"], "on default");
    let log = poll(&dir2);
    assert_eq!(revisions(&changes(&dir2)), [on_default]);
    assert_has(
        &log,
        "skipped 1 changeset(s) on named branches other than default",
    );
}

#[test]
fn an_empty_repository_reports_its_first_pushes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let repo = hg_repo(tmp.path(), "repo");
    let dir = master_dir(tmp.path(), &local_poller(&repo));
    let log = poll(&dir);
    assert_has(&log, "the repository is empty");
    let one = hg_commit(&repo, "A <a@x>", &["a"], "one");
    let two = hg_commit(&repo, "B <b@x>", &["b"], "two");
    poll(&dir);
    assert_eq!(revisions(&changes(&dir)), [one, two]);
}

#[test]
fn plain_hg_over_hg_serve_falls_back_from_the_pushlog() {
    let tmp = tempfile::tempdir().expect("tmp");
    let repo = hg_repo(tmp.path(), "repo");
    hg_commit(&repo, "A <a@x>", &["a"], "one");
    let server = HgServe::start(&repo, &[]);
    let dir = master_dir(
        tmp.path(),
        &format!(
            r#"HgPoller(#{{ hgURL: "{}", branch: "", pollInterval: 1 }})"#,
            server.url
        ),
    );
    let log = poll(&dir);
    assert_has(&log, "no pushlog at");
    let two = hg_commit(&repo, "B <b@x>", &["b"], "two");
    poll(&dir);
    let rows = changes(&dir);
    assert_eq!(revisions(&rows), [two]);
    assert_eq!(
        rows[0]
            .properties
            .get("changeset_author")
            .and_then(|v| v.as_str()),
        Some("B <b@x>")
    );
    drop(server);

    // The server is gone: the poll fails with the repository named, and
    // nothing is stored.
    let out = kiln(&dir, &["poll", "."], Duration::from_secs(120));
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert_has(&out.stderr, "poll failed");
    assert_eq!(changes(&dir).len(), 1);
}

#[test]
fn git_poller_follows_branches_and_force_pushes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(&repo).expect("mkdir");
    run(&repo, "git", &["init", "-q", "-b", "main"]);
    let commit = |file: &str, msg: &str| {
        std::fs::write(repo.join(file), msg).expect("write");
        run(&repo, "git", &["add", file]);
        run(&repo, "git", &["commit", "-q", "-m", msg]);
        run(&repo, "git", &["rev-parse", "HEAD"]).trim().to_string()
    };
    commit("a", "one");
    run(&repo, "git", &["branch", "release"]);
    let dir = master_dir(
        tmp.path(),
        &format!(
            r#"GitPoller(#{{ repourl: "{}", branches: ["main", "release"], pollInterval: 1 }})"#,
            repo.display()
        ),
    );
    let log = poll(&dir);
    assert_has(&log, "first poll of `main`");
    assert_eq!(changes(&dir), vec![]);

    let two = commit("b", "two");
    let three = commit("c", "three");
    run(&repo, "git", &["checkout", "-q", "release"]);
    let rel = commit("r", "release fix");
    run(&repo, "git", &["checkout", "-q", "main"]);
    poll(&dir);
    let rows = changes(&dir);
    let on = |b: &str| -> Vec<String> {
        revisions(
            &rows
                .iter()
                .filter(|r| r.branch.as_deref() == Some(b))
                .cloned()
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(on("main"), [two.clone(), three.clone()]);
    assert_eq!(on("release"), [rel]);
    let r2 = rows
        .iter()
        .find(|r| r.revision.as_deref() == Some(two.as_str()))
        .expect("two");
    assert_eq!(r2.author, "kiln-test <test@kiln>");
    assert_eq!(r2.files, ["b"]);
    assert_eq!(r2.comments, "two");

    // Force push: main loses "three" and gets "four".
    run(&repo, "git", &["reset", "-q", "--hard", &two]);
    let four = commit("d", "four");
    poll(&dir);
    let rows = changes(&dir);
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[3].revision.as_deref(), Some(four.as_str()));
}

#[test]
fn a_restart_between_pushes_neither_repeats_nor_misses_a_change() {
    let tmp = tempfile::tempdir().expect("tmp");
    let repo = hg_repo(tmp.path(), "repo");
    hg_commit(&repo, "A <a@x>", &["a"], "zero");
    let dir = master_dir(tmp.path(), &local_poller(&repo));
    let mut master = Master::start(&dir);
    master.wait_for_log("first poll", 1, Duration::from_secs(60));
    let one = hg_commit(&repo, "B <b@x>", &["b"], "one");
    wait_until(Duration::from_secs(60), "the first change", || {
        (changes(&dir).len() == 1).then_some(())
    });
    assert!(dir.join("kiln.pid").exists());
    assert_eq!(master.stop(), Some(0));
    assert!(
        !dir.join("kiln.pid").exists(),
        "the pid file is removed on stop"
    );

    let two = hg_commit(&repo, "C <c@x>", &["c"], "two");
    let three = hg_commit(&repo, "D <d@x>", &["d"], "three");
    let _master = Master::start(&dir);
    wait_until(
        Duration::from_secs(60),
        "the changes pushed while stopped",
        || (changes(&dir).len() >= 3).then_some(()),
    );
    // A few more poll rounds: nothing is repeated.
    holds_for(Duration::from_secs(3), "no change stored twice", || {
        changes(&dir).len() == 3
    });
    assert_eq!(revisions(&changes(&dir)), [one, two, three]);
    let log = std::fs::read_to_string(dir.join("kiln.log")).expect("kiln.log");
    assert_has(&log, "master running");
    assert_has(&log, "SIGTERM: stopping");
}

#[test]
fn a_missing_repository_is_logged_and_the_master_recovers_when_it_appears() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("later");
    let dir = master_dir(tmp.path(), &local_poller(&path));
    let master = Master::start(&dir);
    master.wait_for_log("poll failed", 1, Duration::from_secs(60));
    assert!(master.log().contains(&path.display().to_string()));
    // Still serving.
    let url = master.http_url();
    let health = http_get(&format!("{url}/health"));
    assert_has(&health, "\"ok\"");

    run(tmp.path(), "hg", &["init", "-q", "later"]);
    master.wait_for_log("polling works again", 1, Duration::from_secs(60));
    let one = hg_commit(&path, "A <a@x>", &["a"], "one");
    wait_until(
        Duration::from_secs(60),
        "a change from the new repository",
        || (revisions(&changes(&dir)) == [one.clone()]).then_some(()),
    );
}

#[test]
fn the_base_change_hook_and_sendchange_store_changes_and_refuse_bad_ones() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_dir(tmp.path(), "");
    let master = Master::start(&dir);
    let url = master.http_url();
    let hook = format!("{url}/change_hook/base");

    let (status, body) = post_form(
        &hook,
        &[
            ("author", "alice@m.org"),
            ("comments", "Bug 1 - fix"),
            ("files", r#"["a/b.c", "d.h"]"#),
            ("revision", "abc123"),
            ("branch", "mozilla-central"),
            ("repository", "https://hg.example.org/mozilla-central"),
            ("properties", r#"{"pushid": 7}"#),
            ("when_timestamp", "1700000000"),
        ],
    );
    assert_eq!(status, 200, "{body}");
    let rows = changes(&dir);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].author, "alice@m.org");
    assert_eq!(rows[0].files, ["a/b.c", "d.h"]);
    assert_eq!(rows[0].when, 1_700_000_000);
    assert_eq!(rows[0].properties["pushid"], 7);

    for (form, reason) in [
        (vec![("comments", "no author")], "`author` is required"),
        (
            vec![("author", "a"), ("files", "a.c")],
            "`files` must be a JSON list",
        ),
        (
            vec![("author", "a"), ("properties", "[1]")],
            "`properties` must be a JSON object",
        ),
        (
            vec![("author", "a"), ("when_timestamp", "yesterday")],
            "`when_timestamp`",
        ),
        (
            vec![("author", "a"), ("revison", "x")],
            "unknown field `revison`",
        ),
    ] {
        let (status, body) = post_form(&hook, &form);
        assert_eq!(status, 400, "{form:?}: {body}");
        assert!(body.contains(reason), "{form:?}: {body}");
    }
    assert_eq!(changes(&dir).len(), 1, "a refused change stores nothing");
    // A body over the limit (1 MiB) is refused as too large.
    let huge = "x".repeat(3 << 20);
    let (status, body) = post_form(&hook, &[("author", "a"), ("comments", &huge)]);
    assert_eq!(status, 413, "{body}");
    let (status, body) = common::http(
        "POST",
        &format!("{url}/api/v2/forceschedulers/force"),
        None,
        &[],
        common::Body::Json(serde_json::json!({ "method": "force", "params": { "reason": huge } })),
    );
    assert_eq!(status, 413, "{body}");
    assert_eq!(changes(&dir).len(), 1);

    kiln_ok(
        tmp.path(),
        &[
            "sendchange",
            "--master",
            &url,
            "--who",
            "bob@m.org",
            "--branch",
            "try",
            "--revision",
            "def456",
            "-m",
            "try: -b o",
            "--property",
            "priority=3",
            "x.c",
            "y.c",
        ],
    );
    let rows = changes(&dir);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1].author, "bob@m.org");
    assert_eq!(rows[1].branch.as_deref(), Some("try"));
    assert_eq!(rows[1].files, ["x.c", "y.c"]);
    assert_eq!(rows[1].properties["priority"], 3);

    let out = kiln(
        tmp.path(),
        &["sendchange", "--master", "http://127.0.0.1:1", "--who", "x"],
        Duration::from_secs(60),
    );
    out.fails_with("cannot reach the master");
}

#[test]
fn a_second_master_in_the_same_dir_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_dir(tmp.path(), "");
    let mut master = Master::start(&dir);
    master.wait_for_log("master running", 1, Duration::from_secs(60));
    let out = kiln(&dir, &["start", "."], Duration::from_secs(60));
    out.fails_with("a master is already running");
    assert_eq!(master.stop(), Some(0));
    let out = kiln(&dir, &["stop", "."], Duration::from_secs(60));
    out.fails_with("no master is running");
}

#[test]
fn the_poller_hook_polls_the_named_pollers_now() {
    let tmp = tempfile::tempdir().expect("tmp");
    let repo = hg_repo(tmp.path(), "repo");
    let other = hg_repo(tmp.path(), "other");
    let zero = hg_commit(&repo, "A <a@x>", &["a"], "zero");
    // An hour between polls: only the hook makes the second one happen.
    let dir = master_dir(
        tmp.path(),
        &format!(
            r#"HgPoller(#{{ hgURL: "{}", branch: "", pollInterval: 3600 }}),
               HgPoller(#{{ hgURL: "{}", branch: "", pollInterval: 3600 }})"#,
            repo.display(),
            other.display()
        ),
    );
    let master = Master::start(&dir);
    let url = master.http_url();
    master.wait_for_log("first poll:", 2, Duration::from_secs(60));
    let one = hg_commit(&repo, "A <a@x>", &["a"], "one");
    hg_commit(&other, "B <b@x>", &["b"], "elsewhere");

    let (status, body) = post_form(&format!("{url}/change_hook/poller?poller=nonesuch"), &[]);
    assert_eq!(status, 400, "{body}");
    assert_has(&body, "no poller is called nonesuch");

    // Named by its repository, as Buildbot names a poller by default.
    let (status, body) = post_form(
        &format!("{url}/change_hook/poller?poller={}", repo.display()),
        &[],
    );
    assert_eq!(status, 200, "{body}");
    wait_until(
        Duration::from_secs(60),
        "the change the hook polled",
        || revisions(&changes(&dir)).contains(&one).then_some(()),
    );
    // The other poller was not asked, and the first poll saw `zero` as the start.
    holds_for(
        Duration::from_millis(500),
        "only the named poller polled",
        || changes(&dir).len() == 1,
    );
    assert_eq!(revisions(&changes(&dir)), [one]);
    assert!(!revisions(&changes(&dir)).contains(&zero));

    // No `poller`: all of them (GET works as in Buildbot).
    http_get(&format!("{url}/change_hook/poller"));
    wait_until(Duration::from_secs(60), "the other poller's change", || {
        (changes(&dir).len() == 2).then_some(())
    });
}
