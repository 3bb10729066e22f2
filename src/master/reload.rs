//! Reload: the scripts loaded again on the reload thread, diffed against
//! the running config, and only the difference applied; a failure at any
//! point leaves the running config as it was. Every attempt is stored.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::serve::{bind_http, bind_workers, builder_rows, Listening, Live};
use crate::config::diff::ConfigDiff;
use crate::script::{Limits, Loaded};
use crate::store::reloads::NewReload;

/// How the master follows its scripts.
#[derive(Clone, Debug)]
pub struct ReloadOptions {
    /// Watch the files the config was read from.
    pub watch: bool,
    /// A burst of saves ends when no file changed for this long.
    pub quiet: Duration,
    /// The limits every load of the scripts runs under.
    pub limits: Limits,
    /// When the first load began: a file changed since then reloads.
    pub loaded_at: Option<std::time::SystemTime>,
}

impl Default for ReloadOptions {
    fn default() -> Self {
        ReloadOptions {
            watch: true,
            quiet: Duration::from_millis(300),
            limits: Limits::default(),
            loaded_at: None,
        }
    }
}

/// The longest a burst of saves can put a reload off.
pub(super) const MAX_DEBOUNCE: Duration = Duration::from_secs(5);

impl Live {
    /// Loads the scripts again and applies what changed; a failure at any
    /// point leaves the running config as it was. Every attempt is stored.
    pub(super) async fn reload(&mut self, trigger: &str) -> crate::store::reloads::Reload {
        let started = Instant::now();
        let started_at = unix_now();
        tracing::info!("reloading the config ({trigger})");
        let loaded = self.loader.load(&self.dir, &self.limits).await;
        let load_ms = started.elapsed().as_secs_f64() * 1000.0;
        let mut record = NewReload {
            started_at,
            trigger: trigger.to_string(),
            ..Default::default()
        };
        match loaded {
            Err(e) => record.errors = e,
            Ok(Err(failure)) => {
                record.errors =
                    crate::diagnostics::render(&failure.diagnostics, &failure.sources, false);
                // Watch what the failed load read as well: fixing a module
                // it newly imports must reload.
                for f in &failure.files {
                    if !self.files.contains(f) {
                        self.files.push(f.clone());
                    }
                }
                record.files = paths(&failure.files);
            }
            Ok(Ok(loaded)) => {
                record.files = paths(&loaded.files);
                for w in &loaded.warnings {
                    tracing::warn!("{}", w.message);
                }
                match self.apply(loaded).await {
                    Ok(diff) => {
                        record.applied = true;
                        record.diff = diff;
                    }
                    Err(e) => record.errors = format!("{e:#}"),
                }
            }
        }
        record.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        *crate::sync::write(&self.app.watched) = paths(&self.files);
        if record.applied {
            tracing::info!(
                "config reloaded in {:.1} ms (scripts {load_ms:.1} ms) ({trigger}): {}",
                record.duration_ms,
                record.diff.replace('\n', "; ")
            );
        } else {
            tracing::error!(
                "reload failed ({trigger}); the running config is unchanged:\n{}",
                record.errors
            );
        }
        let row = crate::store::reloads::Reload {
            reloadid: 0,
            finished_at: Some(unix_now()),
            record: record.clone(),
        };
        match self.store.add_reload(record).await {
            Ok(id) => crate::store::reloads::Reload {
                reloadid: id,
                ..row
            },
            Err(e) => {
                tracing::error!("cannot store the reload: {e:#}");
                row
            }
        }
    }

