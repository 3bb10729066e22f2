//! Version-control steps run as worker commands: Buildbot's `Git` step
//! and Mozilla's `MercurialCloneCommand` (clone, or pull and update).

use rmpv::Value;

use crate::config::{Step, StepKind};
use crate::workers::protocol;

use super::{
    command::{arg_text, join_path, shell_args, CommandEnd, CommandRun},
    logs::LogSink,
    render,
    runner::Build,
    Distributor,
};

impl Distributor {
    /// `Git` (without a command of its own): when the workdir is a clone
    /// and `mode` is incremental, `git fetch REPOURL BRANCH` there;
    /// otherwise the workdir is removed and cloned afresh. Then the build's
    /// revision (or what was fetched) is checked out, and `git rev-parse
    /// HEAD` becomes the `got_revision` property.
    pub(super) async fn git_checkout(
        &self,
        b: &Build<'_>,
        sink: &mut LogSink,
        step: &Step,
        workdir: &str,
        props: &render::Scope<'_>,
    ) -> anyhow::Result<Result<CommandRun, String>> {
        let StepKind::Git {
            repourl,
            branch,
            mode,
        } = &step.kind
        else {
            return Ok(Err("not a Git step".into()));
        };
        let repourl = match arg_text(repourl, props) {
            Ok(r) => r,
            Err(why) => return Ok(Err(why)),
        };
        let branch = match branch.as_ref().map(|a| arg_text(a, props)).transpose() {
            Ok(b) => b,
            Err(why) => return Ok(Err(why)),
        };
        let revision = props
            .props
            .get("revision")
            .and_then(|(v, _)| v.as_str())
            .filter(|r| !r.is_empty())
            .map(String::from);
        let shell = |cmd: Vec<&str>| {
            let command = Value::Array(cmd.into_iter().map(Value::from).collect());
            shell_args(step, b.builder, workdir, command, props)
        };
        macro_rules! run_ok {
            ($args:expr, $capture:expr) => {{
                let args = match $args {
                    Ok(a) => a,
                    Err(why) => return Ok(Err(why)),
                };
                let run = self
                    .run_command(b, sink, "shell", args, None, $capture)
                    .await?;
                if !matches!(run.ended, CommandEnd::Done { rc: Some(0) }) {
                    return Ok(Ok(run));
                }
                run
            }};
        }
        let stat = self.stat(b, sink, &join_path(workdir, ".git")).await?;
        if !matches!(stat.ended, CommandEnd::Done { .. }) {
            return Ok(Ok(stat));
        }
        let is_clone = matches!(stat.ended, CommandEnd::Done { rc: Some(0) });
        let fetched = if is_clone && mode == "incremental" {
            let mut cmd = vec!["git", "fetch", repourl.as_str()];
            if let Some(br) = &branch {
                cmd.push(br);
            }
            run_ok!(shell(cmd), false);
            "FETCH_HEAD".to_string()
        } else {
            let rm = self.remove_dir(b, sink, workdir).await?;
            if !matches!(rm.ended, CommandEnd::Done { .. }) {
                return Ok(Ok(rm));
            }
            let mut cmd = vec!["git", "clone"];
            if let Some(br) = &branch {
                cmd.extend(["--branch", br.as_str()]);
            }
            cmd.extend([repourl.as_str(), "."]);
            run_ok!(shell(cmd), false);
            "HEAD".to_string()
        };
        let target = revision.unwrap_or(fetched);
        run_ok!(shell(vec!["git", "checkout", "-f", target.as_str()]), false);
        let rev = run_ok!(shell(vec!["git", "rev-parse", "HEAD"]), true);
        Ok(Ok(rev))
    }

    /// The protocol's `stat` of `path`: done with rc 0 when it exists.
    pub(super) async fn stat(
        &self,
        b: &Build<'_>,
        sink: &mut LogSink,
        path: &str,
    ) -> anyhow::Result<CommandRun> {
        let args = protocol::map(vec![("path", Value::from(path))]);
        self.run_command(b, sink, "stat", args, None, false).await
    }

