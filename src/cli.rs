//! The `kiln` command line (docs/cli.md): parsing and dispatch.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use crate::diagnostics::{display_pathbuf, render, Diagnostic};
use crate::script::{load_master, Limits, LoadFailure, Loaded};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "A build master in the Buildbot tradition, configured by Rhai scripts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct SendchangeArgs {
    /// The master's web address, e.g. http://127.0.0.1:8010/
    #[arg(long)]
    master: String,
    /// Who made the change.
    #[arg(long, visible_alias = "who")]
    author: String,
    #[arg(long)]
    branch: Option<String>,
    #[arg(long)]
    revision: Option<String>,
    #[arg(long, short = 'm', visible_alias = "comments")]
    comments: Option<String>,
    #[arg(long)]
    repository: Option<String>,
    #[arg(long)]
    project: Option<String>,
    #[arg(long)]
    category: Option<String>,
    #[arg(long)]
    revlink: Option<String>,
    #[arg(long)]
    codebase: Option<String>,
    /// When the change was made (Unix seconds; default: now).
    #[arg(long)]
    when: Option<i64>,
    /// A change property, NAME=VALUE (repeatable; VALUE is JSON if it parses as JSON).
    #[arg(long = "property", short = 'p', value_name = "NAME=VALUE")]
    properties: Vec<String>,
    /// The files the change touched.
    files: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// A demo in one command: a master dir with a local Git repository,
    /// the master and two local kiln workers, in the foreground (Ctrl-C
    /// stops them). Commit to DIR/repo and it builds.
    Quickstart {
        /// The demo's directory (made if missing; reused if it holds one).
        /// Default: kiln-quickstart, or kiln-mozilla with --mozilla.
        dir: Option<PathBuf>,
        /// The seed's staging master instead: four Mercurial branches, the
        /// ScriptFactory's builds on a worker per platform pool.
        #[arg(long)]
        mozilla: bool,
        /// The master's HTTP port (0: any free one).
        #[arg(long, default_value_t = 8010)]
        http_port: u16,
        /// The port workers connect to (0: any free one).
        #[arg(long, default_value_t = 9989)]
        worker_port: u16,
    },
    /// Write a working master dir: master.rhai, one worker, one builder, SQLite.
    CreateMaster {
        /// The directory to create (it may exist, but not hold a master.rhai).
        dir: PathBuf,
        /// The Mercurial repository (path or URL) the master polls.
        #[arg(long, default_value = "repo")]
        repo: String,
    },
    /// Load and validate the config; exit 0, or 1 with every problem found.
    Checkconfig {
        /// The master dir (holding master.rhai).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Stop a script after this many Rhai operations.
        #[arg(long)]
        max_operations: Option<u64>,
    },
    /// Delete old logs, compress every log chunk with the config's
    /// logCompressionMethod and give the free space back to the file system
    /// (Buildbot's cleanupdb). A master on SQLite must be stopped first.
    Cleanupdb {
        /// The master dir (holding master.rhai).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Delete the logs of builds that ended more than this many seconds
        /// ago (default: the JanitorConfigurator's logHorizon; without one,
        /// every log is kept).
        #[arg(long, value_name = "SECONDS")]
        log_horizon: Option<u64>,
    },
    /// Print the evaluated config (secrets as <secret>).
    PrintConfig {
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Print JSON instead of the readable form.
        #[arg(long)]
        json: bool,
    },
    /// Run the master in the foreground (logs to stderr and DIR/kiln.log).
    /// It reloads its config when a file it was read from changes, on
    /// SIGHUP, on `kiln reconfig`, and on `POST /api/v2/reconfig`.
    Start {
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Do not watch the config's files (reload on SIGHUP, `kiln
        /// reconfig` and the API only).
        #[arg(long)]
        no_watch: bool,
        /// A burst of saves is one reload once no file changed for this
        /// many milliseconds.
        #[arg(long, default_value_t = 300)]
        reload_quiet_ms: u64,
        /// Stop a script (at start and on every reload) after this many
        /// operations, as `kiln checkconfig --max-operations` does.
        #[arg(long)]
        max_operations: Option<u64>,
    },
    /// An interactive Rhai session over DIR's scripts: the config's values
    /// in scope, and branches(), builders(), schedulers(), show(name),
    /// explain(#{branch, files, ...}), help(name); :help, :reload, :diff.
    /// Reads standard input when it is not a terminal.
    Repl {
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Evaluate this and print the value (exit 1 on an error).
        #[arg(short = 'e', long = "eval")]
        expr: Option<String>,
        /// A running master (its HTTP URL): live() reads its workers and
        /// waiting requests, :diff compares the files with its config.
        #[arg(long)]
        master: Option<String>,
        /// Stop an evaluation after this many operations.
        #[arg(long)]
        max_operations: Option<u64>,
    },
    /// Ask the master running in DIR to reload its config; print what
    /// changed, or the errors (exit 1: the old config keeps running).
    Reconfig {
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Give up waiting for the reload after this many seconds.
        #[arg(long, default_value_t = 120)]
        wait: u64,
    },
    /// Work through a queue directory (a QueueDir's `new/`): run each
    /// item's command, retry failures with backoff, move an item that
    /// keeps failing to `dead/` with its log. Runs until Ctrl-C, or with
    /// `--once` until nothing may run now.
    QueueRun {
        dir: PathBuf,
        #[arg(long)]
        once: bool,
        /// Failures before an item goes to dead/.
        #[arg(long, default_value_t = 5)]
        max_retries: u32,
        /// Seconds before the first retry (doubling each time).
        #[arg(long, default_value_t = 60)]
        backoff: u64,
        /// Seconds a command may run before it is killed.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Stop the master running in DIR, waiting until it has stopped.
    Stop {
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
    /// Poll every change source of DIR once, store what is new, and exit.
    Poll {
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Send a change to a running master (its /change_hook/base).
    Sendchange(Box<SendchangeArgs>),
    /// Request a build of BUILDER from a running master (through a ForceScheduler).
    Force(Box<ForceArgs>),
    /// kiln's own worker.
    Worker {
        #[command(subcommand)]
        command: kiln_worker::Command,
    },
    /// Measurements that need kiln's insides (see BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        scenario: BenchScenario,
    },
}

#[derive(Subcommand)]
enum BenchScenario {
    /// Connect COUNT workers ({prefix}0...) from this one process and keep them running.
    WorkerFleet {
        /// Where their basedirs go.
        dir: PathBuf,
        #[arg(long)]
        master: String,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value = "w")]
        prefix: String,
        #[arg(long)]
        password: String,
    },
    /// Changes through single-branch schedulers into build requests.
    Schedulers {
        #[arg(long, default_value_t = 10_000)]
        changes: usize,
        #[arg(long, default_value_t = 200)]
        schedulers: usize,
        #[arg(long, default_value_t = 5)]
        builders: usize,
    },
}

