//! Steps as builds run them: results and flags, rendering, properties,
//! log evaluation, Mercurial and Git, DisconnectStep, Trigger, MockCommand.

use crate::common;
use crate::common::assert_has;

use std::time::Duration;

use common::workers::*;
use common::{holds_for, wait_until, Master};
use Results::*;

use super::master_with_steps;

#[test]
fn a_stock_worker_runs_the_steps_with_buildbots_results() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = master_with_steps(
        tmp.path(),
        r#"
        f.addStep(ShellCommand(#{ name: "hello", command: ["sh", "-c", "echo hello; echo oops >&2"] }));
        f.addStep(ShellCommand(#{ name: "fails", command: "exit 3", haltOnFailure: true }));
        f.addStep(ShellCommand(#{ name: "skipped", command: "echo never" }));
        f.addStep(ShellCommand(#{ name: "cleanup", command: "echo cleaning", alwaysRun: true }));
        "#,
    );
    let master = Master::start(&dir);
    let _w1 = StockWorker::connect(&master, tmp.path(), "w1", "pw-one");
    let b = force_and_wait(&master, "b", 1);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].result, Some(Results::Failure), "FAILURE: {b:?}");
    assert_eq!(
        b[0].steps,
        steps(&[
            ("hello", Success),
            ("fails", Failure),
            ("skipped", Skipped),
            ("cleanup", Success)
        ])
    );
    let out = stdio(&dir, "hello");
    assert_has(&out, "ohello\n");
    assert_has(&out, "eoops\n");
    assert!(stdio(&dir, "cleanup").contains("ocleaning"));
    // The request is complete with the build's result.
    assert_eq!(requests(&dir), [done(Results::Failure)]);
}

#[test]
fn step_arguments_render_build_properties_and_a_missing_one_is_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = Script::steps(
        r#"f.addStep(ShellCommand(#{ name: "show",
    command: ["echo", WithProperties("%(buildername)s #%(buildnumber)s on %(workername)s for %(who:-nobody)s"),
              Interpolate("pool=%(prop:pool)s global=%(prop:site)s")],
    env: #{ KILN_WHERE: WithProperties("%(builddir)s") } }));
f.addStep(ShellCommand(#{ name: "env", command: "echo where=$KILN_WHERE",
    env: #{ KILN_WHERE: WithProperties("%(builddir)s") } }));
f.addStep(ShellCommand(#{ name: "missing", command: Interpolate("hg clone %(prop:repo_path)s") }));"#,
    )
    .key(r#"properties: #{ site: "staging", pool: "global-pool" }"#)
    .worker_expr(r#"Worker("w1", "pw-one", #{ properties: #{ pool: "build-pool" } })"#)
    .builder("b", &["w1"], "")
    .write(tmp.path());
    let mut master = Master::start(&dir);
    let _w1 = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    let b = force_with_and_wait(&master, "b", &["--property", "who=alice"], 1);
    assert_eq!(
        b[0].steps,
        steps(&[("show", Success), ("env", Success), ("missing", Exception)])
    );
    assert!(
        stdio(&dir, "show").contains("ob #1 on w1 for alice pool=build-pool global=staging"),
        "{}",
        stdio(&dir, "show")
    );
    let builddir = tmp.path().join("kiln-worker-w1/b");
    assert!(
        stdio(&dir, "env").contains(&format!("owhere={}", builddir.display())),
        "{}",
        stdio(&dir, "env")
    );
    assert!(
        stdio(&dir, "missing").contains("no property `repo_path`"),
        "{}",
        stdio(&dir, "missing")
    );
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn interpolate_reads_the_sourcestamp_worker_keywords_and_secrets_and_logs_hide_secrets() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = one_builder(r#"
f.addStep(ShellCommand(#{ name: "kinds",
    command: ["echo", Interpolate("branch=%(src::branch)s rev=%(src::revision:-none)s other=%(src:other:branch:-elsewhere)s"),
              Interpolate("in=%(worker:basedir)s say=%(kw:greeting)s n=%(kw:n)s", #{ greeting: "hello", n: 3 })] }));
// The token reaches the command as an argument and in the environment; the
// stock worker writes both into the log's header, and kiln hides them.
f.addStep(ShellCommand(#{ name: "token",
    command: ["sh", "-c", Interpolate("echo arg=%(secret:token)s env=$TOKEN")],
    env: #{ TOKEN: secret("token") } }));
f.addStep(ShellCommand(#{ name: "nosecret", command: ["echo", Interpolate("%(secret:missing)s")] }));
f.addStep(ShellCommand(#{ name: "noworker", command: ["echo", Interpolate("%(worker:nonesuch)s")], alwaysRun: true }));"#).write(tmp.path());
    write_secret(&dir, "token", "s3cr3t-t0ken\n");
    let mut master = Master::start(&dir);
    let w1 = StockWorker::connect(&master, tmp.path(), "w1", "pw-one");
    let b = force_with_and_wait(&master, "b", &["--branch", "release"], 1);
    assert_eq!(
        b[0].steps,
        steps(&[
            ("kinds", Success),
            ("token", Success),
            ("nosecret", Exception),
            ("noworker", Exception)
        ])
    );
    let kinds = stdio(&dir, "kinds");
    assert_has(&kinds, "obranch=release rev=none other=elsewhere");
    assert_has(&kinds, &format!("in={} say=hello n=3", w1.dir.display()));
    let token = stdio(&dir, "token");
    assert_has(&token, "oarg=<secret> env=<secret>");
    assert!(
        token.contains("TOKEN=<secret>"),
        "the header shows the env: {token}"
    );
    // Read back as stored (decompressed): the secret is in no log.
    let stored = all_log_text(&dir);
    assert_has(&stored, "TOKEN=<secret>");
    assert!(
        !stored.contains("s3cr3t-t0ken"),
        "the secret is in a stored log"
    );
    let nosecret = stdio(&dir, "nosecret");
    assert_has(&nosecret, "secret `missing` cannot be read");
    let noworker = stdio(&dir, "noworker");
    assert_has(&noworker, "the worker did not report `nonesuch`");
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn each_result_flag_changes_the_builds_result() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Each builder: one step that fails (exit 1) or warns (exit 1 read as
    // WARNINGS), then a step that succeeds; only the flags differ.
    // (builder, flags, the first step's result, the build's result)
    use Results::{Failure, Success, Warnings};
    let cases = [
        ("flunk", "", Failure, Failure),
        ("noflunk", "flunkOnFailure: false", Failure, Success),
        (
            "warnfail",
            "flunkOnFailure: false, warnOnFailure: true",
            Failure,
            Warnings,
        ),
        ("warnings", "log_eval_func: warn", Warnings, Success),
        (
            "warnwarn",
            "log_eval_func: warn, warnOnWarnings: true",
            Warnings,
            Warnings,
        ),
        (
            "flunkwarn",
            "log_eval_func: warn, flunkOnWarnings: true",
            Warnings,
            Failure,
        ),
    ];
    let mut script = Script::default()
        .rhai(r#"let warn = rc_eval_func(#{ "0": SUCCESS, "1": WARNINGS });"#)
        .worker("w1", "pw-one");
    for (i, (name, flags, _, _)) in cases.iter().enumerate() {
        script = script
            .rhai(&format!(
                "let f{i} = BuildFactory();\n\
                 f{i}.addStep(ShellCommand(#{{ name: \"first\", command: \"exit 1\", {flags} }}));\n\
                 f{i}.addStep(ShellCommand(#{{ name: \"second\", command: \"true\" }}));"
            ))
            .builder_expr(
                name,
                &format!("BuilderConfig(#{{ name: {name:?}, workernames: [\"w1\"], factory: f{i} }})"),
            );
    }
    let dir = script.write(tmp.path());
    let mut master = Master::start(&dir);
    let _w1 = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    for (name, _, _, _) in cases {
        force(&master, name);
    }
    wait_until(Duration::from_secs(90), "every build", || {
        finished(&dir, cases.len()).then_some(())
    });
    let all = builds(&dir);
    for (name, flags, first, build) in cases {
        let b = all.iter().find(|b| b.builder == name).expect("a build");
        assert_eq!(
            (b.result, b.step_results()),
            (Some(build), vec![Some(first), Some(Success)]),
            "builder {name} ({flags})"
        );
    }
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn set_property_do_step_if_and_log_rules_decide_the_steps() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = one_builder(r#"
f.addStep(SetProperty(#{ name: "where", property: "basedir", command: ["pwd"], workdir: "." }));
f.addStep(SetProperty(#{ name: "fixed", property: "flavour", value: WithProperties("%(buildername)s-opt") }));
f.addStep(ShellCommand(#{ name: "use", command: ["echo", WithProperties("in %(basedir)s as %(flavour)s")] }));
f.addStep(ShellCommand(#{ name: "skipped", command: "touch ../../../skipped",
    doStepIf: |step| step.properties.flavour == "nope" }));
f.addStep(ShellCommand(#{ name: "ran", command: "true", doStepIf: |step| step.properties.flavour == "b-opt" }));
f.addStep(ShellCommand(#{ name: "rcmap", command: "exit 3", warnOnWarnings: true,
    log_eval_func: rc_eval_func(#{ "0": SUCCESS, "3": WARNINGS }) }));
// Known infrastructure trouble in the output means RETRY, on the first build only.
f.addStep(ShellCommand(#{ name: "infra", command: "echo 'remote: timed out'; exit 1",
    log_eval_func: |step, rc, log| if log.contains("timed out") && step.properties.buildnumber == 1 { RETRY } else { SUCCESS } }));
f.addStep(ShellCommand(#{ name: "after", command: "true" }));"#).write(tmp.path());
    let mut master = Master::start(&dir);
    let _w1 = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    force(&master, "b");
    wait_until(Duration::from_secs(30), "both builds", || {
        finished(&dir, 2).then_some(())
    });
    wait_until(Duration::from_secs(30), "both builds' requests", || {
        all_done(&dir).then_some(())
    });
    let b = builds(&dir);
    let results = |i: usize| b[i].step_results();
    let [ok, skipped, warned, retry] = [
        Results::Success,
        Results::Skipped,
        Results::Warnings,
        Results::Retry,
    ]
    .map(Some);
    // where, fixed, use, skipped, ran, rcmap, infra, after
    assert_eq!(
        results(0),
        [ok, ok, ok, skipped, ok, warned, retry, skipped]
    );
    assert_eq!(b[0].result, retry, "RETRY: {b:?}");
    assert_eq!(results(1), [ok, ok, ok, skipped, ok, warned, ok, ok]);
    assert_eq!(b[1].result, Some(Results::Warnings), "WARNINGS: {b:?}");
    assert_eq!(b.len(), 2);
    assert_eq!(requests(&dir), [done(Results::Warnings)]);
    assert!(!tmp.path().join("skipped").exists());
    let basedir = tmp.path().join("kiln-worker-w1/b");
    assert!(
        stdio(&dir, "use").contains(&format!("oin {} as b-opt", basedir.display())),
        "{}",
        stdio(&dir, "use")
    );
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    let (value, source): (String, String) = c
        .query_row(
            "SELECT value_json, source FROM build_properties WHERE buildid = 1 AND name = 'basedir'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("basedir property");
    assert_eq!(value, format!("{:?}", basedir.display().to_string()));
    assert_eq!(source, "SetProperty");
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn a_log_is_cut_at_log_max_size_with_a_marker() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = Script::steps(
        r#"f.addStep(ShellCommand(#{ name: "chatty", command: "for i in $(seq 1 5000); do echo line-$i; done; echo rc-still-counts >&2; exit 0" }));"#,
    )
    .worker("w1", "pw-one")
    .builder("b", &["w1"], "")
    .key(r#"logMaxSize: 20000"#)
    .write(tmp.path());
    let mut master = Master::start(&dir);
    let _w1 = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    let b = force_and_wait(&master, "b", 1);
    assert_eq!(b[0].steps, steps(&[("chatty", Success)]));
    let log = stdio(&dir, "chatty");
    assert_has(&log, "oline-1\n");
    assert!(!log.contains("line-5000"), "the tail is dropped");
    assert_has(&log, "reached logMaxSize (20000 bytes)");
    assert!(log.len() < 20000 + 4096, "{} bytes kept", log.len());
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn mercurial_clone_clones_then_pulls_and_retries_into_a_fresh_directory() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("mozharness");
    std::fs::create_dir_all(&src).expect("mkdir");
    common::run(&src, "hg", &["init"]);
    common::hg_commit(&src, "rel@m.org", &["VERSION"], "one");
    let path = common::tools_path().into_string().expect("PATH");
    let dir = Script::steps(&format!(
        r#"f.addStep(MercurialCloneCommand(#{{ name: "clone", command: ["hg", "clone", "{}", "scripts"],
    workdir: ".", haltOnFailure: true }}));
f.addStep(ShellCommand(#{{ name: "show", command: "cat scripts/VERSION", workdir: "." }}));"#,
        src.display()
    ))
    .worker("w1", "pw-one")
    .builder(
        "b",
        &["w1"],
        &format!(r#"env: #{{ PATH: "{path}", HGPLAIN: "1", HGRCPATH: "" }}"#),
    )
    .write(tmp.path());
    let mut master = Master::start(&dir);
    let w1 = StockWorker::connect(&master, tmp.path(), "w1", "pw-one");
    let step_log = |n: i64, step: &str| build_stdio(&dir, n, step);
    // 1: a fresh clone.
    force_and_wait(&master, "b", 1);
    assert!(
        step_log(1, "show").contains("oone"),
        "{}",
        step_log(1, "clone")
    );
    // 2: the clone is there: pull and update bring the new changeset.
    common::hg_commit(&src, "rel@m.org", &["VERSION"], "two");
    force_and_wait(&master, "b", 2);
    assert!(
        step_log(2, "clone").contains("is a repository already"),
        "{}",
        step_log(2, "clone")
    );
    assert!(
        step_log(2, "show").contains("otwo"),
        "{}",
        step_log(2, "show")
    );
    // 3: a directory that is not a repository makes the clone fail; with
    // retry (the default) it is removed and cloned again.
    let scripts = w1.dir.join("b/scripts");
    std::fs::remove_dir_all(scripts.join(".hg")).expect("rm .hg");
    force_and_wait(&master, "b", 3);
    assert!(
        step_log(3, "clone").contains("removing scripts and cloning again"),
        "{}",
        step_log(3, "clone")
    );
    let b = builds(&dir);
    let results: Vec<Option<Results>> = b.iter().map(|x| x.result).collect();
    assert_eq!(results, [Some(Results::Success); 3], "{b:?}");
    assert!(step_log(3, "show").contains("otwo"));
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn a_disconnect_step_lets_the_worker_go_without_failing_or_retrying() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = Script::default()
        .rhai(
            r#"let reboot = BuildFactory();
reboot.addStep(ShellCommand(#{ name: "work", command: "true" }));
reboot.addStep(DisconnectStep(#{ name: "reboot", command: "echo SCHEDULED REBOOT",
    force_disconnect: "SCHEDULED REBOOT", alwaysRun: true, flunkOnFailure: false, warnOnFailure: false }));
reboot.addStep(ShellCommand(#{ name: "after", command: "touch ../../../after", alwaysRun: true }));
let die = BuildFactory();
// The command takes its worker down with it, as a reboot does.
die.addStep(DisconnectStep(#{ name: "die", command: "kill -9 $PPID; sleep 5", flunkOnFailure: false }));"#,
        )
        .worker("w1", "pw-one")
        .builder_expr(
            "b",
            r#"BuilderConfig(#{ name: "b", workernames: ["w1"], factory: reboot })"#,
        )
        .builder_expr(
            "d",
            r#"BuilderConfig(#{ name: "d", workernames: ["w1"], factory: die })"#,
        )
        .write(tmp.path());
    let mut master = Master::start(&dir);
    let port = worker_port(&master);
    let mut w1 = KilnWorker::start(tmp.path(), "w1", "pw-one", port);
    master.wait_for_log("connected worker=w1", 1, Duration::from_secs(60));
    force_and_wait(&master, "b", 1);
    // The master dropped the connection; kiln's worker comes back.
    master.wait_for_log("disconnecting the worker", 1, Duration::from_secs(30));
    master.wait_for_log("connected worker=w1", 2, Duration::from_secs(60));
    let b = builds(&dir);
    assert_eq!(b[0].result, Some(Results::Success), "{b:?}");
    assert_eq!(
        b[0].steps,
        steps(&[("work", Success), ("reboot", Success), ("after", Skipped)])
    );
    assert!(!tmp.path().join("after").exists());
    // A worker that dies under a DisconnectStep: SUCCESS, not RETRY.
    force_and_wait(&master, "d", 2);
    wait_until(Duration::from_secs(30), "the worker to be gone", || {
        w1.child.try_wait().expect("wait")
    });
    holds_for(Duration::from_millis(500), "not retried", || {
        builds(&dir).len() == 2
    });
    let b = builds(&dir);
    assert_eq!(b[1].result, Some(Results::Success), "{b:?}");
    assert_eq!(
        requests(&dir),
        [done(Results::Success), done(Results::Success)]
    );
    assert!(stdio(&dir, "die").contains("went away, as this step expects"));
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn a_trigger_step_waits_for_the_triggered_builds_and_takes_their_result() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = Script::default()
        .rhai(
            r#"let parent = BuildFactory();
parent.addStep(Trigger(#{ name: "trigger", schedulerNames: ["tr"], waitForFinish: true,
    set_properties: #{ flavour: "debug" } }));
parent.addStep(ShellCommand(#{ name: "after", command: "true" }));
let child = BuildFactory();
child.addStep(ShellCommand(#{ name: "child", command: ["sh", "-c", WithProperties("echo %(flavour)s; exit 1")] }));"#,
        )
        .worker("w1", "pw-one")
        .builder_expr(
            "parent",
            r#"BuilderConfig(#{ name: "parent", workernames: ["w1"], factory: parent })"#,
        )
        .builder_expr(
            "child",
            r#"BuilderConfig(#{ name: "child", workernames: ["w1"], factory: child })"#,
        )
        .scheduler_expr(r#"Triggerable(#{ name: "tr", builderNames: ["child"] })"#)
        .write(tmp.path());
    let mut master = Master::start(&dir);
    let _w1 = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    let b = force_and_wait(&master, "parent", 2);
    // The child finished first (FAILURE); the parent waited, took FAILURE
    // from its trigger step, and went on (flunkOnFailure, no halt).
    assert_eq!(b.len(), 2, "{b:?}");
    let parent = b
        .iter()
        .find(|x| x.steps[0].0 == "trigger")
        .expect("parent");
    let child = b.iter().find(|x| x.steps[0].0 == "child").expect("child");
    assert_eq!(child.result, Some(Results::Failure));
    assert_eq!(
        parent.steps,
        steps(&[("trigger", Failure), ("after", Success)])
    );
    assert_eq!(parent.result, Some(Results::Failure));
    assert!(
        stdio(&dir, "child").contains("odebug"),
        "{}",
        stdio(&dir, "child")
    );
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    let linked = common::scalar(
        &c,
        "SELECT count(*) FROM buildsets WHERE parent_buildid = 1",
    );
    assert_eq!(linked, 1);
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn log_rules_raise_a_result_when_the_output_matches() {
    let tmp = tempfile::tempdir().expect("tmp");
    let script = r#"
let rules = [["^abort: error: .*refused", WARNINGS]];
let f = BuildFactory();
f.addStep(ShellCommand(#{ name: "hit", command: "echo 'abort: error: Connection refused'", log_rules: rules, warnOnWarnings: true }));
f.addStep(ShellCommand(#{ name: "miss", command: "echo fine", log_rules: rules }));
f.addStep(ShellCommand(#{ name: "worse", command: "echo 'abort: error: refused'; exit 2", log_rules: rules }));
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    workers: [Worker("w1", "pw-one")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["b"] })],
    builders: [BuilderConfig(#{ name: "b", workernames: ["w1"], factory: f })],
}
"#;
    let dir = master_script(tmp.path(), script);
    let mut master = Master::start(&dir);
    let _w1 = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    let b = force_and_wait(&master, "b", 1);
    assert_eq!(
        b[0].step_results(),
        [
            Some(Results::Warnings),
            Some(Results::Success),
            Some(Results::Failure)
        ],
        "{b:?}"
    );
    assert_eq!(b[0].result, Some(Results::Failure));
    assert!(
        stdio(&dir, "hit").contains("[kiln] flagged: abort: error: Connection refused"),
        "{}",
        stdio(&dir, "hit")
    );
    assert_eq!(master.stop(), Some(0));
    // A pattern that is not a regular expression is a config error.
    std::fs::write(
        dir.join("master.rhai"),
        script.replace(".*refused", "(refused"),
    )
    .expect("write");
    let out = common::kiln(&dir, &["checkconfig"], Duration::from_secs(60));
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert_has(&out.stderr, "is not a regular expression");
}

#[test]
fn a_git_step_clones_then_fetches_and_checks_out_the_build_revision() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src.git");
    std::fs::create_dir_all(&src).expect("mkdir");
    common::run(&src, "git", &["init", "-q", "-b", "main"]);
    let commit = |text: &str| {
        std::fs::write(src.join("VERSION"), format!("{text}\n")).expect("write");
        common::run(&src, "git", &["add", "VERSION"]);
        common::run(&src, "git", &["commit", "-q", "-m", text]);
        common::run(&src, "git", &["rev-parse", "HEAD"])
            .trim()
            .to_string()
    };
    let first = commit("one");
    let dir = Script::steps(&format!(
        r#"f.addStep(Git(#{{ name: "git", repourl: "{src}", branch: "main" }}));
f.addStep(ShellCommand(#{{ name: "show", command: ["sh", "-c", WithProperties("cat VERSION; echo got=%(got_revision)s")] }}));"#,
        src = src.display()
    ))
    .worker("w1", "pw-one")
    .builder("b", &["w1"], "")
    .write(tmp.path());
    let mut master = Master::start(&dir);
    let _w1 = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    let show = |n: i64| build_stdio(&dir, n, "show");
    force_and_wait(&master, "b", 1);
    assert!(
        show(1).contains(&format!("oone\nogot={first}")),
        "{}",
        show(1)
    );
    let second = commit("two");
    force_and_wait(&master, "b", 2);
    assert!(
        show(2).contains(&format!("otwo\nogot={second}")),
        "{}",
        show(2)
    );
    // A build of a given revision checks that one out.
    force_with(&master, "b", &["--revision", &first]);
    wait_until(Duration::from_secs(60), "build 3", || {
        finished(&dir, 3).then_some(())
    });
    assert!(
        show(3).contains(&format!("oone\nogot={first}")),
        "{}",
        show(3)
    );
    let b = builds(&dir);
    assert!(
        b.iter().all(|x| x.result == Some(Results::Success)),
        "{b:?}"
    );
    assert_eq!(master.stop(), Some(0));
}

#[test]
fn a_mock_command_runs_inside_mock_mozilla_when_asked() {
    let tmp = tempfile::tempdir().expect("tmp");
    // A stand-in for mock_mozilla: records its arguments, runs the shell.
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    std::fs::write(
        bin.join("mock_mozilla"),
        "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$(dirname \"$0\")/mock-args\"\nwhile [ \"$1\" != --shell ]; do shift; done\nexec sh -c \"$2\"\n",
    )
    .expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        bin.join("mock_mozilla"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    let path = format!("{}:/usr/bin:/bin", bin.display());
    let dir = Script::steps(
        r#"f.addStep(MockCommand(#{ name: "in_mock", command: ["sh", "-c", "echo in mock: $FLAVOUR"],
    mock: true, target: "mozilla-centos6-x86_64", env: #{ FLAVOUR: "opt" } }));
f.addStep(MockCommand(#{ name: "plain", command: ["sh", "-c", "echo plain: $FLAVOUR"],
    env: #{ FLAVOUR: "dbg" } }));"#,
    )
    .worker("w1", "pw-one")
    .builder("b", &["w1"], &format!(r#"env: #{{ PATH: "{path}" }}"#))
    .write(tmp.path());
    let mut master = Master::start(&dir);
    let _w1 = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    let b = force_and_wait(&master, "b", 1);
    assert_eq!(
        b[0].result,
        Some(Results::Success),
        "{b:?} {}",
        stdio(&dir, "in_mock")
    );
    assert!(
        stdio(&dir, "in_mock").contains("oin mock: opt"),
        "{}",
        stdio(&dir, "in_mock")
    );
    assert!(stdio(&dir, "plain").contains("oplain: dbg"));
    let args = std::fs::read_to_string(bin.join("mock-args")).expect("mock ran");
    let workdir = tmp.path().join("kiln-worker-w1/b/build");
    assert_eq!(
        args,
        format!(
            "-r\nmozilla-centos6-x86_64\n--cwd\n{}\n--unpriv\n--shell\n/usr/bin/env FLAVOUR=opt sh -c 'echo in mock: $FLAVOUR'\n",
            workdir.display()
        )
    );
    assert_eq!(master.stop(), Some(0));
}

/// Logs are stored compressed with `logCompressionMethod`; a reload
/// changes the method of new chunks, and chunks of either read back.
#[test]
fn logs_are_stored_compressed_and_read_back_whatever_the_method() {
    let tmp = tempfile::tempdir().expect("tmp");
    let script = |method: &str| {
        one_builder(
            r#"f.addStep(ShellCommand(#{ name: "chatty", command: "for i in $(seq 1 3000); do echo compiling dom/file$i.cpp; done" }));"#,
        )
        .key(&format!("logCompressionMethod: \"{method}\""))
        .render()
    };
    let dir = master_script(tmp.path(), &script("gz"));
    let mut master = Master::start(&dir);
    let _w1 = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    force_and_wait(&master, "b", 1);
    std::fs::write(dir.join("master.rhai"), script("zstd")).expect("save");
    master.wait_for_log("config reloaded", 1, Duration::from_secs(30));
    force_and_wait(&master, "b", 2);

    let c = rusqlite::Connection::open(dir.join("state.sqlite")).expect("db");
    let codes = |build: i64| -> Vec<i64> {
        c.prepare(
            "SELECT DISTINCT lc.compressed FROM logchunks lc JOIN logs l ON l.id = lc.logid
             JOIN steps s ON s.id = l.stepid WHERE s.buildid = ?1 AND s.name = 'chatty'
             AND lc.last_line - lc.first_line > 100",
        )
        .expect("prepare")
        .query_map([build], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
    };
    assert_eq!(codes(1), [1], "gz");
    assert_eq!(codes(2), [4], "zstd");
    let stored: i64 = common::scalar(&c, "SELECT sum(length(content)) FROM logchunks");
    let text = all_log_text(&dir);
    assert!(
        (stored as usize) * 4 < text.len(),
        "{stored} bytes stored for {} of text",
        text.len()
    );
    // Through the API, as the page reads them.
    let url = master.http_url();
    for build in [1, 2] {
        let logs: serde_json::Value = serde_json::from_str(&common::http_get(&format!(
            "{url}/api/v2/builds/{build}/steps"
        )))
        .expect("json");
        let stepid = logs["steps"][0]["stepid"].as_i64().expect("step");
        let logs: serde_json::Value = serde_json::from_str(&common::http_get(&format!(
            "{url}/api/v2/steps/{stepid}/logs"
        )))
        .expect("json");
        let logid = logs["logs"][0]["logid"].as_i64().expect("log");
        let raw = common::http_get(&format!("{url}/api/v2/logs/{logid}/raw"));
        assert_has(&raw, "compiling dom/file1.cpp\n");
        assert_has(&raw, "compiling dom/file3000.cpp\n");
        let contents: serde_json::Value = serde_json::from_str(&common::http_get(&format!(
            "{url}/api/v2/logs/{logid}/contents"
        )))
        .expect("json");
        let joined: String = contents["logchunks"]
            .as_array()
            .expect("chunks")
            .iter()
            .map(|c| c["content"].as_str().unwrap_or_default())
            .collect();
        assert_has(&joined, "ocompiling dom/file2999.cpp\n");
    }
    assert_eq!(master.stop(), Some(0));

    // An unknown method is refused with the ones there are.
    std::fs::write(dir.join("master.rhai"), script("brotli")).expect("save");
    common::kiln(&dir, &["checkconfig", "."], Duration::from_secs(60))
        .fails_with("`logCompressionMethod` is \"raw\"");
}