    /// The protocol's `rmdir` of `path` (and what is in it).
    pub(super) async fn remove_dir(
        &self,
        b: &Build<'_>,
        sink: &mut LogSink,
        path: &str,
    ) -> anyhow::Result<CommandRun> {
        let args = protocol::map(vec![("paths", Value::Array(vec![Value::from(path)]))]);
        self.run_command(b, sink, "rmdir", args, None, false).await
    }

    /// `MercurialCloneCommand` (`hg clone SRC [DEST]`): when DEST already
    /// holds a repository (a `stat` of DEST/.hg), `hg pull SRC` and
    /// `hg update --clean` there instead of cloning; with `retry`, a clone
    /// that fails is tried once more into a removed DEST.
    pub(super) async fn hg_clone(
        &self,
        b: &Build<'_>,
        sink: &mut LogSink,
        step: &Step,
        argv: &[String],
        workdir: &str,
        props: &render::Scope<'_>,
    ) -> anyhow::Result<Option<CommandRun>> {
        let retry = matches!(step.kind, StepKind::MercurialCloneCommand { retry: true });
        let Some(at) = argv.iter().position(|a| a == "clone") else {
            return Ok(None);
        };
        let positional: Vec<&String> = argv[at + 1..]
            .iter()
            .filter(|a| !a.starts_with('-'))
            .collect();
        let Some(src) = positional.first() else {
            return Ok(None);
        };
        let dest = match positional.get(1) {
            Some(d) => d.to_string(),
            None => src
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or("repo")
                .to_string(),
        };
        let dest_path = join_path(workdir, &dest);
        let stat = self.stat(b, sink, &join_path(&dest_path, ".hg")).await?;
        let hg = argv[0].as_str();
        let shell = |cmd: Vec<&str>, dir: &str| {
            let command = Value::Array(cmd.into_iter().map(Value::from).collect());
            shell_args(step, b.builder, dir, command, props)
        };
        if matches!(stat.ended, CommandEnd::Done { rc: Some(0) }) {
            self.store
                .append_header(
                    sink.log,
                    format!("{dest} is a repository already: pulling and updating it"),
                )
                .await?;
            let args =
                shell(vec![hg, "pull", src.as_str()], &dest_path).map_err(anyhow::Error::msg)?;
            let pull = self
                .run_command(b, sink, "shell", args, None, false)
                .await?;
            if !matches!(pull.ended, CommandEnd::Done { rc: Some(0) }) {
                return Ok(Some(pull));
            }
            let args =
                shell(vec![hg, "update", "--clean"], &dest_path).map_err(anyhow::Error::msg)?;
            return Ok(Some(
                self.run_command(b, sink, "shell", args, None, false)
                    .await?,
            ));
        }
        if !matches!(stat.ended, CommandEnd::Done { .. }) {
            return Ok(Some(stat));
        }
        let argv_refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        let args = shell(argv_refs.clone(), workdir).map_err(anyhow::Error::msg)?;
        let clone = self
            .run_command(b, sink, "shell", args, None, false)
            .await?;
        if !retry || !matches!(clone.ended, CommandEnd::Done { rc: Some(rc) } if rc != 0) {
            return Ok(Some(clone));
        }
        self.store
            .append_header(
                sink.log,
                format!("the clone failed: removing {dest} and cloning again"),
            )
            .await?;
        let rm = self.remove_dir(b, sink, dest_path.as_str()).await?;
        if !matches!(rm.ended, CommandEnd::Done { .. }) {
            return Ok(Some(rm));
        }
        let args = shell(argv_refs, workdir).map_err(anyhow::Error::msg)?;
        Ok(Some(
            self.run_command(b, sink, "shell", args, None, false)
                .await?,
        ))
    }
}
