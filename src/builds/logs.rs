//! A step's log: the sink that joins, redacts and bounds its lines, and
//! log evaluation (`log_eval_func`, `log_rules`).

use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

use crate::config::{LogEval, Results, Step};
use crate::store::builds::LineKind;
use crate::store::Properties;

use super::{lock, runner::severity, steps::step_map, Distributor, Generation};

/// At most this many lines of a step's output are flagged by its log rules.
const FLAGGED_LINES: usize = 50;

/// A step's log and how much of it is kept (`logMaxSize`).
pub(super) struct LogSink {
    pub(super) log: i64,
    /// Fires when the build is stopped.
    pub(super) stop: CancellationToken,
    kept: u64,
    truncated: bool,
    /// Secret values the step was given: shown as `<secret>` (a stock
    /// worker writes the command and its environment into the header).
    secrets: std::sync::Arc<Mutex<Vec<String>>>,
    /// Per stream, the start of a line not yet ended.
    partial: Vec<(LineKind, String)>,
}

impl LogSink {
    pub(super) fn new(
        log: i64,
        stop: CancellationToken,
        secrets: std::sync::Arc<Mutex<Vec<String>>>,
    ) -> LogSink {
        LogSink {
            log,
            stop,
            kept: 0,
            truncated: false,
            secrets,
            partial: Vec::new(),
        }
    }

    /// Splits a stream's text into whole lines (without `\r\n`/`\n`). A
    /// last line without its newline waits for the rest of it, which the
    /// next update of the same stream brings (workers cut output where
    /// their reads end, not at newlines).
    pub(super) fn split(&mut self, kind: LineKind, text: &str) -> Vec<String> {
        let slot = match self.partial.iter().position(|(k, _)| *k == kind) {
            Some(i) => i,
            None => {
                self.partial.push((kind, String::new()));
                self.partial.len() - 1
            }
        };
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(i) = rest.find('\n') {
            let mut line = std::mem::take(&mut self.partial[slot].1);
            line.push_str(&rest[..i]);
            if line.ends_with('\r') {
                line.pop();
            }
            out.push(line);
            rest = &rest[i + 1..];
        }
        self.partial[slot].1.push_str(rest);
        out
    }

    /// The lines still waiting for their newline, once the command ended.
    pub(super) fn take_partial(&mut self) -> Vec<(LineKind, String)> {
        std::mem::take(&mut self.partial)
            .into_iter()
            .filter(|(_, l)| !l.is_empty())
            .collect()
    }

    fn redact(&self, line: &str) -> String {
        let secrets = lock(&self.secrets);
        let mut out = line.to_string();
        for s in secrets.iter().filter(|s| !s.is_empty()) {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "<secret>");
            }
        }
        out
    }

    /// The stored form of an output line, or `None` once the log is full
    /// (the first dropped line becomes the marker).
    pub(super) fn keep(&mut self, kind: LineKind, line: &str, max: u64) -> Option<String> {
        if self.truncated {
            return None;
        }
        self.kept += line.len() as u64 + 1;
        if self.kept > max {
            self.truncated = true;
            return Some(LineKind::Header.line(&format!(
                "[kiln] this log reached logMaxSize ({max} bytes): the rest of the output is not kept"
            )));
        }
        Some(kind.line(&self.redact(line)))
    }
}

