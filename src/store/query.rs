//! A list query of the read API, typed: Buildbot's data API conventions
//! (`field=value`, repeated for any of them; `field__ne|lt|le|gt|ge|contains`;
//! `order=field,-field`; `limit`; `offset`; `field=name` projection).
//!
//! The HTTP layer only parses the query string into a [`ListQuery`]; the store
//! answers it, in SQL when every part of it can be said there with the
//! API's meaning (an index answers `builds?order=-buildid&limit=100`
//! without reading every build), else by reading the rows and filtering
//! them here. No SQL is ever made of user text: fields are matched
//! against the collection's known columns and values travel as arguments.

use std::cmp::Ordering;

use super::db::{Dialect, Value as SqlValue};
use serde_json::{Map, Value};

use super::api::{field_of, Select};

/// An item of a collection, as the API shows it.
pub type Row = Map<String, Value>;

/// A filter's comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Contains,
}

impl Op {
    /// The operator of a `field__op` parameter.
    pub fn parse(op: &str) -> Option<Op> {
        Some(match op {
            "eq" => Op::Eq,
            "ne" => Op::Ne,
            "lt" => Op::Lt,
            "le" => Op::Le,
            "gt" => Op::Gt,
            "ge" => Op::Ge,
            "contains" => Op::Contains,
            _ => return None,
        })
    }
}

/// `field op value` for any of `values`.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldFilter {
    pub field: String,
    pub op: Op,
    pub values: Vec<String>,
}

/// What a query asks of a list.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ListQuery {
    /// Every filter must hold.
    pub filters: Vec<FieldFilter>,
    /// (field, descending), in order of precedence.
    pub order: Vec<(String, bool)>,
    pub limit: Option<usize>,
    pub offset: usize,
    /// The fields to show; all when empty.
    pub fields: Vec<String>,
}

impl ListQuery {
    /// Parses a query string's pairs; a field not in `known` or an
    /// unknown operator is an error naming what is allowed.
    pub fn parse(params: &[(String, String)], known: &[String]) -> Result<ListQuery, String> {
        let mut q = ListQuery::default();
        let check = |f: &str| {
            if known.iter().any(|k| k == f) {
                Ok(())
            } else {
                Err(format!(
                    "unknown field `{f}`; the fields are {}",
                    known.join(", ")
                ))
            }
        };
        for (k, v) in params {
            match k.as_str() {
                "order" => {
                    for part in v.split(',').filter(|p| !p.is_empty()) {
                        let (name, desc) = match part.strip_prefix('-') {
                            Some(n) => (n, true),
                            None => (part, false),
                        };
                        check(name)?;
                        q.order.push((name.to_string(), desc));
                    }
                }
                "limit" => {
                    q.limit = Some(
                        v.parse()
                            .map_err(|_| format!("`limit` must be a number, not {v:?}"))?,
                    )
                }
                "offset" => {
                    q.offset = v
                        .parse()
                        .map_err(|_| format!("`offset` must be a number, not {v:?}"))?
                }
                "field" => {
                    for f in v.split(',').filter(|p| !p.is_empty()) {
                        check(f)?;
                        q.fields.push(f.to_string());
                    }
                }
                _ => {
                    let (name, op) = match k.rsplit_once("__") {
                        Some((n, op)) => (n, op),
                        None => (k.as_str(), "eq"),
                    };
                    let Some(op) = Op::parse(op) else {
                        return Err(format!(
                            "unknown operator `__{op}`; use __eq, __ne, __lt, __le, __gt, __ge or __contains"
                        ));
                    };
                    check(name)?;
                    // Repeated `eq` and `contains` mean any of the values;
                    // the others each narrow further.
                    match q.filters.iter_mut().find(|f| {
                        f.field == name && f.op == op && matches!(op, Op::Eq | Op::Contains)
                    }) {
                        Some(f) => f.values.push(v.clone()),
                        None => q.filters.push(FieldFilter {
                            field: name.to_string(),
                            op,
                            values: vec![v.clone()],
                        }),
                    }
                }
            }
        }
        Ok(q)
    }

    /// Only the fields asked for (all when none were).
    pub fn project(&self, mut row: Row) -> Value {
        if !self.fields.is_empty() {
            row.retain(|k, _| self.fields.contains(k));
        }
        Value::Object(row)
    }

