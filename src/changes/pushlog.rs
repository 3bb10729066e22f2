//! Mozilla's pushlog (`json-pushes`) and how a poll's pushes become changes,
//! with the semantics of buildbotcustom's HgPoller. Pure functions; the
//! poller in `hg.rs` does the fetching and storing.

use anyhow::{bail, Context};
use serde_json::Value;

use crate::config::HgPoller;
use crate::store::{NewChange, Properties};

/// One changeset as a pushlog (or `hg log`) reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct Changeset {
    pub node: String,
    pub author: String,
    /// The named branch.
    pub branch: String,
    pub desc: String,
    pub files: Vec<String>,
}

/// One push: who pushed which changesets when.
#[derive(Clone, Debug, PartialEq)]
pub struct Push {
    pub id: Option<i64>,
    pub date: i64,
    pub user: String,
    pub changesets: Vec<Changeset>,
}

/// The strings in a JSON list field (none when it is missing or not a
/// list; entries that are not strings are passed over).
pub(super) fn str_list(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

fn str_field(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn parse_push(id: &str, v: &Value) -> anyhow::Result<Push> {
    let date = match v.get("date") {
        Some(Value::Number(n)) => n.as_f64().unwrap_or(0.0) as i64,
        // Some pushlogs give [seconds, offset].
        Some(Value::Array(a)) => a.first().and_then(Value::as_f64).unwrap_or(0.0) as i64,
        _ => bail!("push {id} has no date"),
    };
    let csets = v
        .get("changesets")
        .and_then(Value::as_array)
        .with_context(|| format!("push {id} has no changesets list"))?;
    let mut changesets = Vec::with_capacity(csets.len());
    for c in csets {
        let node = match c {
            // Without full=1 a pushlog lists bare nodes.
            Value::String(s) => s.clone(),
            _ => str_field(c, "node"),
        };
        if node.is_empty() {
            bail!("a changeset of push {id} has no node");
        }
        changesets.push(Changeset {
            node,
            author: str_field(c, "author"),
            branch: c
                .get("branch")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_string(),
            desc: str_field(c, "desc"),
            files: str_list(c, "files"),
        });
    }
    Ok(Push {
        id: id.parse().ok(),
        date,
        user: str_field(v, "user"),
        changesets,
    })
}

/// Parses a `json-pushes` answer in either form (version 1: a map of push
/// id to push; version 2: `{lastpushid, pushes}`), oldest push first.
pub fn parse(body: &str) -> anyhow::Result<Vec<Push>> {
    let v: Value = serde_json::from_str(body).context("the pushlog answer is not JSON")?;
    let map = match v.get("pushes") {
        Some(Value::Object(m)) => m,
        Some(_) => bail!("`pushes` in the pushlog answer is not a map"),
        None => match &v {
            Value::Object(m) => m,
            _ => bail!("the pushlog answer is not a map of pushes"),
        },
    };
    let mut pushes = map
        .iter()
        .map(|(id, p)| parse_push(id, p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    pushes.sort_by_key(|p| (p.date, p.id));
    Ok(pushes)
}

/// What a poll found: the changes to store (oldest first), the newest
/// changeset seen whatever its branch, and how many changesets the branch
/// filter skipped.
#[derive(Debug, Default, PartialEq)]
pub struct Selection {
    pub changes: Vec<NewChange>,
    pub newest: Option<String>,
    pub newest_push: Option<i64>,
    pub skipped_other_branches: usize,
    /// Changes left out because of `maxChanges`.
    pub dropped: usize,
}

fn wanted(cfg: &HgPoller, cs: &Changeset) -> bool {
    cfg.repo_branch.as_deref().map_or(true, |b| cs.branch == b)
}

fn new_change(cfg: &HgPoller, push: &Push, cs: &Changeset, files: Vec<String>) -> NewChange {
    let repo = cfg.repository();
    let src = "HgPoller".to_string();
    let mut properties = Properties::new();
    properties.insert(
        "changeset_author".into(),
        (Value::String(cs.author.clone()), src.clone()),
    );
    properties.insert(
        "named_branch".into(),
        (Value::String(cs.branch.clone()), src.clone()),
    );
    if let Some(id) = push.id {
        properties.insert("pushid".into(), (Value::from(id), src.clone()));
    }
    if let Some(name) = &cfg.store_rev {
        properties.insert(name.clone(), (Value::String(cs.node.clone()), src));
    }
    NewChange {
        author: if push.user.is_empty() {
            cs.author.clone()
        } else {
            push.user.clone()
        },
        committer: None,
        comments: cs.desc.clone(),
        // An empty `branch` (a poller of the repository itself) is Buildbot's None.
        branch: Some(cfg.branch.clone()).filter(|b| !b.is_empty()),
        revision: Some(cs.node.clone()),
        revlink: Some(format!("{}/rev/{}", repo.trim_end_matches('/'), cs.node)),
        when_timestamp: push.date,
        category: cfg.category.clone(),
        repository: repo,
        codebase: String::new(),
        project: cfg.project.clone().unwrap_or_default(),
        files,
        properties,
    }
}

/// Turns pushes (oldest first) into changes as the poller's options say:
/// walking back from the newest, changesets on other named branches are
/// skipped without counting, at most `maxChanges` changes are taken, and
/// with `tipsOnly` each push gives one change (its tip) carrying the union
/// of the push's files.
pub fn select(cfg: &HgPoller, pushes: &[Push]) -> Selection {
    let mut sel = Selection {
        newest: pushes
            .iter()
            .rev()
            .find_map(|p| p.changesets.last())
            .map(|c| c.node.clone()),
        newest_push: pushes.iter().filter_map(|p| p.id).max(),
        ..Selection::default()
    };
    let max = cfg.max_changes as usize;
    let mut out: Vec<NewChange> = Vec::new();
    for push in pushes.iter().rev() {
        let ours: Vec<&Changeset> = push.changesets.iter().filter(|c| wanted(cfg, c)).collect();
        sel.skipped_other_branches += push.changesets.len() - ours.len();
        if cfg.tips_only {
            let Some(tip) = ours.last() else { continue };
            if out.len() >= max {
                sel.dropped += 1;
                continue;
            }
            let mut files: Vec<String> = Vec::new();
            for c in &ours {
                for f in &c.files {
                    if !files.contains(f) {
                        files.push(f.clone());
                    }
                }
            }
            out.push(new_change(cfg, push, tip, files));
        } else {
            for c in ours.iter().rev() {
                if out.len() >= max {
                    sel.dropped += 1;
                    continue;
                }
                out.push(new_change(cfg, push, c, c.files.clone()));
            }
        }
    }
    out.reverse();
    sel.changes = out;
    sel
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poller() -> HgPoller {
        HgPoller {
            hg_url: "https://hg.example.org/".into(),
            branch: "projects/cedar".into(),
            pushlog_url_override: None,
            tips_only: false,
            max_changes: 100,
            repo_branch: Some("default".into()),
            poll_interval: 60,
            store_rev: None,
            category: None,
            project: None,
            origin: None,
        }
    }

    const V1: &str = r#"{
      "12": {"date": 200, "user": "pusher@m.org", "changesets": [
          {"node": "c3", "author": "C <c@x>", "branch": "default", "desc": "three", "files": ["x.c", "y.c"], "tags": []},
          {"node": "c4", "author": "D <d@x>", "branch": "GECKO_1", "desc": "four", "files": ["z.c"], "tags": []},
          {"node": "c5", "author": "E <e@x>", "branch": "default", "desc": "five", "files": ["x.c", "w.c"], "tags": []}]},
      "11": {"date": 100, "user": "other@m.org", "changesets": [
          {"node": "c1", "author": "A <a@x>", "branch": "default", "desc": "one", "files": ["a"], "tags": []},
          {"node": "c2", "author": "B <b@x>", "branch": "default", "desc": "two", "files": ["b"], "tags": []}]}
    }"#;

    #[test]
    fn both_answer_forms_parse_to_pushes_in_date_order() {
        let v1 = parse(V1).unwrap();
        let v2 = parse(&format!(r#"{{"lastpushid": 12, "pushes": {V1}}}"#)).unwrap();
        assert_eq!(v1, v2);
        assert_eq!(
            v1.iter().map(|p| p.id).collect::<Vec<_>>(),
            [Some(11), Some(12)]
        );
        assert_eq!(v1[1].changesets.len(), 3);
        assert!(parse("{\"1\": {\"date\": 1}}").is_err());
        assert!(parse("[1, 2").is_err());
    }

    #[test]
    fn each_changeset_becomes_a_change_with_the_pusher_as_author() {
        let sel = select(&poller(), &parse(V1).unwrap());
        let revs = revisions(&sel);
        assert_eq!(revs, ["c1", "c2", "c3", "c5"]);
        assert_eq!(sel.skipped_other_branches, 1);
        assert_eq!(sel.newest.as_deref(), Some("c5"));
        assert_eq!(sel.newest_push, Some(12));
        let c3 = &sel.changes[2];
        assert_eq!(c3.author, "pusher@m.org");
        assert_eq!(c3.branch.as_deref(), Some("projects/cedar"));
        assert_eq!(c3.when_timestamp, 200);
        assert_eq!(
            c3.revlink.as_deref(),
            Some("https://hg.example.org/projects/cedar/rev/c3")
        );
        assert_eq!(c3.properties["changeset_author"].0, "C <c@x>");
        assert_eq!(c3.properties["pushid"].0, 12);
    }

    #[test]
    fn tips_only_gives_one_change_per_push_with_all_its_files() {
        let mut cfg = poller();
        cfg.tips_only = true;
        let sel = select(&cfg, &parse(V1).unwrap());
        assert_eq!(sel.changes.len(), 2);
        assert_eq!(sel.changes[1].revision.as_deref(), Some("c5"));
        assert_eq!(sel.changes[1].files, ["x.c", "y.c", "w.c"]);
        assert_eq!(sel.changes[0].files, ["a", "b"]);
    }

    fn revisions(sel: &Selection) -> Vec<String> {
        sel.changes
            .iter()
            .map(|c| c.revision.clone().unwrap_or_default())
            .collect()
    }

    #[test]
    fn max_changes_keeps_the_newest_and_other_branches_do_not_count() {
        let mut cfg = poller();
        cfg.max_changes = 2;
        let sel = select(&cfg, &parse(V1).unwrap());
        let revs = revisions(&sel);
        assert_eq!(revs, ["c3", "c5"]);
        assert_eq!(sel.dropped, 2);
        cfg.repo_branch = None;
        let sel = select(&cfg, &parse(V1).unwrap());
        let revs = revisions(&sel);
        assert_eq!(revs, ["c4", "c5"]);
    }
}

/// Property-based checks: any answer a pushlog server gives is parsed or
/// refused, never a panic; well-formed ones keep every changeset, oldest
/// push first. `PROPTEST_CASES=N` runs more (bench/fuzz.sh).
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;

    /// Any JSON, its keys mostly the pushlog's own.
    fn json() -> impl Strategy<Value = Value> {
        let key = prop_oneof![
            prop::sample::select(vec![
                "pushes",
                "lastpushid",
                "date",
                "user",
                "changesets",
                "node",
                "author",
                "desc",
                "files",
                "branch",
                "tags",
                "1",
                "2",
            ])
            .prop_map(String::from),
            ".{0,6}",
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(5, 96, 8, move |inner| {
            prop_oneof![
                vec(inner.clone(), 0..6).prop_map(Value::Array),
                vec((key.clone(), inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn fuzz_parse_takes_any_text(body in ".{0,300}") {
            let _ = parse(&body);
        }

        #[test]
        fn fuzz_parse_takes_any_json(v in json()) {
            let _ = parse(&v.to_string());
            let _ = parse(&serde_json::json!({ "lastpushid": 3, "pushes": v }).to_string());
        }

        #[test]
        fn fuzz_well_formed_pushes_keep_every_changeset_oldest_first(
            pushes in btree_map(1i64..100_000, (0i64..4_000_000_000, "[a-z]{1,8}", vec("[0-9a-f]{40}", 1..4)), 0..12),
            v2 in any::<bool>(),
        ) {
            let map: serde_json::Map<String, Value> = pushes
                .iter()
                .map(|(id, (date, user, nodes))| {
                    let csets: Vec<Value> = nodes
                        .iter()
                        .map(|n| serde_json::json!({ "node": n, "author": user, "desc": "Bug 1", "files": ["a.c"], "branch": "default" }))
                        .collect();
                    (id.to_string(), serde_json::json!({ "date": date, "user": user, "changesets": csets }))
                })
                .collect();
            let body = if v2 {
                serde_json::json!({ "lastpushid": pushes.keys().max().copied().unwrap_or(0), "pushes": map })
            } else {
                Value::Object(map)
            };
            let parsed = parse(&body.to_string()).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
            prop_assert_eq!(parsed.len(), pushes.len());
            prop_assert!(parsed.windows(2).all(|w| (w[0].date, w[0].id) <= (w[1].date, w[1].id)));
            let count: usize = parsed.iter().map(|p| p.changesets.len()).sum();
            prop_assert_eq!(count, pushes.values().map(|p| p.2.len()).sum::<usize>());
        }
    }
}
