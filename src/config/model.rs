//! The typed master configuration: plain data, built by the Rhai host and
//! consumed by every runtime component.
//!
//! Nothing here knows about Rhai evaluation. Values that scripts construct
//! (pollers, schedulers, builders, steps) are these same types, registered
//! with the engine as custom types, so what a script builds is exactly what
//! the master runs. Callbacks keep their Rhai function pointer, opaque to
//! everything but the callback runner.
//!
//! One file on purpose: it is the whole shape of a config, read top to
//! bottom like the BuildmasterConfig it mirrors, and every type in it is
//! plain data with no logic to split along.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Serialize, Serializer};

use super::worker::Worker;

pub use crate::diagnostics::Origin;

/// A JSON-like property value (Buildbot properties are JSON-serialisable).
pub type Value = serde_json::Value;
pub type PropertyMap = BTreeMap<String, Value>;

/// A secret value read through `secret(name)`. It never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    /// The name it was looked up by; `None` for a literal password in a script.
    pub name: Option<String>,
    value: Arc<str>,
}

impl Secret {
    pub fn named(name: impl Into<String>, value: impl Into<Arc<str>>) -> Self {
        Secret {
            name: Some(name.into()),
            value: value.into(),
        }
    }
    pub fn literal(value: impl Into<Arc<str>>) -> Self {
        Secret {
            name: None,
            value: value.into(),
        }
    }
    /// The secret itself, for the one place that needs it (e.g. checking a
    /// worker's password). Never log or serialise the result.
    pub fn expose(&self) -> &str {
        &self.value
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<secret>")
    }
}

/// A Rhai callback (closure or function pointer) stored in the config.
///
/// Equality compares where it was written and what it names, which is what a
/// config diff needs: the same source text in the same place is the same
/// callback.
#[derive(Clone)]
pub struct Callback {
    pub fn_ptr: rhai::FnPtr,
    pub origin: Option<Origin>,
}

impl Callback {
    pub fn describe(&self) -> String {
        let what = if self.fn_ptr.is_anonymous() {
            "closure".to_string()
        } else {
            format!("fn {}", self.fn_ptr.fn_name())
        };
        match &self.origin {
            Some(o) => format!(
                "<{what} at {}:{}:{}>",
                crate::diagnostics::display_path(&o.file),
                o.line,
                o.column
            ),
            None => format!("<{what}>"),
        }
    }
}

impl PartialEq for Callback {
    fn eq(&self, other: &Self) -> bool {
        self.fn_ptr.fn_name() == other.fn_ptr.fn_name() && self.origin == other.origin
    }
}

impl fmt::Debug for Callback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Serialize for Callback {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.describe())
    }
}

/// `WithProperties("%(prop)s")` or `Interpolate("%(prop:name)s"[, kw])`,
/// rendered when a step starts.
#[derive(Clone, Debug, PartialEq)]
pub enum Renderable {
    WithProperties(String),
    /// The format and its keywords (`%(kw:name)s`).
    Interpolate(String, BTreeMap<String, String>),
}

impl Serialize for Renderable {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        match self {
            Renderable::WithProperties(t) => m.serialize_entry("WithProperties", t)?,
            Renderable::Interpolate(t, kw) => {
                m.serialize_entry("Interpolate", t)?;
                if !kw.is_empty() {
                    m.serialize_entry("kw", kw)?;
                }
            }
        }
        m.end()
    }
}

impl fmt::Display for Renderable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Renderable::WithProperties(s) => write!(f, "WithProperties({s:?})"),
            Renderable::Interpolate(s, kw) if kw.is_empty() => write!(f, "Interpolate({s:?})"),
            Renderable::Interpolate(s, kw) => {
                write!(f, "Interpolate({s:?}, #{{")?;
                for (i, (k, v)) in kw.iter().enumerate() {
                    write!(f, "{}{k}: {v:?}", if i == 0 { " " } else { ", " })?;
                }
                f.write_str(" })")
            }
        }
    }
}

