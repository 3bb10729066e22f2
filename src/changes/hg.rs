//! `HgPoller`, after Mozilla's buildbotcustom poller.
//!
//! Two ways to read a repository's pushes:
//! - pushlog: `GET <repo>/json-pushes?full=1&version=2&fromchange=<last>`,
//!   for servers with Mozilla's pushlog extension (hg.mozilla.org);
//! - plain: `hg pull` into a mirror under `DIR/pollers/hg/` and `hg log`
//!   over what arrived, for a local path or any Mercurial server; each pull
//!   counts as one push.
//!
//! An HTTP repository starts in pushlog mode and falls back to plain mode
//! when the server has no pushlog (404); a local path is always plain.
//!
//! State (in the store, object `HgPoller:<repo>`): `lastChangeset` is the
//! newest changeset seen, or `""` after a first poll found the repository
//! empty (so that its first pushes are all reported).

use anyhow::{anyhow, bail, Context as _};
use serde_json::Value;

use super::pushlog::{self, Changeset, Push, Selection};
use super::{now, run_command, Context};
use crate::config::HgPoller;
use crate::store::ObjectId;

const STATE: &str = "lastChangeset";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Pushlog,
    Plain,
}

pub struct HgPollerTask {
    pub cfg: HgPoller,
    mode: Mode,
    object: Option<ObjectId>,
    /// The local source repository's changelog as of the last complete
    /// poll: while it is unchanged there is nothing to pull.
    source_seen: Option<Fingerprint>,
}

/// Sizes and modification times of a repository's changelog files, which
/// every new changeset (and every strip) changes.
type Fingerprint = Vec<(u64, Option<std::time::SystemTime>)>;

fn fingerprint(repo: &std::path::Path) -> Option<Fingerprint> {
    let store = repo.join(".hg").join("store");
    if !store.is_dir() {
        return None;
    }
    Some(
        ["00changelog.i", "00changelog.d", "00changelog.n"]
            .iter()
            .map(|f| match std::fs::metadata(store.join(f)) {
                Ok(m) => (m.len(), m.modified().ok()),
                Err(_) => (0, None),
            })
            .collect(),
    )
}

/// A pushlog answer that says the revision asked from is not known.
#[derive(Debug)]
struct UnknownRevision;

impl std::fmt::Display for UnknownRevision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("unknown revision")
    }
}
impl std::error::Error for UnknownRevision {}

/// The server has no pushlog.
#[derive(Debug)]
struct NoPushlog(String);

impl std::fmt::Display for NoPushlog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no pushlog at {}", self.0)
    }
}
impl std::error::Error for NoPushlog {}

