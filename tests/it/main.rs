//! kiln's integration tests, one binary: each module is one concern, all
//! against real processes (kiln masters and workers, hg, git, SQLite,
//! buildbot-worker, Chromium). `common` is the shared harness.

#[allow(dead_code)]
mod common;

mod api;
mod architecture;
mod auth;
mod change_sources;
mod config_host;
mod database;
mod fleet;
mod latent;
mod postgres;
mod pushlog;
mod queue;
mod quickstart;
mod reconfig;
mod repl;
mod retention;
mod schedulers;
mod script_errors;
mod seed_build;
mod seed_fleet;
mod soak;
mod store_faults;
mod tls;
mod web;
mod workers;
