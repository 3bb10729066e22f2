//! Builds, their steps and their logs.

use serde::Serialize;
use serde_json::json;

use super::db::args;
use super::{now, Properties, Store};

/// What a finished build does with the requests it claimed.
#[derive(Clone, Debug)]
pub enum Claimed {
    /// They are complete, with the build's result.
    Complete(Vec<i64>),
    /// They go back to the queue to build again (the build ended RETRY).
    GiveBack(Vec<i64>),
}

/// A stored build, as Buildbot's data API shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BuildRow {
    pub buildid: i64,
    pub number: i64,
    pub builderid: i64,
    pub buildrequestid: i64,
    pub workerid: Option<i64>,
    pub masterid: i64,
    pub started_at: i64,
    pub complete_at: Option<i64>,
    pub complete: bool,
    pub state_string: String,
    pub results: Option<i64>,
}

/// A stored step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepRow {
    pub stepid: i64,
    pub number: i64,
    pub name: String,
    pub buildid: i64,
    pub results: Option<i64>,
    pub state_string: String,
}

/// Which stream a line of a stdio log came from. Stored as the line's
/// first character, as Buildbot stores them: `o` stdout, `e` stderr,
/// `h` header (what the worker or the master says about the command).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineKind {
    Stdout,
    Stderr,
    Header,
}

impl LineKind {
    /// The kind of a worker update's stream: `stdout`, `stderr`, else a
    /// header.
    pub fn of_stream(name: &str) -> LineKind {
        match name {
            "stdout" => LineKind::Stdout,
            "stderr" => LineKind::Stderr,
            _ => LineKind::Header,
        }
    }

    fn prefix(self) -> char {
        match self {
            LineKind::Stdout => 'o',
            LineKind::Stderr => 'e',
            LineKind::Header => 'h',
        }
    }

    /// A line's stored form.
    pub fn line(self, text: &str) -> String {
        let mut s = String::with_capacity(text.len() + 1);
        s.push(self.prefix());
        s.push_str(text);
        s
    }

    /// A stored line's kind and text (`None` for a line of no kind).
    pub fn parse(stored: &str) -> Option<(LineKind, &str)> {
        let kind = match stored.chars().next()? {
            'o' => LineKind::Stdout,
            'e' => LineKind::Stderr,
            'h' => LineKind::Header,
            _ => return None,
        };
        Some((kind, &stored[1..]))
    }
}

impl Store {
    /// Starts a build of request `brid`: the next number of its builder.
    pub async fn new_build(
        &self,
        builderid: i64,
        brid: i64,
        workerid: Option<i64>,
        masterid: i64,
        properties: Properties,
    ) -> anyhow::Result<(i64, i64)> {
        let ids = self.call(move |c| {
            let number: i64 = c.value(
                "SELECT coalesce(max(number), 0) + 1 FROM builds WHERE builderid = ?1",
                args![builderid],
            )?;
            let id: i64 = c.value(
                "INSERT INTO builds (number, builderid, buildrequestid, workerid, masterid, started_at, state_string)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'starting') RETURNING id",
                args![number, builderid, brid, workerid, masterid, now()],
            )?;
            let number_prop = (serde_json::Value::from(number), "Build".to_string());
            for (name, (value, source)) in properties
                .iter()
                .chain(std::iter::once((&"buildnumber".to_string(), &number_prop)))
            {
                set_property(c, id, name, &value.to_string(), source)?;
            }
            Ok((id, number))
        })
        .await?;
        self.events.emit("builds", ids.0, "new", || {
            json!({ "buildid": ids.0, "number": ids.1, "builderid": builderid,
                    "buildrequestid": brid, "workerid": workerid, "masterid": masterid,
                    "complete": false, "results": null })
        });
        Ok(ids)
    }

    /// Sets (or replaces) a property of a running build.
    pub async fn set_build_property(
        &self,
        buildid: i64,
        name: &str,
        value: &serde_json::Value,
        source: &str,
    ) -> anyhow::Result<()> {
        let (name, value, source) = (name.to_string(), value.to_string(), source.to_string());
        self.call(move |c| set_property(c, buildid, &name, &value, &source))
            .await
    }

