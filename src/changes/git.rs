//! `GitPoller` over the `git` command line: `git fetch` into a bare mirror
//! under `DIR/pollers/git/`, then one change per new commit of each branch.
//!
//! State (object `GitPoller:<repourl>`): `lastRev:<branch>` per branch. A
//! branch's first poll records its head and reports nothing; after a force
//! push the commits reachable from the new head and not from the old one
//! are reported; a branch that disappears is logged and forgotten. With
//! `only_tags`, the tags are followed instead, and each new tag is one
//! change for the commit it names.

use std::collections::BTreeMap;

use anyhow::Context as _;
use serde_json::Value;

use super::{run_command, Context};
use crate::config::GitPoller;
use crate::store::{NewChange, ObjectId, Properties};

pub struct GitPollerTask {
    pub cfg: GitPoller,
    object: Option<ObjectId>,
}

const FIELD: char = '\u{1f}';
const RECORD: char = '\u{1e}';

impl GitPollerTask {
    pub fn new(cfg: GitPoller) -> Self {
        GitPollerTask { cfg, object: None }
    }

    pub fn name(&self) -> String {
        format!("GitPoller {}", self.cfg.repourl)
    }

    fn source(&self) -> String {
        format!("GitPoller:{}", self.cfg.repourl)
    }

    async fn git(&self, ctx: &Context, args: &[&str]) -> anyhow::Result<String> {
        run_command("git", args, None, ctx.timeout).await
    }

    /// The remote's refs to follow: name (as a change's branch) → ref.
    async fn remote_refs(&self, ctx: &Context) -> anyhow::Result<BTreeMap<String, String>> {
        let url = &self.cfg.repourl;
        let mut out = BTreeMap::new();
        if self.cfg.only_tags {
            let list = self.git(ctx, &["ls-remote", "--tags", url]).await?;
            for line in list.lines() {
                if let Some(r) = line.split('\t').nth(1) {
                    if let Some(tag) = r.strip_prefix("refs/tags/") {
                        if !tag.ends_with("^{}") {
                            out.insert(tag.to_string(), r.to_string());
                        }
                    }
                }
            }
            return Ok(out);
        }
        let heads = self
            .git(ctx, &["ls-remote", "--symref", url, "HEAD", "refs/heads/*"])
            .await?;
        let mut existing = Vec::new();
        let mut default = None;
        for line in heads.lines() {
            if let Some(rest) = line.strip_prefix("ref: ") {
                default = rest.split('\t').next().map(String::from);
            } else if let Some(r) = line.split('\t').nth(1) {
                existing.push(r.to_string());
            }
        }
        let wanted: Vec<String> = if self.cfg.branches.is_empty() {
            default
                .and_then(|r| r.strip_prefix("refs/heads/").map(String::from))
                .into_iter()
                .collect()
        } else {
            self.cfg.branches.clone()
        };
        for b in wanted {
            let r = format!("refs/heads/{b}");
            if existing.contains(&r) {
                out.insert(b, r);
            } else {
                tracing::warn!(poller = %self.name(), "the repository has no branch `{b}`");
            }
        }
        Ok(out)
    }