#[derive(clap::Args)]
struct ForceArgs {
    /// The master's web address, e.g. http://127.0.0.1:8010/
    #[arg(long)]
    master: String,
    /// The builder to build.
    builder: String,
    /// The ForceScheduler to use (default: the first that lists BUILDER).
    #[arg(long)]
    scheduler: Option<String>,
    #[arg(long)]
    branch: Option<String>,
    #[arg(long)]
    revision: Option<String>,
    #[arg(long)]
    repository: Option<String>,
    #[arg(long)]
    project: Option<String>,
    #[arg(long, default_value = "forced with kiln force")]
    reason: String,
    /// A build property, NAME=VALUE (repeatable; VALUE is JSON if it parses as JSON).
    #[arg(long = "property", short = 'p', value_name = "NAME=VALUE")]
    properties: Vec<String>,
    /// USER:PASSWORD for a master with www.users.
    #[arg(long)]
    auth: Option<String>,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Quickstart { dir, mozilla, .. } => {
            let dir = quickstart_dir(dir.clone(), *mozilla);
            if let Err(e) = std::fs::create_dir_all(&dir)
                .map_err(anyhow::Error::from)
                .and_then(|()| init_master_logging(&dir))
            {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        }
        Command::Start { dir, .. } => {
            if let Err(e) = init_master_logging(dir) {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        }
        Command::Poll { .. } | Command::Worker { .. } => init_logging("info"),
        _ => init_logging("warn,kiln::script=info"),
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn log_filter(default: &str) -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default))
}

fn init_logging(default: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(log_filter(default))
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .try_init();
}

/// A running master logs with timestamps to stderr and to DIR/kiln.log.
fn init_master_logging(dir: &Path) -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let path = dir.join(crate::master::LOG_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open the log {}", path.display()))?;
    tracing_subscriber::registry()
        .with(log_filter("info"))
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(color())
                .with_target(false),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::sync::Mutex::new(file))
                .with_ansi(false)
                .with_target(false),
        )
        .try_init()
        .context("cannot set up logging")
}

fn color() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

fn report(diags: &[Diagnostic], sources: &crate::diagnostics::Sources) {
    if !diags.is_empty() {
        eprint!("{}", render(diags, sources, color()));
    }
}

fn load(dir: &Path, limits: Limits) -> Result<Loaded, ExitCode> {
    match load_master(dir, limits) {
        Ok(l) => {
            report(&l.warnings, &l.sources);
            Ok(l)
        }
        Err(LoadFailure {
            diagnostics,
            sources,
            ..
        }) => {
            report(&diagnostics, &sources);
            let n = diagnostics.iter().filter(|d| d.is_error()).count();
            eprintln!(
                "config is not valid in {}: {n} error{}",
                display_pathbuf(dir),
                if n == 1 { "" } else { "s" }
            );
            Err(ExitCode::FAILURE)
        }
    }
}

