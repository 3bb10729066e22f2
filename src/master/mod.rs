//! The running master: `kiln start` and what it is made of.
//!
//! - `serve`: the wiring. Start loads the config, takes the pid file,
//!   opens the store, binds the HTTP and worker ports and starts every
//!   change source, scheduler, the distributor and the status queues,
//!   then runs the reload loop until SIGTERM or SIGINT. Stopping cancels
//!   them (a poll in flight either finishes its store transaction or
//!   never starts it), lets the HTTP server finish its requests, and
//!   removes the pid file.
//! - `reload`: the loader thread, the debounce, and a reload's
//!   all-or-nothing apply.
//! - `watch`: the file watcher on the config's directories.
//! - `pidfile`: which process is the master of a dir.
//!
//! Commands that talk to a running master (`kiln stop`, `kiln reconfig`,
//! `kiln force`, ...) are in `crate::client`.

pub mod janitor;
mod pidfile;
mod reload;
mod serve;
mod watch;

use std::path::Path;
use std::time::Instant;

use anyhow::Context;

use crate::changes;
use crate::config::DbConfig;
use crate::config::MasterConfig;
use crate::store::{Store, Target};

pub use pidfile::PidInfo;
pub use pidfile::PID_FILE;
pub use reload::ReloadOptions;
pub use serve::run;

/// The master's log, in the master dir (also written to stderr).
pub const LOG_FILE: &str = "kiln.log";

/// Where `db` puts the database (see [`Target::parse`]).
pub fn db_target(dir: &Path, db: &DbConfig) -> anyhow::Result<Target> {
    Target::parse(
        dir,
        &db.db_url,
        db.password.as_ref().map(|p| p.expose().to_string()),
    )
}

/// `kiln poll`: every change source polled once, at the same time. Returns
/// how many failed (each is logged).
pub fn poll_once(dir: &Path, config: &MasterConfig) -> anyhow::Result<usize> {
    let target = db_target(dir, &config.db)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let store = Store::connect(&target).await?;
        let ctx = changes::Context::new(store, dir)?;
        let started = Instant::now();
        let tasks: Vec<_> = config
            .change_source
            .iter()
            .map(|s| {
                let mut poller = changes::Poller::new(s);
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let r = poller.poll(&ctx).await;
                    (poller.name(), r)
                })
            })
            .collect();
        let (mut changes, mut failed) = (0, 0);
        for t in tasks {
            match t.await {
                Ok((_, Ok(n))) => changes += n,
                Ok((name, Err(e))) => {
                    failed += 1;
                    tracing::error!(poller = %name, "poll failed: {e:#}");
                }
                Err(e) => {
                    failed += 1;
                    tracing::error!("poll task failed: {e}");
                }
            }
        }
        println!(
            "polled {} change source(s) in {:.3} s: {changes} new change(s), {failed} failed",
            config.change_source.len(),
            started.elapsed().as_secs_f64()
        );
        Ok(failed)
    })
}