    /// Applies a loaded config: everything that can fail (a database that
    /// would change, a port that cannot be bound) is checked before
    /// anything changes.
    pub(super) async fn apply(&mut self, loaded: Loaded) -> anyhow::Result<String> {
        let old = self.config.clone();
        let runtime = loaded.runtime();
        let new = Arc::new(loaded.config);
        if let Some(why) = ConfigDiff::needs_restart(&old, &new) {
            bail!("{why}");
        }
        let diff = ConfigDiff::between(&old, &new);

        // New sockets first: a port that cannot be bound, or a key that
        // cannot be read, refuses the reload.
        let http_moved = old.www.as_ref().map(|w| (&w.host, w.port, &w.tls))
            != new.www.as_ref().map(|w| (&w.host, w.port, &w.tls));
        let new_http = match (&new.www, http_moved) {
            (Some(www), true) => Some(bind_http(www, &self.dir).await.context(
                "the new HTTP address cannot be used; nothing of this reload was applied",
            )?),
            _ => None,
        };
        let (op, np) = (&old.protocols, &new.protocols);
        let workers_moved = (op.msgpack_port, &op.msgpack_interface, &op.msgpack_tls)
            != (np.msgpack_port, &np.msgpack_interface, &np.msgpack_tls);
        let new_workers = match (np.msgpack_port, workers_moved) {
            (Some(port), true) => Some(bind_workers(np, port, &self.dir).await.context(
                "the new worker port cannot be used; nothing of this reload was applied",
            )?),
            _ => None,
        };
        // A port that stays: its key and certificate are read again (a
        // renewed certificate), and served from the next connection on.
        let renewed_http = match (&new.www, http_moved) {
            (Some(crate::config::WwwConfig { tls: Some(tls), .. }), false) => Some(
                crate::net::load_tls(&self.dir, tls)
                    .context("the web port's TLS; nothing of this reload was applied")?,
            ),
            _ => None,
        };
        let renewed_workers = match (&np.msgpack_tls, workers_moved) {
            (Some(tls), false) => Some(
                crate::net::load_tls(&self.dir, tls)
                    .context("the worker port's TLS; nothing of this reload was applied")?,
            ),
            _ => None,
        };
        let listening = [
            (&self.http, renewed_http),
            (&self.worker_listener, renewed_workers),
        ];
        for (listener, renewed) in listening {
            if let (Some(Listening { tls: Some(tls), .. }), Some(acceptor)) = (listener, renewed) {
                tls.replace(acceptor);
            }
        }

        // Builds: the next ones use the new builders; new log chunks the
        // new compression.
        self.distributor.reload(new.clone(), runtime.clone());
        self.app
            .store
            .set_log_compression(new.log_compression.code());
        self.janitor.send_replace(new.janitor.clone());
        // Workers: new passwords for the next connections; a worker whose
        // password changed reconnects with the new one; a removed one is let
        // go once its builds end.
        self.worker_setup.replace(&new);
        for name in &diff.passwords {
            if let Some(conn) = self.registry.get(name) {
                tracing::info!(worker = %name, "its password changed: disconnecting it; it must reconnect with the new one");
                conn.closed.cancel();
            }
        }
        for name in &diff.workers.removed {
            if self.registry.get(name).is_some() {
                match self.distributor.shutdown_worker(name, true).await {
                    Ok(msg) => tracing::info!(worker = %name, "removed from the config: {msg}"),
                    Err(e) => tracing::warn!(worker = %name, "removed from the config: {e:#}"),
                }
            }
        }
        if let Err(e) = self
            .app
            .store
            .register_builders(self.master_id, builder_rows(&new))
            .await
        {
            tracing::warn!("cannot record the new builders: {e:#}");
        }
        if let Err(e) = self
            .app
            .store
            .workers_known(super::serve::latent_names(&new))
            .await
        {
            tracing::warn!("cannot record the new latent workers: {e:#}");
        }
        let running = super::serve::held_services(&new, self.held.as_ref());
        self.schedulers.reload(&running, runtime).await;
        self.pollers.reload(&running.change_source).await;
        self.wanted.send_replace(super::serve::leased_names(&new));
        *crate::sync::write(&self.app.access) = crate::http::auth::Access::of(new.www.as_ref());
        if http_moved {
            if let Some(old) = self.http.take() {
                old.stop.cancel();
                self.retired.push(old.task);
            }
            if let Some(listener) = new_http {
                self.http = Some(self.serve_http(listener)?);
            }
        }
        if workers_moved {
            if let Some(old) = self.worker_listener.take() {
                old.stop.cancel();
                self.retired.push(old.task);
            }
            if let Some(listener) = new_workers {
                let cert = np.msgpack_tls.as_ref().map(|t| t.cert.as_str());
                self.worker_listener = Some(self.serve_workers(listener, cert)?);
            }
        }

        let mut summary = diff.to_string();
        // A removed builder's requests stay in the store, unclaimed; a
        // builder of that name in a later config builds them.
        if !diff.builders.removed.is_empty() {
            let pending = self.store.unclaimed_requests(100_000).await?;
            for name in &diff.builders.removed {
                let n = pending.iter().filter(|r| &r.buildername == name).count();
                let running = self.distributor.running_of_builder(name);
                if n > 0 || running > 0 {
                    let line = format!(
                        "builder `{name}` was removed: {running} running build(s) finish, {n} pending request(s) stay in the store"
                    );
                    tracing::warn!("{line}");
                    summary.push('\n');
                    summary.push_str(&line);
                }
            }
        }
        self.config = new;
        self.run_queues();
        self.files = loaded.files;
        Ok(summary)
    }
}

pub(super) type LoadJob = (
    PathBuf,
    Limits,
    tokio::sync::oneshot::Sender<Result<Loaded, crate::script::LoadFailure>>,
);

/// The thread every reload evaluates the scripts on. Always the same
/// thread: the allocator gives each thread its own arena, and loads on
/// the blocking pool's changing threads left a config's worth of freed
/// memory in each (RSS grew by ~11 MB per reload of a 1000-builder
/// config until every arena had one).
pub(super) struct Loader {
    jobs: std::sync::mpsc::Sender<LoadJob>,
}

impl Loader {
    pub(super) fn start() -> anyhow::Result<Loader> {
        let (jobs, rx) = std::sync::mpsc::channel::<LoadJob>();
        std::thread::Builder::new()
            .name("kiln-reload".into())
            .spawn(move || {
                for (dir, limits, reply) in rx {
                    let _ = reply.send(crate::script::load_master(&dir, limits));
                }
            })
            .context("cannot start the reload thread")?;
        Ok(Loader { jobs })
    }

    pub(super) async fn load(
        &self,
        dir: &Path,
        limits: &Limits,
    ) -> Result<Result<Loaded, crate::script::LoadFailure>, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.jobs
            .send((dir.to_path_buf(), limits.clone(), reply))
            .map_err(|_| "the reload thread has stopped; restart the master".to_string())?;
        answer
            .await
            .map_err(|_| "the reload did not finish (the reload thread failed)".to_string())
    }
}

pub(super) fn paths(files: &[PathBuf]) -> Vec<String> {
    files.iter().map(|f| f.display().to_string()).collect()
}

pub(super) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