/// A string that may need rendering against properties.
///
/// 16 bytes: a config holds one per command argument, often hundreds of
/// thousands. A literal shares its text with the script's string (Rhai's
/// reference-counted `ImmutableString`), so the `"--branch"` of every
/// builder is one allocation; the rare rendered and secret values are boxed.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Arg {
    Literal(rhai::ImmutableString),
    Render(Box<Renderable>),
    /// A secret passed to the worker (in `env`, say); prints as `<secret>`.
    Secret(Box<Secret>),
}

impl fmt::Display for Arg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arg::Literal(s) => write!(f, "{s:?}"),
            Arg::Render(r) => r.fmt(f),
            Arg::Secret(_) => f.write_str("<secret>"),
        }
    }
}

/// A step's command: one shell string, or an argv list.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum StepCommand {
    Shell(Arg),
    Argv(Vec<Arg>),
}

impl fmt::Display for StepCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepCommand::Shell(a) => a.fmt(f),
            StepCommand::Argv(v) => {
                f.write_str("[")?;
                for (i, a) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    a.fmt(f)?;
                }
                f.write_str("]")
            }
        }
    }
}

/// Buildbot's result codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Results {
    Success = 0,
    Warnings = 1,
    Failure = 2,
    Skipped = 3,
    Exception = 4,
    Retry = 5,
    Cancelled = 6,
}

impl Results {
    pub const ALL: [Results; 7] = [
        Results::Success,
        Results::Warnings,
        Results::Failure,
        Results::Skipped,
        Results::Exception,
        Results::Retry,
        Results::Cancelled,
    ];
    pub fn from_code(code: i64) -> Option<Results> {
        Results::ALL.iter().copied().find(|r| *r as i64 == code)
    }
    pub fn name(self) -> &'static str {
        match self {
            Results::Success => "SUCCESS",
            Results::Warnings => "WARNINGS",
            Results::Failure => "FAILURE",
            Results::Skipped => "SKIPPED",
            Results::Exception => "EXCEPTION",
            Results::Retry => "RETRY",
            Results::Cancelled => "CANCELLED",
        }
    }
    /// The name in lower case, as the web page and its API's states say it.
    pub fn word(self) -> &'static str {
        match self {
            Results::Success => "success",
            Results::Warnings => "warnings",
            Results::Failure => "failure",
            Results::Skipped => "skipped",
            Results::Exception => "exception",
            Results::Retry => "retry",
            Results::Cancelled => "cancelled",
        }
    }
}

/// How a step's outcome is judged from its exit code and log.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogEval {
    /// `rc_eval_func({0: SUCCESS, None: RETRY})`: exit codes mapped to
    /// results, with a default for any code not listed.
    RcMap {
        codes: BTreeMap<i64, Results>,
        default: Option<Results>,
    },
    /// A script callback `|step, rc, log| -> result`.
    Callback(Callback),
}