/// The default limits, with `--max-operations` when given.
fn limits_with(max_operations: Option<u64>) -> Limits {
    let mut limits = Limits::default();
    if let Some(n) = max_operations {
        limits.max_operations = n;
    }
    limits
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Quickstart {
            dir,
            mozilla,
            http_port,
            worker_port,
        } => {
            let dir = quickstart_dir(dir, mozilla);
            if mozilla {
                let prepared = crate::quickstart::mozilla::prepare(&dir, http_port, worker_port)?;
                crate::quickstart::mozilla::run(&dir, &prepared)?;
            } else {
                let password = crate::quickstart::prepare(&dir, http_port, worker_port)?;
                crate::quickstart::run(&dir, &password)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::CreateMaster { dir, repo } => {
            crate::scaffold::create_master(&dir, &repo)?;
            println!(
                "created a master in {}; check it with `kiln checkconfig {}`",
                dir.display(),
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Checkconfig {
            dir,
            max_operations,
        } => {
            let limits = limits_with(max_operations);
            let loaded = match load(&dir, limits) {
                Ok(l) => l,
                Err(code) => return Ok(code),
            };
            let c = &loaded.config;
            println!(
                "config is valid: {} builders, {} schedulers, {} change sources, {} workers ({} files read)",
                c.builders.len(),
                c.schedulers.len(),
                c.change_source.len(),
                c.workers.len(),
                loaded.files.len()
            );
            // The process ends now: freeing a large config piece by piece
            // would only make the command slower.
            std::mem::forget(loaded);
            Ok(ExitCode::SUCCESS)
        }
        Command::Cleanupdb { dir, log_horizon } => {
            let loaded = match load(&dir, Limits::default()) {
                Ok(l) => l,
                Err(code) => return Ok(code),
            };
            let c = crate::master::janitor::cleanupdb(&dir, &loaded.config, log_horizon)?;
            let mb = |b: u64| b as f64 / 1e6;
            match c.log_horizon {
                Some(h) => println!(
                    "deleted the logs of builds that ended over {h} s ago: {} logs, {} chunks, {:.1} MB stored, in transactions of at most {} ms",
                    c.swept.pruned.logs,
                    c.swept.pruned.chunks,
                    mb(c.swept.pruned.bytes),
                    c.swept.longest.as_millis()
                ),
                None => println!("kept every log (no JanitorConfigurator logHorizon, no --log-horizon)"),
            }
            println!(
                "compressed {} chunks with {}: {:.1} MB to {:.1} MB",
                c.recompressed.chunks,
                loaded.config.log_compression.name(),
                mb(c.recompressed.bytes_before),
                mb(c.recompressed.bytes_after)
            );
            println!(
                "the database took {:.1} MB and takes {:.1} MB: {:.1} MB freed",
                mb(c.size_before),
                mb(c.size_after),
                mb(c.size_before.saturating_sub(c.size_after))
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::PrintConfig { dir, json } => {
            let loaded = match load(&dir, Limits::default()) {
                Ok(l) => l,
                Err(code) => return Ok(code),
            };
            let out = if json {
                crate::config::print::to_json(&loaded.config)?
            } else {
                crate::config::print::to_text(&loaded.config)?
            };
            println!("{out}");
            std::mem::forget(loaded); // as in checkconfig
            Ok(ExitCode::SUCCESS)
        }
        Command::Start {
            dir,
            no_watch,
            reload_quiet_ms,
            max_operations,
        } => {
            let limits = limits_with(max_operations);
            let loaded_at = std::time::SystemTime::now();
            let loaded = match load(&dir, limits.clone()) {
                Ok(l) => l,
                Err(code) => return Ok(code),
            };
            let options = crate::master::ReloadOptions {
                watch: !no_watch,
                quiet: std::time::Duration::from_millis(reload_quiet_ms),
                limits,
                loaded_at: Some(loaded_at),
            };
            crate::master::run(&dir, loaded, options)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Repl {
            dir,
            expr,
            master,
            max_operations,
        } => {
            let limits = limits_with(max_operations);
            crate::repl::run(crate::repl::Options {
                dir,
                limits,
                expr,
                master,
            })
        }
        Command::Reconfig { dir, wait } => {
            // A PostgreSQL master's pid file names its database without the
            // password, which the config gives.
            let postgres = || {
                match load(&dir, Limits::default()) {
                Ok(loaded) => crate::master::db_target(&dir, &loaded.config.db),
                Err(_) => bail!(
                    "cannot read the config of {} for its database's password (the errors are above); \
                     fix them, or send SIGHUP to the master",
                    display_pathbuf(&dir)
                ),
            }
            };
            let r = crate::client::reconfig(&dir, std::time::Duration::from_secs(wait), postgres)?;
            if r.record.applied {
                println!(
                    "config reloaded in {:.1} ms\n{}",
                    r.record.duration_ms, r.record.diff
                );
                Ok(ExitCode::SUCCESS)
            } else {
                eprint!("{}", r.record.errors);
                if !r.record.errors.ends_with('\n') {
                    eprintln!();
                }
                eprintln!(
                    "the reload failed; the master in {} keeps running its previous config",
                    display_pathbuf(&dir)
                );
                Ok(ExitCode::FAILURE)
            }
        }
        Command::QueueRun {
            dir,
            once,
            max_retries,
            backoff,
            timeout,
        } => {
            let queue = crate::queuedir::QueueDir::open(&dir)?;
            let opts = crate::queuedir::RunOptions {
                max_retries: max_retries.max(1),
                backoff: std::time::Duration::from_secs(backoff),
                timeout: std::time::Duration::from_secs(timeout),
                ..Default::default()
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (ok, failed, dead) = rt.block_on(async {
                let cancel = tokio_util::sync::CancellationToken::new();
                let stop = cancel.clone();
                tokio::spawn(async move {
                    let _ = tokio::signal::ctrl_c().await;
                    stop.cancel();
                });
                crate::queuedir::run(&queue, &opts, once, &cancel).await
            })?;
            println!(
                "{ok} item(s) ran, {failed} failed attempt(s), {dead} moved to dead/; {} waiting",
                queue.waiting()?.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Stop { dir, wait } => {
            crate::client::stop(&dir, std::time::Duration::from_secs(wait))?;
            println!("master in {} stopped", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Poll { dir } => {
            let loaded = match load(&dir, Limits::default()) {
                Ok(l) => l,
                Err(code) => return Ok(code),
            };
            let failed = crate::master::poll_once(&dir, &loaded.config)?;
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Bench {
            scenario:
                BenchScenario::WorkerFleet {
                    dir,
                    master,
                    count,
                    prefix,
                    password,
                },
        } => {
            kiln_worker::fleet(&dir, &master, &prefix, count, &password)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            scenario:
                BenchScenario::Schedulers {
                    changes,
                    schedulers,
                    builders,
                },
        } => {
            crate::bench::schedulers(changes, schedulers, builders)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker { command } => {
            kiln_worker::run_command(command, "kiln worker")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Force(args) => {
            let a = *args;
            let client = crate::client::Client::new(&a.master, a.auth.as_deref())?;
            let (bsid, brids) = client.force(crate::client::Force {
                builder: &a.builder,
                scheduler: a.scheduler.as_deref(),
                branch: a.branch.as_deref(),
                revision: a.revision.as_deref(),
                repository: a.repository.as_deref(),
                project: a.project.as_deref(),
                reason: &a.reason,
                properties: parse_properties(&a.properties)?,
            })?;
            println!("buildset {bsid}: build requests {brids}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Sendchange(args) => {
            let SendchangeArgs {
                master,
                author,
                branch,
                revision,
                comments,
                repository,
                project,
                category,
                revlink,
                codebase,
                when,
                properties,
                files,
            } = *args;
            let mut form: Vec<(&str, String)> = vec![("author", author)];
            let optional = [
                ("branch", branch),
                ("revision", revision),
                ("comments", comments),
                ("repository", repository),
                ("project", project),
                ("category", category),
                ("revlink", revlink),
                ("codebase", codebase),
                ("when_timestamp", when.map(|w| w.to_string())),
            ];
            form.extend(optional.into_iter().filter_map(|(k, v)| Some((k, v?))));
            form.push(("files", serde_json::to_string(&files)?));
            let props = parse_properties(&properties)?;
            form.push(("properties", serde_json::Value::Object(props).to_string()));
            let ids = crate::client::Client::new(&master, None)?.sendchange(&form)?;
            println!("change sent: {ids}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn parse_properties(list: &[String]) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let mut props = serde_json::Map::new();
    for p in list {
        let Some((name, value)) = p.split_once('=') else {
            bail!("--property {p:?} must be NAME=VALUE");
        };
        let value = serde_json::from_str(value)
            .unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
        props.insert(name.to_string(), value);
    }
    Ok(props)
}

/// The quickstart's directory: the one given, or its default.
fn quickstart_dir(dir: Option<PathBuf>, mozilla: bool) -> PathBuf {
    dir.unwrap_or_else(|| {
        PathBuf::from(if mozilla {
            "kiln-mozilla"
        } else {
            "kiln-quickstart"
        })
    })
}
