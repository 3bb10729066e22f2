//! `kiln-worker`: kiln's worker on its own, for build machines.

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "kiln-worker",
    version,
    about = "kiln's worker: runs a build master's commands on this machine"
)]
struct Cli {
    #[command(subcommand)]
    command: kiln_worker::Command,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .try_init();
    match kiln_worker::run_command(cli.command, "kiln-worker") {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