/// The kind-specific part of a step.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum StepKind {
    ShellCommand,
    /// Sets `property` from the command's output, or to a fixed `value`.
    SetProperty {
        property: rhai::ImmutableString,
        #[serde(skip_serializing_if = "Option::is_none")]
        value: Option<Arg>,
    },
    MercurialCloneCommand {
        /// Retry the clone with a fresh directory when it fails.
        retry: bool,
    },
    Git {
        repourl: Arg,
        branch: Option<Arg>,
        mode: rhai::ImmutableString,
    },
    MockCommand {
        #[serde(rename = "mock")]
        use_mock: bool,
        target: Option<rhai::ImmutableString>,
    },
    DisconnectStep {
        /// When the worker's going away is expected rather than a failure.
        force_disconnect: Disconnect,
    },
    Trigger {
        #[serde(rename = "schedulerNames")]
        scheduler_names: Vec<String>,
        #[serde(rename = "waitForFinish")]
        wait_for_finish: bool,
        set_properties: Box<PropertyMap>,
    },
    /// A file from the worker to the master (`masterdest`, relative to the
    /// master dir).
    FileUpload {
        workersrc: Arg,
        masterdest: rhai::ImmutableString,
        #[serde(flatten)]
        transfer: Box<TransferOptions>,
        keepstamp: bool,
    },
    /// A directory from the worker to the master, as a tarball unpacked
    /// into `masterdest`.
    DirectoryUpload {
        workersrc: Arg,
        masterdest: rhai::ImmutableString,
        #[serde(flatten)]
        transfer: Box<TransferOptions>,
        /// `()`, `"gz"` or `"bz2"`.
        compress: Option<rhai::ImmutableString>,
    },
    /// A file from the master (`mastersrc`, relative to the master dir) to
    /// the worker.
    FileDownload {
        mastersrc: rhai::ImmutableString,
        workerdest: Arg,
        #[serde(flatten)]
        transfer: Box<TransferOptions>,
    },
    /// A string to a file on the worker.
    StringDownload {
        s: Arg,
        workerdest: Arg,
        #[serde(flatten)]
        transfer: Box<TransferOptions>,
    },
    /// The build's properties and sourcestamp as JSON to a file on the
    /// worker (Buildbot 0.8's shape, which mozharness reads).
    #[serde(rename = "JSONPropertiesDownload")]
    JsonPropertiesDownload {
        workerdest: Arg,
        #[serde(flatten)]
        transfer: Box<TransferOptions>,
    },
}

/// What every file transfer step takes (Buildbot's defaults).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TransferOptions {
    /// Largest size in bytes; `None` for no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maxsize: Option<u64>,
    /// Bytes per message (16 KiB).
    pub blocksize: u64,
    /// Permission bits of the written file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

impl Default for TransferOptions {
    fn default() -> Self {
        TransferOptions {
            maxsize: None,
            blocksize: 16 * 1024,
            mode: None,
        }
    }
}

impl StepKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            StepKind::ShellCommand => "ShellCommand",
            StepKind::SetProperty { .. } => "SetProperty",
            StepKind::MercurialCloneCommand { .. } => "MercurialCloneCommand",
            StepKind::Git { .. } => "Git",
            StepKind::MockCommand { .. } => "MockCommand",
            StepKind::DisconnectStep { .. } => "DisconnectStep",
            StepKind::Trigger { .. } => "Trigger",
            StepKind::FileUpload { .. } => "FileUpload",
            StepKind::DirectoryUpload { .. } => "DirectoryUpload",
            StepKind::FileDownload { .. } => "FileDownload",
            StepKind::StringDownload { .. } => "StringDownload",
            StepKind::JsonPropertiesDownload { .. } => "JSONPropertiesDownload",
        }
    }
}

/// When a `DisconnectStep` expects its worker to go away.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Disconnect {
    /// Always (`true`) or never (`false`).
    Always(bool),
    /// When the command's output contains this text (Mozilla's
    /// "SCHEDULED REBOOT").
    OutputContains(rhai::ImmutableString),
    /// A script callback given the step's output.
    Callback(Box<Callback>),
}