    pub async fn poll(&mut self, ctx: &Context) -> anyhow::Result<usize> {
        let object = match self.object {
            Some(o) => o,
            None => {
                let o = ctx.store.object_id(&self.source(), "GitPoller").await?;
                self.object = Some(o);
                o
            }
        };
        let _slot = ctx.command_slot().await;
        let mirror_dir = ctx.mirror_dir("git", &self.cfg.repourl);
        let mirror = mirror_dir.to_string_lossy().into_owned();
        if !mirror_dir.join("HEAD").is_file() {
            std::fs::create_dir_all(&mirror_dir)
                .with_context(|| format!("cannot create the mirror {mirror}"))?;
            self.git(ctx, &["init", "--bare", "-q", &mirror]).await?;
        }
        let refs = self.remote_refs(ctx).await?;
        if refs.is_empty() {
            return Ok(0);
        }
        let mut fetch = vec!["-C", &mirror, "fetch", "-q", "--no-tags", "--force"];
        let specs: Vec<String> = refs
            .iter()
            .map(|(name, r)| format!("+{r}:refs/kiln/{name}"))
            .collect();
        fetch.push(&self.cfg.repourl);
        fetch.extend(specs.iter().map(String::as_str));
        self.git(ctx, &fetch).await?;

        let mut changes = Vec::new();
        let mut state = Vec::new();
        for name in refs.keys() {
            let key = format!("lastRev:{name}");
            let head = self
                .git(
                    ctx,
                    &[
                        "-C",
                        &mirror,
                        "rev-parse",
                        &format!("refs/kiln/{name}^{{commit}}"),
                    ],
                )
                .await?
                .trim()
                .to_string();
            let last = match ctx.store.get_state(object, &key).await? {
                Some(Value::String(s)) => Some(s),
                _ => None,
            };
            match last {
                None if self.cfg.only_tags && self.seen_tags(ctx, object).await? => {
                    // A tag made after the first poll.
                    changes.extend(self.commits(ctx, &mirror, name, &[&head, "-1"]).await?);
                }
                None => {
                    tracing::info!(poller = %self.name(), "first poll of `{name}`: starting after {head}");
                }
                Some(old) if old == head => continue,
                Some(old) => {
                    let known = self
                        .git(
                            ctx,
                            &[
                                "-C",
                                &mirror,
                                "cat-file",
                                "-e",
                                &format!("{old}^{{commit}}"),
                            ],
                        )
                        .await
                        .is_ok();
                    let not_old = format!("^{old}");
                    let range: Vec<&str> = if known {
                        vec![&head, &not_old]
                    } else {
                        tracing::warn!(
                            poller = %self.name(),
                            "`{name}` moved from {old}, which the mirror does not have; reporting its head only"
                        );
                        vec![&head, "-1"]
                    };
                    changes.extend(self.commits(ctx, &mirror, name, &range).await?);
                }
            }
            state.push((object, key, Value::String(head)));
        }
        if self.cfg.only_tags {
            state.push((object, "tagsSeen".into(), Value::Bool(true)));
        }
        ctx.commit(&self.source(), changes, state).await
    }

    async fn seen_tags(&self, ctx: &Context, object: ObjectId) -> anyhow::Result<bool> {
        Ok(ctx.store.get_state(object, "tagsSeen").await?.is_some())
    }

    /// The commits of `range` (git log arguments), oldest first.
    async fn commits(
        &self,
        ctx: &Context,
        mirror: &str,
        branch: &str,
        range: &[&str],
    ) -> anyhow::Result<Vec<NewChange>> {
        let format = format!("--format={RECORD}%H{FIELD}%an <%ae>{FIELD}%ct{FIELD}%B{FIELD}");
        let mut args = vec!["-C", mirror, "log", "--topo-order", "--name-only", &format];
        args.extend_from_slice(range);
        let out = self.git(ctx, &args).await?;
        let mut changes: Vec<NewChange> = out
            .split(RECORD)
            .filter(|r| !r.trim().is_empty())
            .filter_map(|r| {
                let mut f = r.splitn(5, FIELD);
                let (sha, author, time, body, files) = (
                    f.next()?,
                    f.next()?,
                    f.next()?,
                    f.next()?,
                    f.next().unwrap_or(""),
                );
                Some(NewChange {
                    author: author.to_string(),
                    committer: None,
                    comments: body.trim_end().to_string(),
                    branch: Some(branch.to_string()),
                    revision: Some(sha.to_string()),
                    revlink: None,
                    when_timestamp: time.trim().parse().unwrap_or(0),
                    category: self.cfg.category.clone(),
                    repository: self.cfg.repourl.clone(),
                    codebase: String::new(),
                    project: self.cfg.project.clone().unwrap_or_default(),
                    files: files
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(String::from)
                        .collect(),
                    properties: Properties::new(),
                })
            })
            .collect();
        changes.reverse();
        Ok(changes)
    }
}