    /// Ends a build and, in the same transaction, does what its end
    /// means for the requests it claimed: a master killed at any moment
    /// leaves either a running build (run again) or a finished build with
    /// its requests settled, never a finished build whose requests would
    /// build again. Returns the buildsets that completed.
    pub async fn finish_build(
        &self,
        buildid: i64,
        results: i64,
        state: &str,
        claimed: Claimed,
    ) -> anyhow::Result<Vec<(i64, i64)>> {
        let state = state.to_string();
        let completed = match &claimed {
            Claimed::Complete(brids) => brids.clone(),
            Claimed::GiveBack(_) => vec![],
        };
        let (row, buildsets) = self
            .call(move |c| {
                c.execute(
                    "UPDATE builds SET complete_at = ?2, results = ?3, state_string = ?4 WHERE id = ?1",
                    args![buildid, now(), results, &state],
                )?;
                let buildsets = match &claimed {
                    Claimed::Complete(brids) => super::buildsets::complete_requests(c, brids, results)?,
                    Claimed::GiveBack(brids) => {
                        for brid in brids {
                            c.execute(
                                "DELETE FROM buildrequest_claims WHERE brid = ?1",
                                args![brid],
                            )?;
                        }
                        vec![]
                    }
                };
                let row = c
                    .query_opt(
                        "SELECT builderid, number, buildrequestid, state_string FROM builds WHERE id = ?1",
                        args![buildid],
                    )?
                    .map(|r| -> anyhow::Result<(i64, i64, i64, String)> {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })
                    .transpose()?;
                Ok((row, buildsets))
            })
            .await?;
        if let Some((builderid, number, brid, state)) = row {
            self.events.emit("builds", buildid, "finished", || {
                json!({ "buildid": buildid, "number": number, "builderid": builderid,
                        "buildrequestid": brid, "complete": true, "results": results,
                        "state_string": state })
            });
        }
        self.requests_completed(&completed, results, &buildsets);
        Ok(buildsets)
    }

    pub async fn new_step(&self, buildid: i64, number: i64, name: &str) -> anyhow::Result<i64> {
        let name = name.to_string();
        let id = self.call(move |c| {
            let id: i64 = c.value(
                "INSERT INTO steps (number, name, buildid, started_at, state_string) VALUES (?1, ?2, ?3, ?4, 'running')
                 RETURNING id",
                args![number, &name, buildid, now()],
            )?;
            Ok((id, name.clone()))
        })
        .await?;
        self.events.emit("steps", id.0, "started", || {
            json!({ "stepid": id.0, "buildid": buildid, "number": number, "name": id.1,
                    "complete": false, "results": null })
        });
        Ok(id.0)
    }

    pub async fn finish_step(&self, stepid: i64, results: i64, state: &str) -> anyhow::Result<()> {
        let state = state.to_string();
        let buildid = self
            .call(move |c| {
                c.execute(
                    "UPDATE steps SET complete_at = ?2, results = ?3, state_string = ?4 WHERE id = ?1",
                    args![stepid, now(), results, &state],
                )?;
                c.query_opt(
                    "SELECT buildid, state_string FROM steps WHERE id = ?1",
                    args![stepid],
                )?
                .map(|r| -> anyhow::Result<(i64, String)> { Ok((r.get(0)?, r.get(1)?)) })
                .transpose()
            })
            .await?;
        if let Some((buildid, state)) = buildid {
            self.events.emit("steps", stepid, "finished", || {
                json!({ "stepid": stepid, "buildid": buildid, "complete": true,
                        "results": results, "state_string": state })
            });
        }
        Ok(())
    }

    /// Opens a log of a step (`type` s = stdio, t = text, h = html).
    pub async fn new_log(&self, stepid: i64, name: &str, kind: &str) -> anyhow::Result<i64> {
        let (name, kind) = (name.to_string(), kind.to_string());
        let (id, name, slug, kind) = self
            .call(move |c| {
                let slug: String = name
                    .chars()
                    .map(|ch| {
                        if ch.is_ascii_alphanumeric() {
                            ch.to_ascii_lowercase()
                        } else {
                            '_'
                        }
                    })
                    .collect();
                let id: i64 = c.value(
                    "INSERT INTO logs (name, slug, stepid, type) VALUES (?1, ?2, ?3, ?4) RETURNING id",
                    args![&name, &slug, stepid, &kind],
                )?;
                Ok((id, name.clone(), slug, kind.clone()))
            })
            .await?;
        self.events.emit("logs", id, "new", || {
            json!({ "logid": id, "stepid": stepid, "name": name, "slug": slug, "type": kind,
                    "complete": false, "num_lines": 0 })
        });
        Ok(id)
    }