    /// Filters, orders (then by `id`) and pages `rows` here; returns the
    /// page and the total before paging.
    pub fn apply(&self, rows: Vec<Row>, id: &str) -> (Vec<Row>, usize) {
        let mut rows: Vec<Row> = rows
            .into_iter()
            .filter(|r| self.filters.iter().all(|f| keep(r, f)))
            .collect();
        let order = if self.order.is_empty() {
            vec![(id.to_string(), false)]
        } else {
            self.order.clone()
        };
        rows.sort_by(|a, b| {
            for (name, desc) in &order {
                let o = order_values(
                    a.get(name).unwrap_or(&Value::Null),
                    b.get(name).unwrap_or(&Value::Null),
                );
                let o = if *desc { o.reverse() } else { o };
                if o != Ordering::Equal {
                    return o;
                }
            }
            Ordering::Equal
        });
        let total = rows.len();
        let page = rows
            .into_iter()
            .skip(self.offset)
            .take(self.limit.unwrap_or(usize::MAX))
            .collect();
        (page, total)
    }

    /// The whole query as one SQL read over a collection with these column
    /// aliases, narrowed by `pre` (a path's own filter), when every filter
    /// and order can be said in SQL with the meaning [`ListQuery::apply`]
    /// gives it.
    pub(super) fn select(
        &self,
        columns: &[String],
        pre: &Option<(&str, Value)>,
        dialect: Dialect,
    ) -> Option<Select> {
        let alias = |field: &str| columns.iter().find(|a| field_of(a) == field).cloned();
        let mut sel = Select {
            limit: self.limit,
            offset: self.offset,
            ..Default::default()
        };
        if let Some((field, v)) = pre {
            let arg = match v {
                Value::Number(n) => SqlValue::Int(n.as_i64()?),
                Value::String(s) => SqlValue::Text(s.clone()),
                _ => return None,
            };
            sel.conditions
                .push((format!("\"{}\" = ?", alias(field)?), vec![arg]));
        }
        for f in &self.filters {
            sel.conditions
                .push(filter_sql(&alias(&f.field)?, f, dialect)?);
        }
        for (field, desc) in &self.order {
            let a = alias(field)?;
            if a.ends_with("__json") {
                return None;
            }
            sel.order.push((a, *desc));
        }
        Some(sel)
    }
}

/// How `value` compares with a query's text.
fn compare(value: &Value, text: &str) -> Option<Ordering> {
    match value {
        Value::Number(n) => n.as_f64()?.partial_cmp(&text.parse::<f64>().ok()?),
        Value::Bool(b) => Some(b.cmp(&bool_text(text)?)),
        Value::String(s) => Some(s.as_str().cmp(text)),
        Value::Null => (text == "null" || text.is_empty()).then_some(Ordering::Equal),
        _ => None,
    }
}

fn contains(value: &Value, text: &str) -> bool {
    match value {
        Value::String(s) => s.contains(text),
        Value::Array(a) => a.iter().any(|v| compare(v, text) == Some(Ordering::Equal)),
        _ => false,
    }
}

fn keep(row: &Row, f: &FieldFilter) -> bool {
    let v = row.get(&f.field).unwrap_or(&Value::Null);
    f.values.iter().any(|text| match f.op {
        Op::Contains => contains(v, text),
        op => {
            let Some(o) = compare(v, text) else {
                return op == Op::Ne;
            };
            match op {
                Op::Eq => o == Ordering::Equal,
                Op::Ne => o != Ordering::Equal,
                Op::Lt => o == Ordering::Less,
                Op::Le => o != Ordering::Greater,
                Op::Gt => o == Ordering::Greater,
                Op::Ge | Op::Contains => o != Ordering::Less,
            }
        }
    })
}

fn order_values(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x
            .as_f64()
            .partial_cmp(&y.as_f64())
            .unwrap_or(Ordering::Equal),
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Null, Value::Null) => Ordering::Equal,
        (Value::Null, _) => Ordering::Less,
        (_, Value::Null) => Ordering::Greater,
        _ => Ordering::Equal,
    }
}