/// One build step, with Buildbot's common parameters.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Step {
    pub name: rhai::ImmutableString,
    #[serde(flatten)]
    pub kind: StepKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<rhai::ImmutableString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<StepCommand>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workdir: Option<rhai::ImmutableString>,
    /// Shared: the seed's builders give their scripts one environment.
    #[serde(skip_serializing_if = "no_env")]
    pub env: Arc<BTreeMap<String, Arg>>,
    /// Seconds without output before the command is killed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u32>,
    /// Seconds in all before the command is killed.
    #[serde(rename = "maxTime", skip_serializing_if = "Option::is_none")]
    pub max_time: Option<u32>,
    #[serde(rename = "haltOnFailure")]
    pub halt_on_failure: bool,
    #[serde(rename = "flunkOnFailure")]
    pub flunk_on_failure: bool,
    #[serde(rename = "flunkOnWarnings")]
    pub flunk_on_warnings: bool,
    #[serde(rename = "warnOnFailure")]
    pub warn_on_failure: bool,
    #[serde(rename = "warnOnWarnings")]
    pub warn_on_warnings: bool,
    #[serde(rename = "alwaysRun")]
    pub always_run: bool,
    /// Boxed, as `log_eval`: few steps have one, and a config holds
    /// tens of thousands of steps.
    #[serde(rename = "doStepIf", skip_serializing_if = "Option::is_none")]
    pub do_step_if: Option<Box<BoolOrCallback>>,
    /// Shared, as `env`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_eval: Option<Arc<LogEval>>,
    /// Regular expressions over the command's output, each with the result
    /// a match makes the step at least (Mozilla's known-failure lists).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub log_rules: Vec<LogRule>,
    #[serde(skip)]
    pub origin: Option<Origin>,
}

fn no_env(env: &Arc<BTreeMap<String, Arg>>) -> bool {
    env.is_empty()
}

/// `[pattern, result]` in a step's `log_rules`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LogRule {
    pub pattern: String,
    pub result: Results,
}

/// An ordered list of steps.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct BuildFactory {
    /// Shared, so that copying a factory (as Rhai does whenever a script
    /// reads a variable holding one) costs a reference count; each step
    /// too, so that factories made alike (the seed's ScriptFactory per
    /// branch and platform) hold one copy of the steps they have in common.
    /// A slice, not a `Vec`: one allocation a factory, of its exact size.
    pub steps: Arc<[Arc<Step>]>,
    #[serde(skip)]
    pub origin: Option<Origin>,
}

/// A named lock and the access a builder asks of it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LockAccess {
    pub name: String,
    /// `master` (one count across the master) or `worker` (per worker).
    pub scope: LockScope,
    #[serde(rename = "maxCount")]
    pub max_count: u32,
    /// `exclusive` or `counting`.
    pub mode: LockMode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LockScope {
    Master,
    Worker,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    Counting,
    Exclusive,
}

/// A switch that may also be a callback: `collapseRequests`, `doStepIf`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum BoolOrCallback {
    Enabled(bool),
    /// Boxed: a callback is ten times the size of the common `bool`.
    Callback(Box<Callback>),
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BuilderConfig {
    /// Shared with the schedulers that name it (the seed's Scheduler per
    /// branch lists its builders).
    pub name: rhai::ImmutableString,
    /// Shared with the `builddir` property where a builder has one.
    pub builddir: rhai::ImmutableString,
    #[serde(rename = "workerbuilddir")]
    pub worker_builddir: rhai::ImmutableString,
    #[serde(rename = "workernames")]
    /// Shared by builders with the same pool (see `LoadState::share_workers`).
    pub worker_names: Arc<[rhai::ImmutableString]>,
    #[serde(rename = "nextWorker", skip_serializing_if = "Option::is_none")]
    pub next_worker: Option<Box<Callback>>,
    #[serde(rename = "canStartBuild", skip_serializing_if = "Option::is_none")]
    pub can_start_build: Option<Box<Callback>>,
    pub factory: BuildFactory,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<rhai::ImmutableString>,
    /// Shared by builders with the same tags (`LoadState::share_tags`).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub tags: Arc<[rhai::ImmutableString]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<rhai::ImmutableString>,
    #[serde(skip_serializing_if = "super::BuilderProperties::is_empty")]
    pub properties: super::BuilderProperties,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, Arg>,
    #[serde(rename = "collapseRequests", skip_serializing_if = "Option::is_none")]
    pub collapse_requests: Option<BoolOrCallback>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub locks: Vec<LockAccess>,
    #[serde(skip)]
    pub origin: Option<Origin>,
}

