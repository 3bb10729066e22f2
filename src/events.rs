//! The master's event stream: what the store records, as it records it.
//!
//! Every write the flow makes (a change, a buildset and its requests, a
//! build, a step, log lines, a worker connecting, a reload) goes through
//! [`crate::store::Store`], which publishes an [`Event`] here after the
//! write has committed. The web page and API clients read them from
//! `GET /api/v2/events` (server-sent events), so what they see is never
//! ahead of what a read of the API would return.
//!
//! Publishing costs nothing measurable when nobody listens: the event's
//! body is only built when there is a subscriber. A subscriber that falls
//! more than [`CAPACITY`] events behind is told so (`lagged`) and should
//! read the API afresh.

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast;

/// How many events a slow subscriber may fall behind before it lags.
pub const CAPACITY: usize = 4096;

/// One thing that happened, named like Buildbot's routing keys: the
/// collection (`builds`), the item's id, and what happened to it (`new`,
/// `finished`, ...). `data` is the item's fields as the read API names them
/// (only those the event changes, for frequent events).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Event {
    pub topic: &'static str,
    pub id: i64,
    pub event: &'static str,
    pub data: Value,
}

/// What another master is told of an event (the PostgreSQL backend sends
/// it with NOTIFY): which item, not its fields, which it reads itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Note {
    pub topic: &'static str,
    pub id: i64,
    pub event: &'static str,
}

/// The publishing side; cheap to clone.
#[derive(Clone)]
pub struct Events {
    tx: broadcast::Sender<Arc<Event>>,
    /// Where every event is also sent, listened to or not (other masters).
    fanout: Option<tokio::sync::mpsc::UnboundedSender<Note>>,
}

impl Default for Events {
    fn default() -> Self {
        Events::new()
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Events({} subscribers)", self.tx.receiver_count())
    }
}

impl Events {
    pub fn new() -> Events {
        let (tx, _) = broadcast::channel(CAPACITY);
        Events { tx, fanout: None }
    }

    /// Events that are also sent, as [`Note`]s, to `fanout`.
    pub fn with_fanout(fanout: tokio::sync::mpsc::UnboundedSender<Note>) -> Events {
        let (tx, _) = broadcast::channel(CAPACITY);
        Events {
            tx,
            fanout: Some(fanout),
        }
    }

    /// Publishes an event; `data` is only called when someone listens.
    pub fn emit(
        &self,
        topic: &'static str,
        id: i64,
        event: &'static str,
        data: impl FnOnce() -> Value,
    ) {
        if let Some(f) = &self.fanout {
            // A log's lines stay on this master; the others read the log.
            if !(topic == "logs" && event == "append") {
                let _ = f.send(Note { topic, id, event });
            }
        }
        self.emit_here(topic, id, event, data);
    }

    /// Publishes an event to this master's subscribers only (one another
    /// master sent).
    pub fn emit_here(
        &self,
        topic: &'static str,
        id: i64,
        event: &'static str,
        data: impl FnOnce() -> Value,
    ) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        let _ = self.tx.send(Arc::new(Event {
            topic,
            id,
            event,
            data: data(),
        }));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }
}

/// Which events a subscriber wants: some topics (all when empty), and the
/// lines of some logs (log lines are sent only to those who ask for that
/// log; everyone else gets the other log events).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    pub topics: Vec<String>,
    pub logs: Vec<i64>,
}

impl Filter {
    /// From the query `topics=builds,steps&logs=12,13`; an unknown topic is
    /// an error naming the known ones.
    pub fn parse(topics: Option<&str>, logs: Option<&str>) -> Result<Filter, String> {
        let mut f = Filter::default();
        for t in topics
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            if !TOPICS.contains(&t) {
                return Err(format!(
                    "unknown topic `{t}`: the topics are {}",
                    TOPICS.join(", ")
                ));
            }
            f.topics.push(t.to_string());
        }
        for l in logs
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty())
        {
            let id = l
                .parse::<i64>()
                .map_err(|_| format!("`{l}` in `logs` is not a log id"))?;
            f.logs.push(id);
        }
        Ok(f)
    }

    pub fn wants(&self, e: &Event) -> bool {
        if e.topic == "logs" && e.event == "append" {
            return self.logs.contains(&e.id);
        }
        self.topics.is_empty() || self.topics.iter().any(|t| t == e.topic)
    }
}

/// The topics events are published under.
pub const TOPICS: &[&str] = &[
    "changes",
    "buildsets",
    "buildrequests",
    "builds",
    "steps",
    "logs",
    "workers",
    "masters",
    "reloads",
    "locks",
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn nothing_is_built_without_a_subscriber_and_subscribers_get_what_they_asked_for() {
        let ev = Events::new();
        let mut built = false;
        ev.emit("builds", 1, "new", || {
            built = true;
            json!({})
        });
        assert!(!built, "no subscriber: the body is not built");

        let mut rx = ev.subscribe();
        ev.emit("builds", 2, "finished", || json!({ "results": 0 }));
        ev.emit("logs", 7, "append", || json!({ "lines": ["x"] }));
        let first = rx.recv().await.expect("event");
        assert_eq!(
            (first.topic, first.id, first.event),
            ("builds", 2, "finished")
        );

        let only_builds = Filter::parse(Some("builds"), None).expect("filter");
        assert!(only_builds.wants(&first));
        let log_line = rx.recv().await.expect("event");
        assert!(
            !only_builds.wants(&log_line),
            "lines only for who asks for the log"
        );
        assert!(Filter::parse(None, Some("7"))
            .expect("filter")
            .wants(&log_line));
        assert!(!Filter::parse(Some("steps"), None).expect("f").wants(&first));
        let err = Filter::parse(Some("bulds"), None).expect_err("unknown topic");
        assert!(err.contains("`bulds`") && err.contains("builds"), "{err}");
        assert!(Filter::parse(None, Some("x")).is_err());
    }
}