/// A query argument as SQLite should compare it: an integer or a real
/// when the text is a number (so a numeric column compares numerically
/// and a text column as text, as the API does), else text.
fn sql_arg(text: &str) -> SqlValue {
    if let Ok(i) = text.parse::<i64>() {
        SqlValue::Int(i)
    } else if let Ok(f) = text.parse::<f64>() {
        SqlValue::Real(f)
    } else {
        SqlValue::Text(text.to_string())
    }
}

fn bool_text(text: &str) -> Option<bool> {
    match text {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// One filter as SQL with exactly the meaning [`keep`] gives it, or `None`
/// when SQL would mean something else (then the rows are filtered here).
/// `alias` is one of the collection's own column names, never user text.
fn filter_sql(alias: &str, f: &FieldFilter, dialect: Dialect) -> Option<(String, Vec<SqlValue>)> {
    if alias.ends_with("__json") {
        return None;
    }
    let is_bool = alias.ends_with("__bool");
    let col = format!("\"{alias}\"");
    let mut parts = Vec::new();
    let mut args = Vec::new();
    for text in &f.values {
        let numeric = text.parse::<f64>().is_ok();
        let arg = if is_bool {
            SqlValue::Int(bool_text(text)? as i64)
        } else {
            sql_arg(text)
        };
        let null_text = !is_bool && (text.is_empty() || text == "null");
        // Text compares as text with any column, as SQLite's affinity has
        // it; PostgreSQL is told so (a number column would refuse it).
        let col = if dialect == Dialect::Postgres && !numeric && !is_bool {
            format!("CAST({col} AS TEXT)")
        } else {
            col.clone()
        };
        let part = match f.op {
            Op::Contains if is_bool || numeric => return None,
            Op::Contains if dialect == Dialect::Postgres => format!("strpos({col}, ?) > 0"),
            Op::Contains => format!("instr({col}, ?) > 0"),
            Op::Eq if null_text => format!("({col} IS NULL OR {col} = ?)"),
            Op::Eq => format!("{col} = ?"),
            Op::Ne if null_text => format!("({col} IS NOT NULL AND {col} != ?)"),
            Op::Ne => format!("({col} IS NULL OR {col} != ?)"),
            _ if !numeric && !is_bool => return None,
            Op::Lt => format!("{col} < ?"),
            Op::Le => format!("{col} <= ?"),
            Op::Gt => format!("{col} > ?"),
            Op::Ge => format!("{col} >= ?"),
        };
        parts.push(part);
        args.push(arg);
    }
    Some((parts.join(" OR "), args))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::api::Collection;
    use crate::store::buildsets::{NewBuildset, Source, SourceStamp};
    use crate::store::NewChange;

    /// Every query below, read in SQL and filtered here, gives the same
    /// items in the same order and the same total.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sql_reads_mean_what_the_in_memory_filters_mean() {
        for (store, _db) in crate::store::testing::each_backend().await {
            let master = store.master_started("m").await.expect("master");
            for (i, author) in ["ann <a@x>", "bob <b@x>", "ann <a@x>", "cy"]
                .iter()
                .enumerate()
            {
                let ch = NewChange {
                    author: author.to_string(),
                    comments: format!("change {i}"),
                    branch: (i != 3).then(|| "main".to_string()),
                    revision: Some(format!("{}", 100 + i)),
                    when_timestamp: 1000 + i as i64,
                    ..NewChange::default()
                };
                store
                    .add_changes("test", vec![ch], vec![])
                    .await
                    .expect("change");
            }
            for i in 0..7 {
                let bs = store
                    .add_buildset(NewBuildset {
                        scheduler: "s".into(),
                        reason: "r".into(),
                        external_idstring: None,
                        source: Source::New(vec![SourceStamp::default()]),
                        properties: Default::default(),
                        builders: vec![if i % 2 == 0 { "linux" } else { "win" }.to_string()],
                        priority: 0,
                        parent_buildid: None,
                    })
                    .await
                    .expect("buildset");
                let r = &bs.brids[0];
                store.claim_request(r.brid, master).await.expect("claim");
                let (id, _) = store
                    .new_build(r.builderid, r.brid, None, master, Default::default())
                    .await
                    .expect("build");
                if i < 5 {
                    store
                        .finish_build(
                            id,
                            (i % 3) as i64,
                            "done",
                            crate::store::builds::Claimed::Complete(vec![]),
                        )
                        .await
                        .expect("finish");
                }
            }
            let queries: &[(Collection, &str)] = &[
                (Collection::Builds, "limit=3"),
                (Collection::Builds, "order=-buildid&limit=2&offset=1"),
                (Collection::Builds, "results=1"),
                (Collection::Builds, "results=0&results=2&order=-number"),
                (Collection::Builds, "results__ne=0"),
                (Collection::Builds, "results=null"),
                (Collection::Builds, "results__lt=2&order=builderid,-buildid"),
                (Collection::Builds, "complete=false"),
                (Collection::Builds, "complete=true&limit=2"),
                (Collection::Builds, "buildid__gt=2&buildid__le=6"),
                (Collection::Builds, "state_string__contains=on"),
                (Collection::Builds, "order=-results"),
                (Collection::Changes, "author__contains=ann"),
                (Collection::Changes, "branch=null"),
                (Collection::Changes, "branch__ne=main"),
                (Collection::Changes, "revision=101"),
                (Collection::Changes, "revision__gt=101&order=-changeid"),
                (Collection::Changes, "comments=change 2"),
                (
                    Collection::BuildRequests,
                    "claimed=true&order=-buildrequestid&limit=4",
                ),
            ];
            for (c, query) in queries {
                let params: Vec<(String, String)> = query
                    .split('&')
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').expect("k=v");
                        (k.to_string(), v.to_string())
                    })
                    .collect();
                let columns = store.api_columns(*c).await.expect("columns");
                let known: Vec<String> = columns
                    .iter()
                    .map(|a| super::field_of(a).to_string())
                    .collect();
                let q = ListQuery::parse(&params, &known).expect("query");
                let sel = q
                    .select(&columns, &None, store.dialect())
                    .unwrap_or_else(|| panic!("{query} is said in SQL"));
                let (_, sql_rows, sql_total) = store.api_select(*c, sel).await.expect("select");
                let (_, all) = store.api_rows(*c, None).await.expect("rows");
                let (mem_rows, mem_total) = q.apply(all, c.names().1);
                assert_eq!(sql_total, mem_total, "{query}: total");
                assert_eq!(sql_rows, mem_rows, "{query}: rows");
                assert!(
                    sql_total > 0 || query.contains("null"),
                    "{query} finds something"
                );
            }
            // What SQL would mean differently stays here.
            let cols = store
                .api_columns(Collection::Builds)
                .await
                .expect("columns");
            let known: Vec<String> = cols
                .iter()
                .map(|a| super::field_of(a).to_string())
                .collect();
            for query in ["results__lt=abc", "complete=maybe", "results__contains=1"] {
                let (k, v) = query.split_once('=').expect("k=v");
                let q = ListQuery::parse(&[(k.to_string(), v.to_string())], &known).expect("query");
                assert!(q.select(&cols, &None, Dialect::Sqlite).is_none(), "{query}");
            }
        }
    }
}

/// Property-based checks: any query string's pairs are parsed into a
/// typed query over known fields or refused; nothing of them reaches SQL
/// but as an argument. `PROPTEST_CASES=N` runs more (bench/fuzz.sh).
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn known() -> Vec<String> {
        ["buildid", "number", "results", "complete", "name"]
            .map(String::from)
            .to_vec()
    }

    proptest! {
        #[test]
        fn fuzz_any_query_is_typed_or_refused(
            params in vec((
                prop_oneof![
                    prop::sample::select(vec![
                        "order", "limit", "offset", "field", "buildid", "number__gt",
                        "results__ne", "name__contains", "complete__eq", "name__in",
                    ]).prop_map(String::from),
                    ".{0,12}",
                ],
                ".{0,16}",
            ), 0..8),
        ) {
            let known = known();
            if let Ok(q) = ListQuery::parse(&params, &known) {
                for f in &q.filters {
                    prop_assert!(known.contains(&f.field), "{:?}", f);
                }
                for (f, _) in &q.order {
                    prop_assert!(known.contains(f), "{}", f);
                }
                for f in &q.fields {
                    prop_assert!(known.contains(f), "{}", f);
                }
            }
        }
    }
}
