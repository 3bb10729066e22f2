//! The web port's config: its users, who may do what (`authz`), and the
//! writes that `authz` names.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Secret;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WwwUser {
    pub password: Secret,
    pub roles: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WwwConfig {
    pub port: u16,
    pub host: String,
    /// TLS on the web port (an `ssl:` port string).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::TlsConfig>,
    /// Whether reads need no login (Buildbot's default: yes).
    pub public_read: bool,
    pub users: BTreeMap<String, WwwUser>,
    /// Which roles may do which write (`force`, `stop`, `cancel`,
    /// `reconfig`, `workers`, `change`); one it does not name is open to
    /// every user.
    pub authz: BTreeMap<String, Vec<String>>,
    pub change_hook_dialects: Vec<String>,
}

/// What a write does, as `www.authz` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WwwAction {
    Force,
    Stop,
    Cancel,
    /// A new request for a finished build's builder, sources and properties.
    Rebuild,
    Reconfig,
    /// Stopping or killing a worker.
    Workers,
    /// A change through a change hook.
    Change,
}

impl WwwAction {
    pub const ALL: &'static [(&'static str, WwwAction)] = &[
        ("force", WwwAction::Force),
        ("stop", WwwAction::Stop),
        ("cancel", WwwAction::Cancel),
        ("rebuild", WwwAction::Rebuild),
        ("reconfig", WwwAction::Reconfig),
        ("workers", WwwAction::Workers),
        ("change", WwwAction::Change),
    ];

    pub fn name(self) -> &'static str {
        WwwAction::ALL
            .iter()
            .find(|(_, a)| *a == self)
            .map_or("?", |(n, _)| n)
    }
}
