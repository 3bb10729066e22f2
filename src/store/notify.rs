//! Events across masters on PostgreSQL: what one master's store commits,
//! the others hear at once. Each event is also sent, as a small note (the
//! item, not its fields), with `NOTIFY kiln_events`; each master LISTENs on
//! a connection of its own, reads the item from the database and publishes
//! it to its own subscribers, and tells the master (new changes for its
//! schedulers, requests for its distributor). A master does not hear its
//! own notes.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::{broadcast, mpsc};

use super::api::Collection;
use super::db::args;
use super::Store;
use crate::events::{Note, TOPICS};

/// The channel every master of a database NOTIFYs and LISTENs on.
pub const CHANNEL: &str = "kiln_events";

/// The event kinds a note may carry.
const KINDS: &[&str] = &[
    "new",
    "started",
    "finished",
    "claimed",
    "unclaimed",
    "complete",
    "connected",
    "disconnected",
    "applied",
    "failed",
    "stopped",
    "dead",
    "released",
];

/// The channel a master asks another to stop a build on.
pub const CONTROL: &str = "kiln_control";

/// What the other masters did, as this master hears it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Remote {
    Note(Note),
    /// A master asks master `master` to stop build `build` (a user's stop
    /// or cancel sent to another master than the one running it).
    Stop {
        master: i64,
        build: i64,
        reason: String,
    },
    /// The listening connection was (re)made: notes sent meanwhile are
    /// lost, so whoever waits on them should look at the database again.
    Listening,
}

fn payload(origin: &str, n: &Note) -> String {
    json!({ "o": origin, "t": n.topic, "i": n.id, "e": n.event }).to_string()
}

/// A note another master sent (`None` for this master's own, or one this
/// kiln does not know).
fn parse(origin: &str, text: &str) -> Option<Note> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    if v["o"].as_str()? == origin {
        return None;
    }
    let topic = *TOPICS.iter().find(|t| Some(**t) == v["t"].as_str())?;
    let event = *KINDS.iter().find(|k| Some(**k) == v["e"].as_str())?;
    Some(Note {
        topic,
        id: v["i"].as_i64()?,
        event,
    })
}

/// A stop request sent on [`CONTROL`].
fn parse_stop(text: &str) -> Option<Remote> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    Some(Remote::Stop {
        master: v["master"].as_i64()?,
        build: v["stop"].as_i64()?,
        reason: v["reason"]
            .as_str()
            .unwrap_or("no reason given")
            .to_string(),
    })
}

/// Sends this master's notes, a batch per statement, until the store is
/// dropped. A database that cannot be reached loses the notes of that
/// moment (the other masters' periodic looks find the rows anyway).
pub(super) async fn notifier(
    pool: deadpool_postgres::Pool,
    origin: String,
    mut notes: mpsc::UnboundedReceiver<Note>,
) {
    while let Some(first) = notes.recv().await {
        let mut batch = vec![payload(&origin, &first)];
        while batch.len() < 512 {
            match notes.try_recv() {
                Ok(n) => batch.push(payload(&origin, &n)),
                Err(_) => break,
            }
        }
        let sent = async {
            let c = pool.get().await?;
            c.execute(
                "SELECT pg_notify('kiln_events', x) FROM unnest($1::text[]) AS x",
                &[&batch],
            )
            .await?;
            anyhow::Ok(())
        };
        if let Err(e) = sent.await {
            tracing::warn!(
                "cannot tell the other masters of {} event(s): {e:#}",
                batch.len()
            );
        }
    }
}

