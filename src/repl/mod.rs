//! `kiln repl`: an interactive Rhai session over a master's scripts.
//!
//! A [`Session`] evaluates the master's entry script with the master's
//! engine, vocabulary and limits, keeps the resulting scope (so `c`,
//! `BRANCHES`, ... are there), re-imports the entry script's modules for
//! every line, and adds helpers to explore the config: `branches()`,
//! `builders()`, `schedulers()`, `show(name)`, `explain(change)` and
//! `help(name)`. [`run`] drives it from a terminal (rustyline: history,
//! multi-line input, completion, Ctrl-C), from piped standard input, or
//! for one expression (`-e`).

mod helpers;
mod session;

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

use crate::script::{Limits, INTERRUPT};

use helpers::help_text;
pub use session::{Opened, Session};

/// How `kiln repl` was asked to run.
pub struct Options {
    pub dir: PathBuf,
    pub limits: Limits,
    /// `-e EXPR`: evaluate, print, exit.
    pub expr: Option<String>,
    /// `--master URL`: a running master for `live()` and `:diff`.
    pub master: Option<String>,
}

/// Whether `text` is an unfinished block (more brackets opened than
/// closed, outside strings and comments).
pub fn unfinished(text: &str) -> bool {
    let mut depth: i64 = 0;
    let mut chars = text.chars().peekable();
    let mut in_str: Option<char> = None;
    while let Some(ch) = chars.next() {
        if let Some(q) = in_str {
            if ch == '\\' {
                chars.next();
            } else if ch == q {
                in_str = None;
            }
            continue;
        }
        match ch {
            '"' | '`' | '\'' => in_str = Some(ch),
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '{' | '(' | '[' => depth += 1,
            '}' | ')' | ']' => depth -= 1,
            _ => {}
        }
    }
    depth > 0 || in_str == Some('`')
}

/// A REPL command (`:help`, `:reload`, `:diff`, `:quit`) or an input to
/// evaluate; prints what it shows. Returns false to quit, and whether it
/// failed.
fn handle(
    session: &mut Session,
    input: &str,
    color: bool,
    out: &mut impl Write,
    err: &mut impl Write,
) -> (bool, bool) {
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return (true, false);
    }
    if let Some(cmd) = trimmed.strip_prefix(':') {
        let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
        let arg = arg.trim();
        match name {
            "q" | "quit" | "exit" => return (false, false),
            "help" | "h" => {
                let text = if arg.is_empty() {
                    "kiln repl: type Rhai; the config's values are in scope (c, BRANCHES, ...).\n\
                     helpers: branches(), builders(), builders(branch), schedulers(), show(name), \
                     explain(#{branch, files, who, comments}), help(name), live() (with --master URL)\n\
                     commands: :help NAME, :reload, :diff, :quit (or Ctrl-D)"
                        .to_string()
                } else {
                    help_text(&session.engine.gen_fn_signatures(true), arg)
                };
                let _ = writeln!(out, "{text}");
            }
            "reload" | "r" => {
                let problems = session.reload();
                if problems.iter().any(|d| d.is_error()) {
                    let _ = write!(err, "{}", session.render(&problems, color));
                    let _ = writeln!(
                        err,
                        "the reload failed; the session keeps the previous scripts"
                    );
                    return (true, true);
                }
                let n = session.config().map_or(0, |c| c.builders.len());
                let _ = writeln!(out, "reloaded: {n} builders");
            }
            "diff" | "d" => match session.diff() {
                Ok(d) => {
                    let _ = writeln!(out, "{d}");
                }
                Err(e) => {
                    let _ = write!(err, "{e}");
                    return (true, true);
                }
            },
            other => {
                let _ = writeln!(err, "unknown command `:{other}`; :help lists them");
                return (true, true);
            }
        }
        return (true, false);
    }
    match session.eval(input) {
        Ok(v) => {
            let shown = session.show(&v);
            if !shown.is_empty() {
                let _ = writeln!(out, "{shown}");
            }
            (true, false)
        }
        Err(d) => {
            let _ = write!(err, "{}", session.render(&d, color));
            (true, true)
        }
    }
}

