//! The config host against real master dirs: the seed's staging master, the
//! quickstart, and small masters written into temp dirs.

use crate::common;
use crate::common::assert_has;

use std::path::Path;
use std::time::Duration;

use kiln::config::{ChangeSource, SchedulerKind, StepCommand};
use kiln::script::{load_master, Limits};

const LIMIT: Duration = Duration::from_secs(60);

fn write(dir: &Path, name: &str, text: &str) {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).expect("mkdir");
    }
    std::fs::write(p, text).expect("write");
}

fn argv(c: &Option<StepCommand>) -> Vec<String> {
    match c {
        Some(StepCommand::Argv(v)) => v
            .iter()
            .map(|a| a.to_string().trim_matches('"').to_string())
            .collect(),
        other => panic!("expected an argv command, got {other:?}"),
    }
}

#[test]
fn print_config_json_of_the_staging_master_matches_the_reviewed_snapshot() {
    let root = common::repo_root();
    let out = common::kiln(
        &root,
        &["print-config", "--json", "examples/mozilla-staging"],
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    insta::assert_snapshot!("mozilla_staging_print_config", out.stdout);
}

#[test]
fn checkconfig_accepts_the_examples() {
    let root = common::repo_root();
    let out = common::kiln(&root, &["checkconfig", "examples/mozilla-staging"], LIMIT);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_has(
        &out.stdout,
        "18 builders, 4 schedulers, 4 change sources, 7 workers",
    );
    let out = common::kiln(&root, &["checkconfig", "examples/quickstart"], LIMIT);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

#[test]
fn staging_master_has_the_seeds_builders_schedulers_and_pollers() {
    let loaded = load_master(
        &common::repo_root().join("examples/mozilla-staging"),
        Limits::default(),
    )
    .expect("loads");
    let c = &loaded.config;
    // One poller per branch, not per platform.
    assert_eq!(c.change_source.len(), 4);
    let ChangeSource::HgPoller(central) = &c.change_source[0] else {
        panic!("HgPoller expected")
    };
    assert_eq!(
        central.repository(),
        "https://hg.mozilla.org/mozilla-central"
    );
    let ChangeSource::HgPoller(try_) = &c.change_source[3] else {
        panic!("HgPoller expected")
    };
    assert!(
        try_.tips_only && try_.repo_branch.is_none(),
        "try polls tips of every branch"
    );

    let sched = c
        .schedulers
        .iter()
        .find(|s| s.name == "cedar-firefox")
        .expect("cedar scheduler");
    assert_eq!(
        sched.builder_names,
        [
            "Linux x86-64 cedar build",
            "OS X 10.7 cedar build",
            "WINNT 5.2 cedar build"
        ]
    );
    let SchedulerKind::Scheduler {
        branch,
        file_is_important,
        ..
    } = &sched.kind
    else {
        panic!("Scheduler expected")
    };
    assert_eq!(branch.as_deref(), Some("projects/cedar"));
    assert!(file_is_important.is_some());

    let b = c
        .builders
        .iter()
        .find(|b| b.name == "WINNT 5.2 try build")
        .expect("try win32 builder");
    assert_eq!(b.builddir, "try-win32");
    assert_eq!(b.worker_builddir, "try-w32-0000000000000000000000");
    assert_eq!(b.worker_builddir.len(), 30);
    assert_eq!(b.category.as_deref(), Some("try"));
    let steps: Vec<&str> = b.factory.steps.iter().map(|s| s.name.as_str()).collect();
    // win32 has no reboot_command in config.rhai, so no reboot step.
    assert_eq!(
        steps,
        [
            "get_basedir",
            "clone_scripts",
            "download_props",
            "run_script",
            "cleanup"
        ]
    );
    assert_eq!(
        argv(&b.factory.steps[0].command),
        ["cd"],
        "Windows reads its basedir with cd"
    );

    // extra_args never pile up across branches or platforms.
    for b in &c.builders {
        let run = b
            .factory
            .steps
            .iter()
            .find(|s| s.name == "run_script")
            .expect("run_script");
        let args = argv(&run.command);
        assert_eq!(
            args.iter().filter(|a| *a == "--branch").count(),
            1,
            "{}: {args:?}",
            b.name
        );
        assert_eq!(
            args.iter().filter(|a| *a == "--build-pool").count(),
            1,
            "{}: {args:?}",
            b.name
        );
        assert_eq!(args[args.len() - 1], "staging");
        assert_eq!(
            run.timeout,
            Some(if b.name == "OS X 10.7 cedar build" {
                7200
            } else {
                3600
            })
        );
        assert_eq!(run.max_time, Some(4 * 3600));
    }
}

#[test]
fn every_file_read_is_recorded_with_its_symlinks() {
    let root = common::repo_root();
    let dir = root.join("examples/mozilla-staging");
    let loaded = load_master(&dir, Limits::default()).expect("loads");
    let files: Vec<String> = loaded
        .files
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let has = |p: &Path| files.iter().any(|f| Path::new(f) == p);
    for expected in [
        dir.join("master.rhai"),
        root.join("scripts/mozilla/universal_master.rhai"),
        dir.join("master_localconfig.rhai"),
        dir.join("build_localconfig.rhai"),
        root.join("scripts/mozilla/build_localconfig.rhai"),
        dir.join("localconfig.rhai"),
        dir.join("staging_config.rhai"),
        root.join("scripts/mozilla/staging_config.rhai"),
        root.join("scripts/mozilla/config.rhai"),
        dir.join("master_config.json"),
        dir.join("passwords.rhai"),
        dir.join("secrets/worker-password"),
        dir.join("secrets/dep-signing"),
    ] {
        let expected = std::fs::canonicalize(expected.parent().unwrap())
            .unwrap()
            .join(expected.file_name().unwrap());
        assert!(
            has(&expected),
            "{} not recorded in {files:#?}",
            expected.display()
        );
    }
}

#[test]
fn secrets_never_print() {
    let root = common::repo_root();
    for args in [
        &["print-config", "examples/mozilla-staging"][..],
        &["print-config", "--json", "examples/mozilla-staging"],
    ] {
        let out = common::kiln(&root, args, LIMIT);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        assert!(
            !out.stdout.contains("staging-worker-password"),
            "worker password leaked"
        );
        assert!(
            !out.stdout.contains("staging-pass"),
            "signing secret leaked"
        );
        assert!(out.stdout.contains("<secret>"));
    }
}

#[test]
fn a_database_password_never_prints() {
    let tmp = tempfile::tempdir().expect("tmp");
    write(
        tmp.path(),
        "master.rhai",
        r#"#{ db: #{ db_url: "postgresql://kiln:hunter2@db.example.org:5432/kiln" }, multiMaster: true }"#,
    );
    for args in [&["print-config", "."][..], &["print-config", "--json", "."]] {
        let out = common::kiln(tmp.path(), args, LIMIT);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        assert!(!out.stdout.contains("hunter2"), "{}", out.stdout);
        assert_has(
            &out.stdout,
            "postgresql://kiln:***@db.example.org:5432/kiln",
        );
    }
}

#[test]
fn generate_branch_objects_and_merge_leave_their_inputs_alone() {
    let tmp = tempfile::tempdir().expect("tmp");
    write(
        tmp.path(),
        "master.rhai",
        r#"
        let pf = #{ base_name: "Linux {b}", stage_product: "firefox", workers: ["w1"],
                    mozharness_config: #{ script_name: "build.py", extra_args: ["--config", "x.py"] } };
        let br = #{ hgurl: "https://hg.example.org/", repo_path: "a", mozharness_repo_path: "mh",
                    enabled_products: ["firefox"], platforms: #{ linux: pf } };
        let one = generateBranchObjects(br, "a");
        let two = generateBranchObjects(br, "b");
        if br.platforms.linux.mozharness_config.extra_args.len() != 2 { throw "inputs were changed"; }
        let all = #{ builders: [], status: [], change_source: [], schedulers: [] };
        all = mergeBuildObjects(all, one);
        all = mergeBuildObjects(all, two);
        if one.builders.len() != 1 { throw "merge changed its second argument"; }
        let c = #{ workers: [Worker("w1", "pw")] };
        c.builders = all.builders;
        c.schedulers = all.schedulers;
        c
    "#,
    );
    let err = load_master(tmp.path(), Limits::default());
    // Both branches poll the same repository path "a": validation says so.
    let failure = err.err().expect("duplicate polling is an error");
    assert!(failure
        .diagnostics
        .iter()
        .all(|d| !d.message.contains("were changed")));
    write(tmp.path(), "master.rhai", &std::fs::read_to_string(tmp.path().join("master.rhai")).unwrap().replace(
        "let two = generateBranchObjects(br, \"b\");",
        "let br2 = br; br2.repo_path = \"b\"; br2.platforms.linux.base_name = \"Linux b\";\n\
         let two = #{};\n\
         for pair in [[br, \"a\"], [br2, \"b\"]] { let made = generateBranchObjects(pair[0], pair[1]); if pair[1] == \"a\" { one = made } else { two = made } }",
    ));
    let loaded = load_master(tmp.path(), Limits::default()).unwrap_or_else(|f| panic!("{f:?}"));
    let c = &loaded.config;
    assert_eq!(c.builders.len(), 2);
    let args: Vec<Vec<String>> = c
        .builders
        .iter()
        .map(|b| {
            let run = b.factory.steps.iter().find(|s| s.name == "run_script");
            argv(&run.expect("run_script").command)
        })
        .collect();
    assert_eq!(
        args[0],
        [
            "scripts/build.py",
            "--config",
            "x.py",
            "--branch",
            "a",
            "--build-pool",
            "production"
        ]
    );
    assert_eq!(
        args[1],
        [
            "scripts/build.py",
            "--config",
            "x.py",
            "--branch",
            "b",
            "--build-pool",
            "production"
        ]
    );
    // The steps the two branches' factories make alike are one step in
    // memory; the script's command line, which names the branch, is not.
    let step = |b: usize, name: &str| {
        c.builders[b]
            .factory
            .steps
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no step {name}"))
    };
    for name in ["get_basedir", "clone_scripts", "download_props", "cleanup"] {
        assert!(
            std::sync::Arc::ptr_eq(&step(0, name), &step(1, name)),
            "{name} is held twice"
        );
    }
    let (a, b) = (step(0, "run_script"), step(1, "run_script"));
    assert!(!std::sync::Arc::ptr_eq(&a, &b));
    // ... though its environment and log evaluation are one each.
    assert!(std::sync::Arc::ptr_eq(&a.env, &b.env));
    assert!(a.env.contains_key("PROPERTIES_FILE"));
    match (&a.log_eval, &b.log_eval) {
        (Some(x), Some(y)) => assert!(std::sync::Arc::ptr_eq(x, y)),
        other => panic!("run_script without log_eval: {other:?}"),
    }
    // The builders themselves share their pool, their tags and the
    // property values they have alike; a builder's directory is one
    // string with its `builddir` property.
    let (x, y) = (&c.builders[0], &c.builders[1]);
    assert!(std::sync::Arc::ptr_eq(&x.worker_names, &y.worker_names));
    assert!(std::sync::Arc::ptr_eq(&x.tags, &y.tags));
    let prop = |b: &kiln::config::BuilderConfig, name: &str| match b.properties.get(name) {
        Some(kiln::config::PropValue::Str(s)) => s.clone(),
        other => panic!("{} has {name} = {other:?}", b.name),
    };
    assert!(prop(x, "platform").ptr_eq(&prop(y, "platform")));
    assert!(prop(x, "product").ptr_eq(&prop(y, "product")));
    assert_eq!(
        (prop(x, "branch").as_str(), prop(y, "branch").as_str()),
        ("a", "b")
    );
    assert!(prop(x, "builddir").ptr_eq(&x.builddir));
    assert!(prop(y, "workerbuilddir").ptr_eq(&y.worker_builddir));
    // A branch's scheduler names its builder with the builder's own name.
    let names_of = |b: &kiln::config::BuilderConfig| {
        c.schedulers
            .iter()
            .flat_map(|s| s.builder_names.iter())
            .filter(|n| n.ptr_eq(&b.name))
            .count()
    };
    assert_eq!((names_of(x), names_of(y)), (1, 1));
}

#[test]
fn legacy_names_are_accepted_with_warnings() {
    let tmp = tempfile::tempdir().expect("tmp");
    write(
        tmp.path(),
        "master.rhai",
        r#"
        let f = BuildFactory([ShellCommand(#{ command: "make" })]);
        #{ slaves: [BuildSlave("w1", "pw")],
           builders: [#{ name: "b", slavenames: ["w1"], slavebuilddir: "bd", factory: f }] }
    "#,
    );
    let out = common::kiln(tmp.path(), &["checkconfig", "."], LIMIT);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    for legacy in [
        "`slaves`",
        "`slavenames`",
        "`slavebuilddir`",
        "`BuildSlave`",
    ] {
        assert!(
            out.stderr.contains(legacy),
            "no warning for {legacy}: {}",
            out.stderr
        );
    }
    let loaded = load_master(tmp.path(), Limits::default()).unwrap_or_else(|f| panic!("{f:?}"));
    assert_eq!(loaded.config.builders[0].worker_builddir, "bd");
    assert_eq!(*loaded.config.builders[0].worker_names, ["w1"]);
}

/// A warning said for each of many builders is said once, with how often
/// and where it was first (a 1,000-branch master written with the seed's
/// `slaves` used to print 5,000 of them).
#[test]
fn a_repeated_warning_is_said_once_with_its_count_and_first_place() {
    let tmp = tempfile::tempdir().expect("tmp");
    write(
        tmp.path(),
        "master.rhai",
        r#"
        let f = BuildFactory([ShellCommand(#{ command: "make" })]);
        let c = #{ workers: [Worker("w1", "pw")], builders: [] };
        for i in 0..40 {
            c.builders.push(#{ name: `b${i}`, slavenames: ["w1"], factory: f });
        }
        c
    "#,
    );
    let out = common::kiln(tmp.path(), &["checkconfig", "."], LIMIT);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(
        out.stderr.matches("`slavenames`").count(),
        1,
        "{}",
        out.stderr
    );
    assert_has(&out.stderr, "(40 times; the first");
    assert_has(&out.stderr, "master.rhai:5:47");
}

#[test]
fn imports_look_beside_the_importer_then_the_master_dir_then_the_stdlib() {
    let tmp = tempfile::tempdir().expect("tmp");
    let master = tmp.path().join("master");
    let repo = tmp.path().join("configs");
    write(
        &repo,
        "entry.rhai",
        r#"
        import "sibling" as sibling;      // beside entry.rhai, in the config repo
        import "local" as local;          // only in the master dir
        import "dicts" as dicts;          // kiln's stdlib
        let m = dicts::with_defaults(#{ title: sibling::TITLE }, #{ title: "no", titleURL: local::URL });
        m
    "#,
    );
    write(
        &repo,
        "sibling.rhai",
        "export const TITLE = \"from the config repo\";",
    );
    write(
        &master,
        "local.rhai",
        "export const URL = \"https://local.example/\";",
    );
    std::os::unix::fs::symlink(repo.join("entry.rhai"), master.join("master.rhai"))
        .expect("symlink");
    let loaded = load_master(&master, Limits::default()).unwrap_or_else(|f| panic!("{f:?}"));
    assert_eq!(loaded.config.title, "from the config repo");
    assert_eq!(loaded.config.title_url, "https://local.example/");
}

#[test]
fn create_master_writes_a_master_that_checks() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("m");
    let d = dir.to_string_lossy().into_owned();
    let out = common::kiln(tmp.path(), &["create-master", &d], LIMIT);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let out = common::kiln(tmp.path(), &["checkconfig", &d], LIMIT);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    // It refuses to overwrite.
    let out = common::kiln(tmp.path(), &["create-master", &d], LIMIT);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("already exists"));
}

#[test]
fn scripts_cannot_evaluate_strings() {
    let tmp = tempfile::tempdir().expect("tmp");
    write(tmp.path(), "master.rhai", "eval(\"40 + 2\"); #{}");
    let out = common::kiln(tmp.path(), &["checkconfig", "."], LIMIT);
    out.fails_with("master.rhai:1:1");
}

#[test]
fn the_config_is_the_latest_value_of_the_variable_the_script_ends_with() {
    // The loader takes the final variable out of the scope rather than
    // copying it: shadowing, a later assignment and a trailing `;` must
    // still give what Rhai itself would return.
    let tmp = tempfile::tempdir().expect("tempdir");
    write(
        tmp.path(),
        "master.rhai",
        r#"
let c = #{ workers: [Worker("old", "pw")], builders: [], schedulers: [] };
let c = #{ workers: [Worker("w1", "pw")], builders: [], schedulers: [] };
c.workers.push(Worker("w2", "pw"));
c = c;
c;
"#,
    );
    let loaded = load_master(tmp.path(), Limits::default()).expect("loads");
    let names: Vec<&str> = loaded
        .config
        .workers
        .iter()
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(names, ["w1", "w2"]);
}

/// A Nightly's and the janitor's cron fields print as Buildbot names them,
/// beside their other keys (one `Cron` type holds them in the model).
#[test]
fn cron_fields_print_at_the_top_of_a_nightly_and_the_janitor() {
    let tmp = tempfile::tempdir().expect("tmp");
    write(
        tmp.path(),
        "master.rhai",
        r#"
        let f = BuildFactory([ShellCommand(#{ command: "true" })]);
        #{ workers: [Worker("w", "pw")],
           builders: [BuilderConfig(#{ name: "b", workernames: ["w"], factory: f })],
           schedulers: [Nightly(#{ name: "n", builderNames: ["b"], hour: [3], dayOfWeek: [0, 4] })],
           configurators: [JanitorConfigurator(#{ logHorizon: 86400, minute: 30 })] }
    "#,
    );
    let out = common::kiln(tmp.path(), &["print-config", "--json", "."], LIMIT);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let c: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    let n = &c["schedulers"][0];
    assert_eq!(n["type"], "Nightly");
    assert_eq!(
        (
            &n["minute"],
            &n["hour"],
            &n["dayOfMonth"],
            &n["month"],
            &n["dayOfWeek"]
        ),
        (
            &serde_json::json!([0]),
            &serde_json::json!([3]),
            &serde_json::json!("*"),
            &serde_json::json!("*"),
            &serde_json::json!([0, 4])
        ),
        "{n}"
    );
    assert_eq!(n["onlyIfChanged"], false);
    let j = &c["janitor"];
    assert_eq!(j["logHorizon"], 86400);
    assert_eq!(
        (&j["minute"], &j["hour"]),
        (&serde_json::json!([30]), &serde_json::json!([0])),
        "{j}"
    );
}