fn is_http(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

impl HgPollerTask {
    pub fn new(cfg: HgPoller) -> Self {
        let mode = if cfg.pushlog_url_override.is_some() || is_http(&cfg.repository()) {
            Mode::Pushlog
        } else {
            Mode::Plain
        };
        HgPollerTask {
            cfg,
            mode,
            object: None,
            source_seen: None,
        }
    }

    pub fn name(&self) -> String {
        format!("HgPoller {}", self.cfg.repository())
    }

    fn source(&self) -> String {
        format!("HgPoller:{}", self.cfg.repository())
    }

    pub async fn poll(&mut self, ctx: &Context) -> anyhow::Result<usize> {
        let object = match self.object {
            Some(o) => o,
            None => {
                let o = ctx.store.object_id(&self.source(), "HgPoller").await?;
                self.object = Some(o);
                o
            }
        };
        let last = match ctx.store.get_state(object, STATE).await? {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        if self.mode == Mode::Pushlog {
            match self.poll_pushlog(ctx, object, last.clone()).await {
                Err(e) if e.is::<NoPushlog>() && self.cfg.pushlog_url_override.is_none() => {
                    tracing::info!(
                        poller = %self.name(),
                        "{e}; polling with `hg pull` into a mirror instead"
                    );
                    self.mode = Mode::Plain;
                }
                other => return other,
            }
        }
        self.poll_plain(ctx, object, last).await
    }

    fn pushlog_url(&self) -> String {
        match &self.cfg.pushlog_url_override {
            Some(u) => u.clone(),
            None => format!(
                "{}/json-pushes",
                self.cfg.repository().trim_end_matches('/')
            ),
        }
    }

    async fn fetch(&self, ctx: &Context, query: &[(&str, &str)]) -> anyhow::Result<Vec<Push>> {
        let url = self.pushlog_url();
        let mut q = vec![("full", "1"), ("version", "2")];
        q.extend_from_slice(query);
        let resp = ctx
            .http
            .get(&url)
            .query(&q)
            .timeout(ctx.timeout)
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = resp.status();
        let body = resp
            .text()
            .await
            .with_context(|| format!("reading the answer of {url} failed"))?;
        if !status.is_success() {
            if body.contains("unknown revision") {
                return Err(anyhow!(UnknownRevision));
            }
            // hgweb without the pushlog extension answers 400 "method not
            // found"; other servers 404.
            if status == reqwest::StatusCode::NOT_FOUND
                || (status == reqwest::StatusCode::BAD_REQUEST && body.contains("method not found"))
            {
                return Err(anyhow!(NoPushlog(url)));
            }
            let snippet: String = body.chars().take(200).collect();
            bail!("{url} answered {status}: {}", snippet.trim());
        }
        pushlog::parse(&body).with_context(|| format!("malformed answer from {url}"))
    }

    async fn poll_pushlog(
        &self,
        ctx: &Context,
        object: ObjectId,
        last: Option<String>,
    ) -> anyhow::Result<usize> {
        let pushes = match last.as_deref() {
            None => {
                let pushes = self.fetch(ctx, &[]).await?;
                return self.first_poll(ctx, object, &pushes).await;
            }
            Some("") => self.fetch(ctx, &[("startID", "0")]).await?,
            Some(node) => match self.fetch(ctx, &[("fromchange", node)]).await {
                Err(e) if e.is::<UnknownRevision>() => {
                    tracing::warn!(
                        poller = %self.name(),
                        "the repository no longer has {node} (reset or stripped); \
                         reporting its newest changes, at most {}",
                        self.cfg.max_changes
                    );
                    self.fetch(ctx, &[]).await?
                }
                other => other?,
            },
        };
        let sel = pushlog::select(&self.cfg, &pushes);
        self.store(ctx, object, sel, last).await
    }

    /// A poller's first poll records where the repository is and reports
    /// nothing, unless the repository is empty.
    async fn first_poll(
        &self,
        ctx: &Context,
        object: ObjectId,
        pushes: &[Push],
    ) -> anyhow::Result<usize> {
        let newest = pushes
            .iter()
            .rev()
            .find_map(|p| p.changesets.last())
            .map(|c| c.node.clone())
            .unwrap_or_default();
        if newest.is_empty() {
            tracing::info!(poller = %self.name(), "first poll: the repository is empty");
        } else {
            tracing::info!(poller = %self.name(), "first poll: starting after {newest}");
        }
        ctx.commit(
            &self.source(),
            vec![],
            vec![(object, STATE.into(), Value::String(newest))],
        )
        .await
    }

    async fn store(
        &self,
        ctx: &Context,
        object: ObjectId,
        sel: Selection,
        last: Option<String>,
    ) -> anyhow::Result<usize> {
        if sel.skipped_other_branches > 0 {
            tracing::info!(
                poller = %self.name(),
                "skipped {} changeset(s) on named branches other than {}",
                sel.skipped_other_branches,
                self.cfg.repo_branch.as_deref().unwrap_or("()")
            );
        }
        if sel.dropped > 0 {
            tracing::warn!(
                poller = %self.name(),
                "{} change(s) left out: more than maxChanges ({}) arrived in one poll",
                sel.dropped,
                self.cfg.max_changes
            );
        }
        let newest = sel.newest.or(last).unwrap_or_default();
        ctx.commit(
            &self.source(),
            sel.changes,
            vec![(object, STATE.into(), Value::String(newest))],
        )
        .await
    }

    async fn hg(&self, ctx: &Context, args: &[&str]) -> anyhow::Result<String> {
        run_command("hg", args, None, ctx.timeout).await
    }

    /// `hg log` of a revset in the mirror.
    async fn log(
        &self,
        ctx: &Context,
        mirror: String,
        revset: String,
    ) -> anyhow::Result<Vec<Changeset>> {
        let out = self
            .hg(
                ctx,
                &["log", "-v", "-R", &mirror, "-r", &revset, "-T", "json"],
            )
            .await?;
        parse_hg_log(&out)
    }

    async fn poll_plain(
        &mut self,
        ctx: &Context,
        object: ObjectId,
        last: Option<String>,
    ) -> anyhow::Result<usize> {
        let repo = self.cfg.repository();
        let mirror_dir = ctx.mirror_dir("hg", &repo);
        let mirror = mirror_dir.to_string_lossy().into_owned();
        // A local repository that has not changed needs no process at all.
        // (A relative local path is relative to the master dir.)
        let from_repo = if is_http(&repo) || std::path::Path::new(&repo).is_absolute() {
            repo.clone()
        } else {
            ctx.master_dir.join(&repo).to_string_lossy().into_owned()
        };
        let local = !is_http(&from_repo);
        let source_now = if local {
            fingerprint(std::path::Path::new(&from_repo))
        } else {
            None
        };
        let started = last.as_deref().is_some_and(|l| !l.is_empty());
        if started && source_now.is_some() && source_now == self.source_seen {
            return Ok(0);
        }
        let _slot = ctx.command_slot().await;
        if !mirror_dir.join(".hg").is_dir() {
            std::fs::create_dir_all(&mirror_dir)
                .with_context(|| format!("cannot create the mirror {mirror}"))?;
            self.hg(ctx, &["init", &mirror]).await?;
        }
        let mirror_before = fingerprint(&mirror_dir);
        self.hg(ctx, &["pull", "-q", "-R", &mirror, &from_repo])
            .await?;
        let pulled_at = now();
        if started && mirror_before.is_some() && fingerprint(&mirror_dir) == mirror_before {
            // The pull brought nothing.
            self.source_seen = source_now;
            return Ok(0);
        }
        let log = |revset: String| self.log(ctx, mirror.clone(), revset);
        let changesets = match last.as_deref() {
            None => {
                // `tip` of an empty repository is the null revision.
                let tip = log("tip".into()).await?;
                let push = Push {
                    id: None,
                    date: pulled_at,
                    user: String::new(),
                    changesets: tip.into_iter().filter(|c| !is_null(&c.node)).collect(),
                };
                return self.first_poll(ctx, object, &[push]).await;
            }
            Some("") => log("all()".into()).await?,
            Some(node) if is_node(node) => match log(format!("({node}:tip) - {node}")).await {
                Err(e) if format!("{e:#}").contains("unknown revision") => {
                    tracing::warn!(
                        poller = %self.name(),
                        "the repository no longer has {node} (reset or stripped); \
                         reporting its newest changes, at most {}",
                        self.cfg.max_changes
                    );
                    log("all()".into()).await?
                }
                other => other?,
            },
            Some(other) => {
                tracing::warn!(poller = %self.name(), "ignoring a malformed stored changeset {other:?}");
                log("all()".into()).await?
            }
        };
        if changesets.is_empty() {
            return Ok(0);
        }
        let push = Push {
            id: None,
            date: pulled_at,
            user: String::new(),
            changesets,
        };
        let sel = pushlog::select(&self.cfg, &[push]);
        let n = self.store(ctx, object, sel, last).await?;
        self.source_seen = source_now;
        Ok(n)
    }
}

fn is_node(s: &str) -> bool {
    !s.is_empty() && s.len() <= 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_null(node: &str) -> bool {
    node.bytes().all(|b| b == b'0')
}

/// Parses `hg log -v -T json`.
fn parse_hg_log(out: &str) -> anyhow::Result<Vec<Changeset>> {
    let v: Value = serde_json::from_str(out).context("`hg log -T json` printed no JSON")?;
    let list = v.as_array().context("`hg log -T json` printed no list")?;
    Ok(list
        .iter()
        .map(|c| Changeset {
            node: c["node"].as_str().unwrap_or_default().to_string(),
            author: c["user"].as_str().unwrap_or_default().to_string(),
            branch: c["branch"].as_str().unwrap_or("default").to_string(),
            desc: c["desc"].as_str().unwrap_or_default().to_string(),
            files: super::pushlog::str_list(c, "files"),
        })
        .filter(|c| !c.node.is_empty())
        .collect())
}