/// `kiln repl`. Returns the process's exit code.
pub fn run(opts: Options) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    let color = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let Opened {
        mut session,
        problems,
    } = Session::open(&opts.dir, opts.limits.clone());
    *crate::sync::write(&session.shared.master) =
        opts.master.map(|m| m.trim_end_matches('/').to_string());
    let failed_load = session.config().is_none();
    if !problems.is_empty() {
        eprint!("{}", session.render(&problems, color));
    }
    let mut stdout = std::io::stdout();
    if let Some(expr) = opts.expr {
        if failed_load {
            return Ok(ExitCode::FAILURE);
        }
        let (_, failed) = handle(
            &mut session,
            &expr,
            color,
            &mut stdout,
            &mut std::io::stderr(),
        );
        return Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    if !std::io::stdin().is_terminal() {
        // Piped input: each complete input in turn.
        let mut failed = failed_load;
        let mut run = |session: &mut Session, input: &str| {
            let (go_on, f) = handle(session, input, false, &mut stdout, &mut std::io::stderr());
            failed |= f;
            go_on
        };
        let mut pending = String::new();
        for line in std::io::stdin().lock().lines() {
            let line = line?;
            pending.push_str(&line);
            pending.push('\n');
            if unfinished(&pending) {
                continue;
            }
            let go_on = run(&mut session, &pending);
            pending.clear();
            if !go_on {
                break;
            }
        }
        if !pending.trim().is_empty() {
            run(&mut session, &pending);
        }
        return Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    interactive(session, color)
}

/// The terminal REPL: rustyline with history in the master dir, multi-line
/// input, completion, and Ctrl-C for the line or the evaluation.
fn interactive(session: Session, color: bool) -> anyhow::Result<std::process::ExitCode> {
    use rustyline::error::ReadlineError;
    let history = session.dir.join(".kiln_repl_history");
    let shared = Arc::new(std::sync::Mutex::new(session));
    let mut rl: rustyline::Editor<ReplHelper, rustyline::history::DefaultHistory> =
        rustyline::Editor::new()?;
    // Ctrl-C while a line evaluates sets INTERRUPT, which every engine's
    // progress hook checks. (At the prompt the terminal is raw: Ctrl-C is a
    // key there, not a signal.) Registered after the editor, which installs
    // a SIGINT handler of its own for its whole life: signal-hook chains
    // that one, so the editor also hears of the signal, and its next
    // readline reports it, which is taken as a Ctrl-C at the prompt.
    signal_hook::flag::register(signal_hook::consts::SIGINT, INTERRUPT.clone())
        .map_err(|e| anyhow::anyhow!("cannot handle Ctrl-C: {e}"))?;
    rl.set_helper(Some(ReplHelper {
        session: shared.clone(),
    }));
    let _ = rl.load_history(&history);
    println!(
        "kiln repl in {}: the config's values are in scope; :help for help, Ctrl-D to leave",
        crate::diagnostics::display_pathbuf(&crate::sync::lock(&shared).dir)
    );
    loop {
        match rl.readline("kiln> ") {
            Ok(line) => {
                let _ = rl.add_history_entry(line.as_str());
                let mut s = crate::sync::lock(&shared);
                let (go_on, _) = handle(
                    &mut s,
                    &line,
                    color,
                    &mut std::io::stdout(),
                    &mut std::io::stderr(),
                );
                if !go_on {
                    break;
                }
            }
            Err(ReadlineError::Interrupted)
            | Err(ReadlineError::Signal(rustyline::error::Signal::Interrupt)) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        }
    }
    let _ = rl.save_history(&history);
    Ok(std::process::ExitCode::SUCCESS)
}

#[derive(rustyline::Helper, rustyline::Highlighter, rustyline::Hinter)]
struct ReplHelper {
    session: Arc<std::sync::Mutex<Session>>,
}

impl rustyline::validate::Validator for ReplHelper {
    fn validate(
        &self,
        ctx: &mut rustyline::validate::ValidationContext,
    ) -> rustyline::Result<rustyline::validate::ValidationResult> {
        use rustyline::validate::ValidationResult;
        Ok(if unfinished(ctx.input()) {
            ValidationResult::Incomplete
        } else {
            ValidationResult::Valid(None)
        })
    }
}

impl rustyline::completion::Completer for ReplHelper {
    type Candidate = String;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &rustyline::Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        let before = &line[..pos];
        let start = before
            .rfind(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.' || c == ':'))
            .map_or(0, |i| i + 1);
        let word = &before[start..];
        let s = crate::sync::lock(&self.session);
        Ok((start, s.completions(word)))
    }
}