/// Listens for the other masters' notes as long as the process runs,
/// reconnecting with backoff; each note's item is read and published to
/// this master's subscribers and sent on `out`.
pub(super) async fn listener(
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    origin: String,
    store: Store,
    out: broadcast::Sender<Remote>,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let once = match &tls {
            None => listen_once(&config, tokio_postgres::NoTls, &origin, &store, &out).await,
            Some(tls) => listen_once(&config, tls.clone(), &origin, &store, &out).await,
        };
        match once {
            Ok(()) => backoff = Duration::from_millis(500),
            Err(e) => {
                tracing::warn!(
                    "not hearing the other masters ({e:#}); trying again in {} ms",
                    backoff.as_millis()
                );
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// One listening connection, until it fails.
async fn listen_once<T>(
    config: &tokio_postgres::Config,
    tls: T,
    origin: &str,
    store: &Store,
    out: &broadcast::Sender<Remote>,
) -> anyhow::Result<()>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, mut conn) = config.connect(tls).await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, String)>();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    if tx
                        .send((n.channel().to_string(), n.payload().to_string()))
                        .is_err()
                    {
                        return Ok(());
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    client
        .batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {CONTROL}"))
        .await?;
    let _ = out.send(Remote::Listening);
    while let Some((channel, text)) = rx.recv().await {
        if channel == CONTROL {
            if let Some(stop) = parse_stop(&text) {
                let _ = out.send(stop);
            }
            continue;
        }
        let Some(note) = parse(origin, &text) else {
            continue;
        };
        store.republish(note).await;
        let _ = out.send(Remote::Note(note));
    }
    drop(client);
    match driver.await {
        Ok(Err(e)) => Err(e.into()),
        _ => Err(anyhow::anyhow!("the listening connection closed")),
    }
}

impl Store {
    /// Publishes another master's event to this master's subscribers, with
    /// the item as the read API shows it now.
    async fn republish(&self, n: Note) {
        if (n.topic, n.event) == ("changes", "new") {
            match self.get_change(n.id).await {
                Ok(Some(c)) => self.bus.publish(std::slice::from_ref(&c)),
                Ok(None) => {}
                Err(e) => tracing::warn!("cannot read change {}: {e:#}", n.id),
            }
        }
        if self.events.subscribers() == 0 {
            return;
        }
        let collection = match n.topic {
            "changes" => Collection::Changes,
            "buildsets" => Collection::Buildsets,
            "buildrequests" => Collection::BuildRequests,
            "builds" => Collection::Builds,
            "steps" => Collection::Steps,
            "logs" => Collection::Logs,
            "workers" => Collection::Workers,
            "masters" => Collection::Masters,
            _ => {
                self.events
                    .emit_here(n.topic, n.id, n.event, || json!({ "id": n.id }));
                return;
            }
        };
        let (_, key) = collection.names();
        let row = match self
            .api_rows(collection, Some((key, serde_json::Value::from(n.id))))
            .await
        {
            Ok((_, rows)) => rows.into_iter().next(),
            Err(e) => {
                tracing::debug!("cannot read {} {}: {e:#}", n.topic, n.id);
                None
            }
        };
        if let Some(row) = row {
            self.events
                .emit_here(n.topic, n.id, n.event, || serde_json::Value::Object(row));
        }
    }

    /// Asks the master that runs build `buildid`, when it is another live
    /// master than `me`, to stop it; that master's name, or `None` when no
    /// other master runs it (or the database is not shared).
    pub async fn ask_to_stop(
        &self,
        buildid: i64,
        me: i64,
        reason: &str,
    ) -> anyhow::Result<Option<String>> {
        if self.remote.is_none() {
            return Ok(None);
        }
        let reason = reason.to_string();
        self.call(move |c| {
            let Some(r) = c.query_opt(
                "SELECT b.masterid, m.name FROM builds b JOIN masters m ON m.id = b.masterid
                 WHERE b.id = ?1 AND b.complete_at IS NULL AND m.active = 1",
                args![buildid],
            )?
            else {
                return Ok(None);
            };
            let (masterid, name): (i64, String) = (r.get(0)?, r.get(1)?);
            if masterid == me {
                return Ok(None);
            }
            let payload = json!({ "stop": buildid, "master": masterid, "reason": reason });
            // Sent when this transaction commits.
            c.execute(
                "SELECT pg_notify('kiln_control', ?1)",
                args![payload.to_string()],
            )?;
            Ok(Some(name))
        })
        .await
    }

    /// The build running request `brid`, if one does.
    pub async fn running_build_of(&self, brid: i64) -> anyhow::Result<Option<i64>> {
        self.call(move |c| {
            c.value_opt(
                "SELECT id FROM builds WHERE buildrequestid = ?1 AND complete_at IS NULL ORDER BY id DESC LIMIT 1",
                args![brid],
            )
        })
        .await
    }

    /// What the other masters did, when the store is shared (PostgreSQL).
    pub fn remote(&self) -> Option<broadcast::Receiver<Remote>> {
        self.remote.as_ref().map(|r| r.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_reads_back_unless_it_is_our_own_or_unknown() {
        let n = Note {
            topic: "buildrequests",
            id: 7,
            event: "new",
        };
        let text = payload("a", &n);
        assert_eq!(parse("b", &text), Some(n));
        assert_eq!(parse("a", &text), None);
        assert_eq!(parse("b", r#"{"o":"a","t":"nope","i":1,"e":"new"}"#), None);
        assert_eq!(
            parse("b", r#"{"o":"a","t":"builds","i":1,"e":"exploded"}"#),
            None
        );
        assert_eq!(parse("b", "not json"), None);
        assert_eq!(
            parse_stop(r#"{"stop":4,"master":2,"reason":"by ann"}"#),
            Some(Remote::Stop {
                master: 2,
                build: 4,
                reason: "by ann".into()
            })
        );
        assert_eq!(parse_stop(r#"{"stop":"x","master":2}"#), None);
    }
}
