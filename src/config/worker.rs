//! Workers as the config declares them: the ones that connect by
//! themselves, and latent ones the master starts and stops.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Origin, PropertyMap, Secret};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Worker {
    pub name: String,
    pub password: Secret,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_builds: Option<u32>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: PropertyMap,
    /// Seconds between keepalives (Buildbot's `keepalive_interval`).
    pub keepalive_interval: u64,
    /// Seconds a worker may be gone before it is reported missing; for a
    /// latent worker, how long a started one may take to connect.
    pub missing_timeout: u64,
    /// Started by the master when requests wait for it, stopped when idle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latent: Option<Box<Latent>>,
    #[serde(skip)]
    pub origin: Option<Origin>,
}

/// How a latent worker is started and stopped (Buildbot's latent workers).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Latent {
    pub kind: LatentKind,
    /// Seconds without a build before the worker is stopped: 0 stops it
    /// after each build, -1 never (Buildbot's default 600).
    pub build_wait_timeout: i64,
}

impl Latent {
    /// Buildbot's default `build_wait_timeout`.
    pub const BUILD_WAIT_TIMEOUT: i64 = 600;
    /// Buildbot's default `missing_timeout` for latent workers.
    pub const MISSING_TIMEOUT: u64 = 1200;
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum LatentKind {
    /// kiln's own worker as a child process of the master, in `basedir`
    /// (relative to the master dir; `latent/NAME` by default).
    Local { basedir: String },
    /// The user's commands start and stop an instance; they see the
    /// worker's name, password and the master's worker address in their
    /// environment.
    Command {
        start: Vec<String>,
        stop: Vec<String>,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        env: BTreeMap<String, String>,
    },
}