/// Mozilla's HgPoller: polls a repository's pushes (see docs/design.md, "Change sources").
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HgPoller {
    #[serde(rename = "hgURL")]
    pub hg_url: String,
    pub branch: String,
    #[serde(rename = "pushlogUrlOverride", skip_serializing_if = "Option::is_none")]
    pub pushlog_url_override: Option<String>,
    #[serde(rename = "tipsOnly")]
    pub tips_only: bool,
    #[serde(rename = "maxChanges")]
    pub max_changes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repo_branch: Option<String>,
    #[serde(rename = "pollInterval")]
    pub poll_interval: u64,
    #[serde(rename = "storeRev", skip_serializing_if = "Option::is_none")]
    pub store_rev: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(skip)]
    pub origin: Option<Origin>,
}

impl HgPoller {
    /// The repository this poller reads: `hgURL` joined with `branch`.
    pub fn repository(&self) -> String {
        join_url(&self.hg_url, &self.branch)
    }
}

/// Joins a base URL or directory with a repository path, with one `/`.
pub fn join_url(base: &str, path: &str) -> String {
    if path.is_empty() {
        return base.to_string();
    }
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GitPoller {
    pub repourl: String,
    /// Branches to follow; empty means the default branch only.
    pub branches: Vec<String>,
    #[serde(rename = "pollInterval")]
    pub poll_interval: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    pub only_tags: bool,
    #[serde(skip)]
    pub origin: Option<Origin>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum ChangeSource {
    HgPoller(HgPoller),
    GitPoller(GitPoller),
}

impl ChangeSource {
    pub fn origin(&self) -> Option<&Origin> {
        match self {
            ChangeSource::HgPoller(p) => p.origin.as_ref(),
            ChangeSource::GitPoller(p) => p.origin.as_ref(),
        }
    }
    /// (repository, branch) pairs this source polls, for duplicate checks.
    pub fn polled(&self) -> Vec<(String, String)> {
        match self {
            ChangeSource::HgPoller(p) => {
                vec![(
                    p.repository(),
                    p.repo_branch.clone().unwrap_or_else(|| "*".into()),
                )]
            }
            ChangeSource::GitPoller(p) => {
                if p.branches.is_empty() {
                    vec![(p.repourl.clone(), "<default>".into())]
                } else {
                    p.branches
                        .iter()
                        .map(|b| (p.repourl.clone(), b.clone()))
                        .collect()
                }
            }
        }
    }
    /// A stable name for logs and the API.
    pub fn name(&self) -> String {
        match self {
            ChangeSource::HgPoller(p) => format!("HgPoller:{}", p.repository()),
            ChangeSource::GitPoller(p) => format!("GitPoller:{}", p.repourl),
        }
    }
}

/// One cron field of a `Nightly`: `*` or a list of values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum CronField {
    Any(AnyMarker),
    Values(Vec<u32>),
}

/// Serialises as `"*"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnyMarker;

impl Serialize for AnyMarker {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("*")
    }
}

/// Cron's five fields: when a `Nightly` builds and when the janitor
/// sweeps (`schedulers::cron` finds the next time they match).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Cron {
    pub minute: CronField,
    pub hour: CronField,
    #[serde(rename = "dayOfMonth")]
    pub day_of_month: CronField,
    pub month: CronField,
    #[serde(rename = "dayOfWeek")]
    pub day_of_week: CronField,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum SchedulerKind {
    /// Buildbot's single-branch scheduler.
    Scheduler {
        branch: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        repository: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        project: Option<String>,
        #[serde(rename = "treeStableTimer")]
        tree_stable_timer: Option<u64>,
        #[serde(rename = "fileIsImportant")]
        file_is_important: Option<Callback>,
        #[serde(rename = "onlyImportant")]
        only_important: bool,
    },
    AnyBranchScheduler {
        /// `None` accepts every branch.
        branches: Option<Vec<String>>,
        #[serde(rename = "treeStableTimer")]
        tree_stable_timer: Option<u64>,
        #[serde(rename = "fileIsImportant")]
        file_is_important: Option<Callback>,
        #[serde(rename = "onlyImportant")]
        only_important: bool,
    },
    Nightly {
        branch: Option<String>,
        #[serde(flatten)]
        when: Cron,
        #[serde(rename = "onlyIfChanged")]
        only_if_changed: bool,
    },
    Periodic {
        #[serde(rename = "periodicBuildTimer")]
        periodic_build_timer: u64,
    },
    Triggerable,
    Dependent {
        upstream: String,
    },
    ForceScheduler {
        #[serde(rename = "buttonName")]
        button_name: String,
        label: String,
    },
}

