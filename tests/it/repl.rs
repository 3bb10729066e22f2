//! `kiln repl` against examples/mozilla-staging and small masters: one
//! expression (`-e`), piped standard input, a session driven line by line
//! while its files change (`:reload`, `:diff`), and a pseudo-terminal
//! (completion, multi-line input, Ctrl-C during an endless loop).

use crate::common;
use crate::common::assert_has;
use crate::common::kiln_ok;
use common::workers::{Script, TRUE};

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{kiln, repo_root};

fn staging() -> std::path::PathBuf {
    repo_root().join("examples/mozilla-staging")
}

fn eval(dir: &Path, expr: &str) -> common::Output {
    kiln(dir, &["repl", ".", "-e", expr], Duration::from_secs(60))
}

#[test]
fn helpers_answer_from_the_staging_config() {
    let dir = staging();
    let out = eval(&dir, "branches()");
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(
        out.stdout.trim(),
        r#"["cedar", "mozilla-aurora", "mozilla-central", "try"]"#
    );

    // The builders of one branch are those print-config shows with that category.
    let printed = kiln(
        &dir,
        &["print-config", ".", "--json"],
        Duration::from_secs(60),
    );
    let config: serde_json::Value = serde_json::from_str(&printed.stdout).expect("json");
    let mut expected: Vec<String> = config["builders"]
        .as_array()
        .expect("builders")
        .iter()
        .filter(|b| b["category"] == "mozilla-central")
        .map(|b| format!("{:?}", b["name"].as_str().expect("name")))
        .collect();
    expected.sort();
    let out = eval(&dir, r#"let b = builders("mozilla-central"); b.sort(); b"#);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), format!("[{}]", expected.join(", ")));
    assert_eq!(expected.len(), 5);

    let out = eval(&dir, "schedulers()");
    assert_has(&out.stdout, r#""mozilla-central-firefox (Scheduler)""#);

    // config.rhai's fileIsImportant ignores docs/: a docs-only push to
    // mozilla-central reaches its poller and scheduler, and builds nothing.
    let out = eval(
        &dir,
        r#"explain(#{ branch: "mozilla-central", files: ["docs/index.rst"], who: "dev" })"#,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let text = out.stdout;
    assert_has(&text, "yes HgPoller:https://hg.mozilla.org/mozilla-central");
    assert_has(&text, "no  HgPoller:https://hg.mozilla.org/try");
    assert_has(
        &text,
        "mozilla-central-firefox: keeps it: fileIsImportant says the change is not important",
    );
    assert_has(&text, "try-firefox: no: it takes try, not mozilla-central");
    assert_has(&text, "builders that get a request: 0");

    // A code change builds every mozilla-central builder.
    let out = eval(
        &dir,
        r#"explain(#{ branch: "mozilla-central", files: ["docs/a.rst", "dom/a.cpp"] })"#,
    );
    assert_has(&out.stdout, "mozilla-central-firefox: yes: builds");
    assert_has(&out.stdout, "builders that get a request: 5");
    for b in &expected {
        assert!(
            out.stdout.contains(b.trim_matches('"')),
            "{b}: {}",
            out.stdout
        );
    }

    // show: a builder in full, with its steps and commands.
    let out = eval(&dir, r#"show("Linux mozilla-central build")"#);
    assert_has(&out.stdout, "builddir: \"mozilla-central-linux\"");
    assert_has(
        &out.stdout,
        r#"command: ["hg", "clone", "https://hg.mozilla.org/build/mozharness", "scripts"]"#,
    );
    assert_has(&out.stdout, "--branch");
    let out = eval(&dir, r#"show("nosuch")"#);
    assert_eq!(out.code, Some(1));
    assert_has(
        &out.stderr,
        "no builder, scheduler, change source or worker named `nosuch`",
    );

    // help: kiln's description and the signature.
    let out = eval(&dir, r#"help("HgPoller")"#);
    assert_has(&out.stdout, "polls a Mercurial repository's pushes");
    assert_has(&out.stdout, "HgPoller(_: map) -> HgPoller");

    // The scripts' own values are in scope, modules included.
    assert_eq!(eval(&dir, "ACTIVE_BRANCHES.len()").stdout.trim(), "4");
    assert_eq!(
        eval(&dir, "config::BRANCHES.contains(\"cedar\")")
            .stdout
            .trim(),
        "true"
    );

    // kiln's values print readably.
    let out = eval(&dir, "c.change_source[0]");
    assert!(
        out.stdout
            .starts_with(r#"HgPoller(hgURL: "https://hg.mozilla.org/", branch: "mozilla-central""#),
        "{}",
        out.stdout
    );

    // An error: the diagnostic, and exit 1.
    let out = eval(&dir, "let x = ;");
    out.fails_with("<repl>:1:9");
}

#[test]
fn piped_input_keeps_its_scope_and_continues_unfinished_blocks() {
    let tmp = tempfile::tempdir().expect("tmp");
    let input = "let a = [1,\n  2,\n  3];\na.len()\nfn twice(x) {\n  x * 2\n}\ntwice(21)\nnot_defined\ntwice(a[2])\n";
    let mut child = common::kiln_command(tmp.path(), &["repl"])
        .arg(staging())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln repl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout, "3\n42\n6\n", "{stderr}");
    assert_has(&stderr, "Variable not found: not_defined");
    assert_eq!(
        out.status.code(),
        Some(1),
        "an error makes the exit status 1"
    );
}

/// A REPL whose lines the test writes one at a time, reading each answer.
struct Driven {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Driven {
    fn start(dir: &Path) -> Driven {
        let mut child = common::kiln_command(dir, &["repl", "."])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kiln repl");
        let stdin = child.stdin.take().expect("stdin");
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Driven {
            child,
            stdin,
            lines,
        }
    }

    /// Sends a line; returns what it printed up to a line with `until`.
    fn ask(&mut self, line: &str, until: &str) -> String {
        writeln!(self.stdin, "{line}").expect("write");
        self.stdin.flush().expect("flush");
        let mut seen = String::new();
        loop {
            match self.lines.recv_timeout(Duration::from_secs(30)) {
                Ok(l) => {
                    seen.push_str(&l);
                    seen.push('\n');
                    if l.contains(until) {
                        return seen;
                    }
                }
                Err(_) => panic!("no {until:?} after {line:?}; saw:\n{seen}"),
            }
        }
    }
}

impl Drop for Driven {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn small_master(dir: &Path, builders: &[&str]) {
    let mut script = Script::steps(TRUE).worker("w1", "pw").bound_to("c");
    for b in builders {
        script = script.builder(b, &["w1"], "");
    }
    std::fs::write(dir.join("master.rhai"), script.render()).expect("master.rhai");
}

#[test]
fn reload_and_diff_follow_the_files_and_a_broken_edit_keeps_the_old_scope() {
    let tmp = tempfile::tempdir().expect("tmp");
    small_master(tmp.path(), &["a"]);
    let mut r = Driven::start(tmp.path());
    assert!(r.ask("builders()", "]").contains(r#"["a"]"#));
    r.ask("let mine = 7; mine", "7");

    std::fs::write(tmp.path().join("master.rhai"), "let c = #{ broken").expect("write");
    let out = r.ask(":reload", "the reload failed");
    assert_has(&out, "master.rhai:1:");
    assert!(
        r.ask("builders()", "]").contains(r#"["a"]"#),
        "the old config stays"
    );

    small_master(tmp.path(), &["a", "b"]);
    assert_eq!(r.ask(":diff", "builders:").trim(), "builders: +1 (b)");
    assert!(r
        .ask(":reload", "reloaded:")
        .contains("reloaded: 2 builders"));
    assert!(r.ask("builders()", "]").contains(r#"["a", "b"]"#));
    // A variable the session made survives the reload.
    assert!(r.ask("mine + 1", "8").contains('8'));
}

#[test]
fn a_terminal_session_completes_continues_blocks_and_interrupts_an_endless_loop() {
    let tmp = tempfile::tempdir().expect("tmp");
    small_master(tmp.path(), &["alpha", "beta"]);
    let bin = env!("CARGO_BIN_EXE_kiln");
    let mut cmd = Command::new(bin);
    cmd.args(["repl", "."])
        .current_dir(tmp.path())
        .env("NO_COLOR", "1")
        .env("TERM", "xterm");
    let mut p = rexpect::session::spawn_command(cmd, Some(30_000)).expect("pty");
    p.exp_string("kiln> ").expect("prompt");

    // Completion of a map key: `c.bui<Tab>` becomes `c.builders`.
    typed(&mut p, "c.bui");
    p.exp_string("c.bui").expect("the editor took the text");
    typed(&mut p, "\t");
    p.exp_string("c.builders").expect("completed");
    typed(&mut p, ".len() * 1000 + 7\r");
    p.exp_string("2007")
        .expect("c.builders.len() completed and evaluated");
    p.exp_string("kiln> ").expect("prompt");

    // An unfinished block continues on the next line. (The next line is
    // sent only once this one's result is out: the line editor drops what
    // was typed ahead of its prompt, and the prompt alone is redrawn as a
    // line is typed, so it cannot tell us the entry was taken.)
    p.send_line("fn three() {").expect("send");
    ask(&mut p, "  3 } three() * 1111", "3333", "3333");
    ask(
        &mut p,
        "three() * 2002",
        "6006",
        "the function stays defined",
    );

    // Ctrl-C stops an endless loop, not the REPL.
    p.send_line("loop { }").expect("send");
    p.exp_string("loop { }").expect("echo");
    // Nothing shows that the loop has begun to run; give it the time to.
    std::thread::sleep(Duration::from_millis(500));
    control(&mut p, 'c');
    p.exp_string("interrupted (Ctrl-C)").expect("interrupted");
    p.exp_string("kiln> ").expect("prompt");
    ask(&mut p, "4000 + 321", "4321", "still alive");

    // Ctrl-C at the prompt drops the line being typed.
    typed(&mut p, "undefined_name_typed");
    p.exp_string("undefined_name_typed").expect("echo");
    control(&mut p, 'c');
    p.exp_string("kiln> ").expect("a fresh prompt");
    ask(
        &mut p,
        "5000 + 55",
        "5055",
        "the dropped line was not evaluated",
    );

    // Ctrl-D leaves, and the history is kept in the master dir.
    control(&mut p, 'd');
    p.exp_eof().expect("exit");
    let history = std::fs::read_to_string(tmp.path().join(".kiln_repl_history")).expect("history");
    assert_has(&history, "three() * 2002");
}

/// Types `text` (without Enter) and sends it on.
fn typed(p: &mut rexpect::session::PtySession, text: &str) {
    p.send(text).expect("send");
    p.flush().expect("flush");
}

/// Types Ctrl-`key`.
fn control(p: &mut rexpect::session::PtySession, key: char) {
    p.send_control(key).expect("control key");
    p.flush().expect("flush");
}

/// Types `line`, expects `answer` (`what` says what it shows), then the
/// prompt.
fn ask(p: &mut rexpect::session::PtySession, line: &str, answer: &str, what: &str) {
    p.send_line(line).expect("send");
    p.exp_string(answer).expect(what);
    p.exp_string("kiln> ").expect("prompt");
}

#[test]
fn with_master_live_shows_workers_and_waiting_requests_and_diff_compares_with_the_running_config() {
    use common::workers::{force, master_script, KilnWorker, TestWorker};
    let tmp = tempfile::tempdir().expect("tmp");
    // w2 never connects: its builders' requests wait.
    let script = |builders: &[&str]| {
        let mut s = Script::steps(TRUE)
            .worker("w1", "pw-one")
            .worker("w2", "pw-two");
        for b in builders {
            s = s.builder(b, &["w2"], "");
        }
        s.render()
    };
    let dir = master_script(tmp.path(), &script(&["b"]));
    let master = common::Master::start_with(&dir, &["--no-watch"]);
    let url = master.http_url();
    let _w1 = KilnWorker::connect(&master, tmp.path(), "w1", "pw-one");
    force(&master, "b");
    force(&master, "b");

    let out = kiln_ok(&dir, &["repl", ".", "--master", &url, "-e", "live()"]);
    assert_eq!(
        out.stdout.trim(),
        "1 connected worker(s): w1\n2 waiting request(s)\n  b: 2"
    );

    // The files change; the master (not watching) still runs the old config.
    std::fs::write(dir.join("master.rhai"), script(&["b", "c"])).expect("save");
    let out = kiln_ok(&dir, &["repl", ".", "--master", &url, "-e", ":diff"]);
    assert_eq!(
        out.stdout.trim(),
        format!("against the master at {url}:\nbuilders: +1 (c)\nschedulers: ~1 (force)")
    );
    // Without --master, live() says what it needs.
    let out = eval(&dir, "live()");
    out.fails_with("--master URL");
}

#[test]
fn completion_offers_variables_functions_module_members_and_map_keys() {
    let opened = kiln::repl::Session::open(&staging(), kiln::script::Limits::default());
    assert!(opened.problems.iter().all(|d| !d.is_error()));
    let s = opened.session;
    let has = |word: &str, want: &str| {
        let got = s.completions(word);
        assert!(got.iter().any(|c| c == want), "{word:?} -> {got:?}");
    };
    has("ACTIVE_", "ACTIVE_BRANCHES");
    has("config::BRA", "config::BRANCHES");
    has("explai", "explain(");
    has("generateBranch", "generateBranchObjects(");
    has("c.ti", "c.title");
    has("c.www.p", "c.www.port");
    has("conf", "config::");
    assert!(s.completions("zzz_nothing").is_empty());
}