impl Distributor {
    /// A finished command's result: the step's `log_eval_func` (an rc map,
    /// or a function given `#{ name, properties }`, the exit code and the
    /// command's output, returning a result), else Buildbot's rule (0 is
    /// SUCCESS, anything else FAILURE); then its `log_rules`.
    pub(super) async fn evaluate(
        &self,
        gen: &Generation,
        step: &Step,
        rc: Option<i64>,
        log: i64,
        props: &Properties,
    ) -> Result<Results, String> {
        let plain = |rc: Option<i64>| match rc {
            Some(0) => Ok(Results::Success),
            Some(_) => Ok(Results::Failure),
            None => Err("the worker reported no exit code".to_string()),
        };
        let by_rc = match step.log_eval.as_deref() {
            None => plain(rc),
            Some(LogEval::RcMap { codes, default }) => {
                match (rc.and_then(|rc| codes.get(&rc)), default) {
                    (Some(r), _) => Ok(*r),
                    (None, Some(d)) => Ok(*d),
                    (None, None) => plain(rc),
                }
            }
            Some(LogEval::Callback(cb)) => {
                let output = self.output_text(log).await?;
                let rc = rc.map_or(rhai::Dynamic::UNIT, rhai::Dynamic::from);
                let v = self
                    .call(gen, cb, (step_map(step, props), rc, output))
                    .await?;
                v.as_int().ok().and_then(Results::from_code).ok_or_else(|| {
                    format!(
                        "log_eval_func of step `{}` returned {v:?}, not a result such as SUCCESS",
                        step.name
                    )
                })
            }
        }?;
        self.apply_log_rules(step, log, by_rc).await
    }

    /// The step's `log_rules` over its output: a rule that matches a line
    /// raises the result to the rule's (never lowers it). Each line a rule
    /// worse than SUCCESS matched is written to the log as `[kiln] flagged:
    /// LINE` (the job panel of the push page shows them), at most
    /// [`FLAGGED_LINES`] of them.
    async fn apply_log_rules(
        &self,
        step: &Step,
        log: i64,
        by_rc: Results,
    ) -> Result<Results, String> {
        if step.log_rules.is_empty() {
            return Ok(by_rc);
        }
        let text = self.output_text(log).await?;
        let mut result = by_rc;
        let mut notes: Vec<String> = Vec::new();
        let mut flagged = 0;
        for rule in &step.log_rules {
            // Checked when the config was loaded.
            let Ok(re) = regex::Regex::new(&rule.pattern) else {
                continue;
            };
            let mut hits = text.lines().filter(|l| re.is_match(l)).peekable();
            if hits.peek().is_none() {
                continue;
            }
            if rule.result != Results::Success {
                for line in hits.by_ref() {
                    if flagged == FLAGGED_LINES {
                        break;
                    }
                    notes.push(format!("[kiln] flagged: {line}"));
                    flagged += 1;
                }
            }
            if severity(rule.result) > severity(result) {
                notes.push(format!(
                    "[kiln] log rule {:?} matched: {}",
                    rule.pattern,
                    rule.result.name()
                ));
                result = rule.result;
            }
        }
        for note in notes {
            self.store
                .append_header(log, note)
                .await
                .map_err(|e| format!("{e:#}"))?;
        }
        Ok(result)
    }

    /// A step log's stdout and stderr text, without the header lines.
    pub(super) async fn output_text(&self, log: i64) -> Result<String, String> {
        let text = self
            .store
            .log_text(log)
            .await
            .map_err(|e| format!("cannot read the log: {e:#}"))?;
        Ok(text
            .lines()
            .filter_map(|l| match LineKind::parse(l) {
                Some((LineKind::Stdout | LineKind::Stderr, text)) => Some(text),
                _ => None,
            })
            .flat_map(|l| [l, "\n"])
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_cut_anywhere_are_joined_per_stream() {
        let mut sink = LogSink::new(1, CancellationToken::new(), Default::default());
        let (o, e) = (LineKind::Stdout, LineKind::Stderr);
        assert_eq!(sink.split(o, "ab"), Vec::<String>::new());
        assert_eq!(sink.split(e, "err"), Vec::<String>::new());
        assert_eq!(sink.split(o, "c\r\nd\n\ne"), ["abc", "d", ""]);
        assert_eq!(sink.split(e, "or\n"), ["error"]);
        assert_eq!(sink.take_partial(), [(o, "e".to_string())]);
        assert!(sink.take_partial().is_empty());
    }
}