impl SchedulerKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            SchedulerKind::Scheduler { .. } => "Scheduler",
            SchedulerKind::AnyBranchScheduler { .. } => "AnyBranchScheduler",
            SchedulerKind::Nightly { .. } => "Nightly",
            SchedulerKind::Periodic { .. } => "Periodic",
            SchedulerKind::Triggerable => "Triggerable",
            SchedulerKind::Dependent { .. } => "Dependent",
            SchedulerKind::ForceScheduler { .. } => "ForceScheduler",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SchedulerConfig {
    pub name: String,
    #[serde(flatten)]
    pub kind: SchedulerKind,
    #[serde(rename = "builderNames")]
    pub builder_names: Vec<rhai::ImmutableString>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: PropertyMap,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    #[serde(skip)]
    pub origin: Option<Origin>,
}

/// `QueueDir(name, path)`: a directory queue of commands for a status
/// handler, as Mozilla's postrun used.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QueueDirConfig {
    pub name: String,
    pub path: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum StatusTarget {
    QueuedCommandHandler {
        command: Vec<Arg>,
        queuedir: QueueDirConfig,
        #[serde(skip)]
        origin: Option<Origin>,
    },
}

/// Buildbot's `db` key: where the master keeps its state.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DbConfig {
    /// `sqlite:///state.sqlite` (relative to the master dir),
    /// `sqlite:////absolute/path`, or
    /// `postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME`; shown without
    /// its password.
    #[serde(serialize_with = "redacted_url")]
    pub db_url: String,
    /// The PostgreSQL password, when it is not in the URL (a `secret(...)`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
}

impl DbConfig {
    /// Whether it names a PostgreSQL database.
    pub fn is_postgres(&self) -> bool {
        self.db_url.starts_with("postgresql://") || self.db_url.starts_with("postgres://")
    }
}

fn redacted_url<S: Serializer>(url: &impl AsRef<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::diagnostics::redact_url(url.as_ref()))
}

/// Buildbot's `multiMaster`: several masters share the database. Each
/// heart-beats every `heartbeat` seconds; one silent for `dead_after`
/// seconds is declared dead by the others.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MultiMaster {
    pub heartbeat: u64,
    pub dead_after: u64,
}

impl Default for MultiMaster {
    fn default() -> Self {
        MultiMaster {
            heartbeat: 10,
            dead_after: 60,
        }
    }
}