    /// Appends a header line (the master's own words) to a log.
    pub async fn append_header(&self, logid: i64, text: impl AsRef<str>) -> anyhow::Result<()> {
        self.append_log(logid, vec![LineKind::Header.line(text.as_ref())])
            .await
    }

    /// Appends whole lines to a log, each in its stored form
    /// ([`LineKind::line`]).
    pub async fn append_log(&self, logid: i64, lines: Vec<String>) -> anyhow::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        // The lines go to the store and, when someone listens, to them.
        let listened = (self.events.subscribers() > 0).then(|| lines.clone());
        let method = self
            .log_compression
            .load(std::sync::atomic::Ordering::Relaxed);
        // Compressed before the transaction: the database is not held
        // while the chunk is made.
        let count = lines.len() as i64;
        let mut content = lines.join("\n");
        drop(lines);
        content.push('\n');
        let (code, bytes) = super::logcodec::compress(method, content.as_bytes());
        drop(content);
        let first = self.call(move |c| {
            let first: i64 = c.value("SELECT num_lines FROM logs WHERE id = ?1", args![logid])?;
            let last = first + count - 1;
            c.execute(
                "INSERT INTO logchunks (logid, first_line, last_line, content, compressed) VALUES (?1, ?2, ?3, ?4, ?5)",
                args![logid, first, last, bytes.as_slice(), code],
            )?;
            c.execute(
                "UPDATE logs SET num_lines = ?2 WHERE id = ?1",
                args![logid, last + 1],
            )?;
            Ok(first)
        })
        .await?;
        if let Some(lines) = listened {
            self.events.emit(
                "logs",
                logid,
                "append",
                || json!({ "logid": logid, "first_line": first, "lines": lines }),
            );
        }
        Ok(())
    }

    pub async fn finish_log(&self, logid: i64) -> anyhow::Result<()> {
        self.call(move |c| {
            c.execute("UPDATE logs SET complete = 1 WHERE id = ?1", args![logid])?;
            Ok(())
        })
        .await?;
        self.events.emit(
            "logs",
            logid,
            "finished",
            || json!({ "logid": logid, "complete": true }),
        );
        Ok(())
    }

    /// What made build `buildid` fail, for the push page's job panel: its
    /// worst step (by Buildbot's order of results; none when every step
    /// succeeded), that step's logs, and its first log's flagged lines
    /// (the `[kiln] flagged:` lines log rules wrote) or else its last
    /// `tail` lines of output.
    pub async fn failure_summary(
        &self,
        buildid: i64,
        tail: usize,
    ) -> anyhow::Result<Option<FailureSummary>> {
        self.call(move |c| {
            let steps = c.query(
                "SELECT id, number, name, results FROM steps
                 WHERE buildid = ?1 AND results IS NOT NULL ORDER BY number",
                args![buildid],
            )?;
            let mut worst: Option<(i64, i64, String, i64)> = None;
            for r in steps {
                let step: (i64, i64, String, i64) = (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
                if badness(step.3) > worst.as_ref().map_or(0, |w| badness(w.3)) {
                    worst = Some(step);
                }
            }
            let Some((stepid, number, name, results)) = worst else {
                return Ok(None);
            };
            let logs: Vec<(i64, String, String)> = c
                .query(
                    "SELECT id, name, type FROM logs WHERE stepid = ?1 ORDER BY id",
                    args![stepid],
                )?
                .iter()
                .map(|r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .collect::<anyhow::Result<_>>()?;
            let mut summary = FailureSummary {
                stepid,
                number,
                name,
                results,
                logs: logs
                    .iter()
                    .map(|(id, name, _)| (*id, name.clone()))
                    .collect(),
                flagged: false,
                lines: vec![],
                deleted: false,
            };
            let Some((logid, _, kind)) = logs.first() else {
                return Ok(Some(summary));
            };
            if kind == super::janitor::DELETED {
                summary.deleted = true;
                return Ok(Some(summary));
            }
            // The newest chunks hold the end of the output and the lines
            // the evaluation flagged (written when the command ended).
            let mut chunks: Vec<String> = c
                .query(
                    "SELECT compressed, content FROM logchunks WHERE logid = ?1
                     ORDER BY first_line DESC LIMIT 8",
                    args![logid],
                )?
                .iter()
                .map(|r| {
                    let bytes: Vec<u8> = r.get(1)?;
                    Ok(super::logcodec::text_of(r.get(0)?, &bytes))
                })
                .collect::<anyhow::Result<_>>()?;
            chunks.reverse();
            let text = chunks.concat();
            let stdio = kind == "s";
            let flagged: Vec<String> = text
                .lines()
                .filter_map(|l| {
                    l.strip_prefix(if stdio {
                        "h[kiln] flagged: "
                    } else {
                        "[kiln] flagged: "
                    })
                })
                .map(String::from)
                .collect();
            if flagged.is_empty() {
                let output: Vec<&str> = text
                    .lines()
                    .filter(|l| !stdio || !l.starts_with('h'))
                    .map(|l| if stdio { l.get(1..).unwrap_or("") } else { l })
                    .collect();
                let from = output.len().saturating_sub(tail);
                summary.lines = output[from..].iter().map(|l| l.to_string()).collect();
            } else {
                summary.flagged = true;
                summary.lines = flagged;
            }
            Ok(Some(summary))
        })
        .await
    }

    /// The whole text of a log.
    pub async fn log_text(&self, logid: i64) -> anyhow::Result<String> {
        self.call(move |c| {
            c.query(
                "SELECT compressed, content FROM logchunks WHERE logid = ?1 ORDER BY first_line",
                args![logid],
            )?
            .iter()
            .map(|r| {
                let bytes: Vec<u8> = r.get(1)?;
                Ok(super::logcodec::text_of(r.get(0)?, &bytes))
            })
            .collect()
        })
        .await
    }

    /// Gives a claimed request back (its build will not finish it).
    pub async fn unclaim_request(&self, brid: i64) -> anyhow::Result<()> {
        self.call(move |c| {
            c.execute(
                "DELETE FROM buildrequest_claims WHERE brid = ?1",
                args![brid],
            )?;
            Ok(())
        })
        .await
    }

    /// Builds of `masterid` that never finished (the master died): they
    /// end as RETRY and their requests are given back.
    pub async fn retry_unfinished_builds(&self, masterid: i64) -> anyhow::Result<Vec<i64>> {
        self.call(move |c| {
            let rows = c.query(
                "SELECT id, buildrequestid FROM builds WHERE masterid = ?1 AND complete_at IS NULL",
                args![masterid],
            )?;
            let mut ids = Vec::with_capacity(rows.len());
            for r in rows {
                let (id, brid): (i64, i64) = (r.get(0)?, r.get(1)?);
                c.execute(
                    "UPDATE builds SET complete_at = ?2, results = 5, state_string = 'retry: the master stopped' WHERE id = ?1",
                    args![id, now()],
                )?;
                c.execute("DELETE FROM buildrequest_claims WHERE brid = ?1", args![brid])?;
                ids.push(id);
            }
            // Nothing of this master runs as it starts: every claim it
            // holds on an incomplete request is left from before (a build
            // it claimed but had not yet started when it was killed, or a
            // request collapsed into a build that is now RETRY).
            c.execute(
                "DELETE FROM buildrequest_claims WHERE masterid = ?1
                 AND brid IN (SELECT id FROM buildrequests WHERE complete = 0)",
                args![masterid],
            )?;
            // Nor does it hold a lock.
            c.execute(
                "DELETE FROM lock_holders WHERE masterid = ?1",
                args![masterid],
            )?;
            Ok(ids)
        })
        .await
    }

    pub async fn builds_of_request(&self, brid: i64) -> anyhow::Result<Vec<BuildRow>> {
        self.call(move |c| {
            c.query(
                "SELECT id, number, builderid, buildrequestid, workerid, masterid, started_at, complete_at, state_string, results
                 FROM builds WHERE buildrequestid = ?1 ORDER BY id",
                args![brid],
            )?
            .iter()
            .map(|r| {
                let complete_at: Option<i64> = r.get(7)?;
                Ok(BuildRow {
                    buildid: r.get(0)?,
                    number: r.get(1)?,
                    builderid: r.get(2)?,
                    buildrequestid: r.get(3)?,
                    workerid: r.get(4)?,
                    masterid: r.get(5)?,
                    started_at: r.get(6)?,
                    complete_at,
                    complete: complete_at.is_some(),
                    state_string: r.get(8)?,
                    results: r.get(9)?,
                })
            })
            .collect()
        })
        .await
    }

    pub async fn steps_of_build(&self, buildid: i64) -> anyhow::Result<Vec<StepRow>> {
        self.call(move |c| {
            c.query(
                "SELECT id, number, name, buildid, results, state_string FROM steps WHERE buildid = ?1 ORDER BY number",
                args![buildid],
            )?
            .iter()
            .map(|r| {
                Ok(StepRow {
                    stepid: r.get(0)?,
                    number: r.get(1)?,
                    name: r.get(2)?,
                    buildid: r.get(3)?,
                    results: r.get(4)?,
                    state_string: r.get(5)?,
                })
            })
            .collect()
        })
        .await
    }

    /// The id of worker `name`, if it has ever connected.
    pub async fn worker_id(&self, name: &str) -> anyhow::Result<Option<i64>> {
        let name = name.to_string();
        self.call(move |c| c.value_opt("SELECT id FROM workers WHERE name = ?1", args![&name]))
            .await
    }
}

/// Sets (or replaces) a property of a build.
fn set_property(
    c: &mut dyn super::db::Sql,
    buildid: i64,
    name: &str,
    value_json: &str,
    source: &str,
) -> anyhow::Result<()> {
    c.execute(
        "INSERT INTO build_properties (buildid, name, value_json, source) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (buildid, name) DO UPDATE SET value_json = excluded.value_json, source = excluded.source",
        args![buildid, name, value_json, source],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::LineKind;

    #[test]
    fn a_line_reads_back_as_the_kind_and_text_it_was_stored_with() {
        for kind in [LineKind::Stdout, LineKind::Stderr, LineKind::Header] {
            for text in ["", "plain", "ünïcode ✓", "h looks like a prefix"] {
                let stored = kind.line(text);
                assert_eq!(LineKind::parse(&stored), Some((kind, text)));
            }
        }
        // Buildbot's stored letters, which the API and the page read.
        assert_eq!(LineKind::Stdout.line("x"), "ox");
        assert_eq!(LineKind::Stderr.line("x"), "ex");
        assert_eq!(LineKind::Header.line("x"), "hx");
        assert_eq!(LineKind::parse(""), None);
        assert_eq!(LineKind::parse("zx"), None);
        assert_eq!(LineKind::of_stream("stdout"), LineKind::Stdout);
        assert_eq!(LineKind::of_stream("stderr"), LineKind::Stderr);
        assert_eq!(LineKind::of_stream("header"), LineKind::Header);
    }
}

/// What made a build fail (see [`Store::failure_summary`]).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct FailureSummary {
    pub stepid: i64,
    pub number: i64,
    pub name: String,
    pub results: i64,
    /// The step's logs: id and name.
    pub logs: Vec<(i64, String)>,
    /// Whether `lines` are the lines log rules flagged (else the output's end).
    pub flagged: bool,
    pub lines: Vec<String>,
    /// Whether the janitor deleted the step's log (`lines` is then empty).
    pub deleted: bool,
}

/// How bad a result is, as a build's worst step is chosen: SUCCESS and
/// SKIPPED not at all, then WARNINGS, CANCELLED, RETRY, FAILURE, EXCEPTION.
pub fn badness(results: i64) -> u8 {
    match results {
        1 => 1,
        6 => 2,
        5 => 3,
        2 => 4,
        4 => 5,
        _ => 0,
    }
}
