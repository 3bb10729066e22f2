//! The `kiln` command line (DESIGN.md §2).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use crate::config::MasterConfig;
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

#[derive(Subcommand)]
enum Command {
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
    /// Print the evaluated config (secrets as <secret>).
    PrintConfig {
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Print JSON instead of the readable form.
        #[arg(long)]
        json: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,kiln::script=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .try_init();
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

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::CreateMaster { dir, repo } => {
            create_master(&dir, &repo)?;
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
            let mut limits = Limits::default();
            if let Some(n) = max_operations {
                limits.max_operations = n;
            }
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
        Command::PrintConfig { dir, json } => {
            let loaded = match load(&dir, Limits::default()) {
                Ok(l) => l,
                Err(code) => return Ok(code),
            };
            let out = if json {
                to_json(&loaded.config)?
            } else {
                to_text(&loaded.config)?
            };
            println!("{out}");
            std::mem::forget(loaded); // as in checkconfig
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn to_json(c: &MasterConfig) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(c)?)
}

/// The config as indented `key: value` text, in the same order as the JSON.
pub fn to_text(c: &MasterConfig) -> anyhow::Result<String> {
    let v = serde_json::to_value(c)?;
    let mut out = String::new();
    text_value(&v, 0, &mut out);
    Ok(out.trim_end().to_string())
}

fn scalar(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::Object(m) if m.is_empty() => Some("{}".into()),
        serde_json::Value::Array(a) if a.is_empty() => Some("[]".into()),
        serde_json::Value::Array(a) if a.iter().all(|x| !x.is_object() && !x.is_array()) => Some(
            serde_json::to_string(v)
                .unwrap_or_default()
                .replace("\",\"", "\", \""),
        ),
        serde_json::Value::Object(_) | serde_json::Value::Array(_) => None,
        other => Some(other.to_string()),
    }
}

fn text_value(v: &serde_json::Value, indent: usize, out: &mut String) {
    let pad = "  ".repeat(indent);
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match scalar(x) {
                    Some(s) => out.push_str(&format!("{pad}{k}: {s}\n")),
                    None => {
                        out.push_str(&format!("{pad}{k}:\n"));
                        text_value(x, indent + 1, out);
                    }
                }
            }
        }
        serde_json::Value::Array(a) => {
            for x in a {
                match scalar(x) {
                    Some(s) => out.push_str(&format!("{pad}- {s}\n")),
                    None => {
                        let mut inner = String::new();
                        text_value(x, indent + 1, &mut inner);
                        let inner = inner.trim_start();
                        out.push_str(&format!("{pad}- {inner}"));
                    }
                }
            }
        }
        other => out.push_str(&format!("{pad}{other}\n")),
    }
}

const QUICKSTART: &str = include_str!("../examples/quickstart/master.rhai");

fn create_master(dir: &Path, repo: &str) -> anyhow::Result<()> {
    let entry = dir.join(crate::script::ENTRY_SCRIPT);
    if entry.exists() {
        bail!("{} already exists; not overwriting it", entry.display());
    }
    std::fs::create_dir_all(dir.join("secrets"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let script = QUICKSTART.replace("let repo = \"repo\";", &format!("let repo = {repo:?};"));
    std::fs::write(&entry, script).with_context(|| format!("writing {}", entry.display()))?;
    let secret = dir.join("secrets").join("worker-password");
    std::fs::write(&secret, format!("{}\n", random_token()))
        .with_context(|| format!("writing {}", secret.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// 128 bits from the OS-seeded hasher keys: enough for a local worker password.
fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut s = String::new();
    for i in 0..2u8 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u8(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        s.push_str(&format!("{:016x}", h.finish()));
    }
    s
}