/// The whole evaluated BuildmasterConfig.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MasterConfig {
    pub title: String,
    #[serde(rename = "titleURL")]
    pub title_url: String,
    #[serde(rename = "buildbotURL")]
    pub buildbot_url: String,
    pub db: DbConfig,
    pub protocols: super::ProtocolsConfig,
    pub www: Option<super::WwwConfig>,
    pub properties: PropertyMap,
    pub workers: Vec<Worker>,
    pub change_source: Vec<ChangeSource>,
    /// Shared with the script that made them, as builders are.
    pub schedulers: Vec<Arc<SchedulerConfig>>,
    /// Shared with the script's values that made them (a builder copied
    /// from list to list in a script is one builder in memory).
    pub builders: Vec<Arc<BuilderConfig>>,
    pub status: Vec<StatusTarget>,
    #[serde(rename = "prioritizeBuilders", skip_serializing_if = "Option::is_none")]
    pub prioritize_builders: Option<Callback>,
    #[serde(rename = "collapseRequests")]
    pub collapse_requests: BoolOrCallback,
    /// Bytes one step log keeps; the rest is dropped behind a marker.
    #[serde(rename = "logMaxSize")]
    pub log_max_size: u64,
    /// Several masters on one database (Buildbot's `multiMaster`).
    #[serde(rename = "multiMaster", skip_serializing_if = "Option::is_none")]
    pub multi_master: Option<MultiMaster>,
    /// This master's name in the database (Buildbot's `masterName`); by
    /// default `host:basedir`.
    #[serde(rename = "masterName", skip_serializing_if = "Option::is_none")]
    pub master_name: Option<String>,
    /// How many latent workers may be starting at once.
    #[serde(rename = "latentStartConcurrency")]
    pub latent_start_concurrency: u32,
    /// How log chunks are compressed in the store (Buildbot's
    /// `logCompressionMethod`).
    #[serde(rename = "logCompressionMethod")]
    pub log_compression: LogCompression,
    /// What the janitor deletes, and when (`configurators:
    /// [JanitorConfigurator(...)]`).
    #[serde(rename = "janitor", skip_serializing_if = "Option::is_none")]
    pub janitor: Option<Janitor>,
}

/// Buildbot's `JanitorConfigurator`: the logs of builds that ended more
/// than `log_horizon` seconds ago are deleted at the times its cron
/// fields match (by default daily at midnight, the master's local time).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Janitor {
    #[serde(rename = "logHorizon")]
    pub log_horizon: u64,
    #[serde(flatten)]
    pub when: Cron,
    #[serde(skip)]
    pub origin: Option<Origin>,
}

/// Buildbot's `logCompressionMethod` values; the number is the code a
/// chunk is stored with (Buildbot's `logchunks.compressed`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogCompression {
    Raw = 0,
    Gz = 1,
    Bz2 = 2,
    Lz4 = 3,
    #[default]
    Zstd = 4,
}

impl LogCompression {
    pub const ALL: [(&'static str, LogCompression); 5] = [
        ("raw", LogCompression::Raw),
        ("gz", LogCompression::Gz),
        ("bz2", LogCompression::Bz2),
        ("lz4", LogCompression::Lz4),
        ("zstd", LogCompression::Zstd),
    ];

    pub fn code(self) -> i64 {
        self as i64
    }

    /// Its name in `logCompressionMethod`.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, m)| *m == self)
            .map_or("raw", |(n, _)| n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 5000-builder config holds about 200,000 arguments: their size is
    /// most of what a config costs to hold (see BENCHMARKS.md).
    #[test]
    fn an_argument_is_two_words_and_literals_share_the_scripts_text() {
        assert!(std::mem::size_of::<Arg>() <= 16);
        let text = rhai::ImmutableString::from("--branch");
        let a = Arg::Literal(text.clone());
        let b = a.clone();
        match (&a, &b) {
            (Arg::Literal(x), Arg::Literal(y)) => {
                assert!(std::ptr::eq(x.as_str(), text.as_str()));
                assert!(std::ptr::eq(y.as_str(), text.as_str()));
            }
            _ => unreachable!(),
        }
    }

    /// One per step of every builder: 328 bytes before the rare kinds'
    /// payloads were boxed and the strings shared.
    #[test]
    fn a_step_stays_small() {
        assert!(std::mem::size_of::<StepKind>() <= 48);
        assert!(std::mem::size_of::<Step>() <= 208);
        assert!(std::mem::size_of::<Origin>() <= 24);
        // One per builder: 528 bytes before its callbacks were boxed.
        assert!(std::mem::size_of::<BuilderConfig>() <= 296);
    }
}
