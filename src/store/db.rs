//! The store's two backends behind one small SQL interface: SQLite (the
//! embedded default, one connection in WAL mode) and PostgreSQL (through
//! `tokio-postgres` and a `deadpool-postgres` pool, for several masters on
//! one database).
//!
//! The store's functions are written once, against [`Sql`]: statements in
//! the common dialect of both (`?1`/`?` placeholders, `RETURNING`,
//! `ON CONFLICT`), arguments as [`Value`]s and rows read as [`Row`]s. The
//! few places where the dialects differ ask [`Sql::dialect`]. Every call to
//! the store is one transaction: it commits when the closure returns `Ok`
//! and rolls back when it returns `Err`.

use std::fmt;

use anyhow::{bail, Context};

/// Which SQL the database speaks, where the two differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// One SQL value, as an argument or in a row. Integers are 64-bit in both
/// backends (PostgreSQL's schema uses `BIGINT` throughout); a PostgreSQL
/// boolean reads as 0 or 1, as SQLite has it.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Null => "NULL",
            Value::Int(_) => "an integer",
            Value::Real(_) => "a real",
            Value::Text(_) => "text",
            Value::Blob(_) => "a blob",
        }
    }
}

macro_rules! value_from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Value {
                Value::Int(v as i64)
            }
        }
    )*};
}
value_from_int!(i64, i32, u32, usize);

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Int(v as i64)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Real(v)
    }
}
impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Text(v)
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Value {
        Value::Text(v.clone())
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.to_string())
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Value {
        Value::Blob(v)
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Value {
        Value::Blob(v.to_vec())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}
impl<T: Clone + Into<Value>> From<&Option<T>> for Value {
    fn from(v: &Option<T>) -> Value {
        v.clone().map_or(Value::Null, Into::into)
    }
}
impl From<&i64> for Value {
    fn from(v: &i64) -> Value {
        Value::Int(*v)
    }
}

/// Arguments of a statement: `args![a, b]` for `&[Value::from(a), ...]`.
macro_rules! args {
    ($($x:expr),* $(,)?) => {
        &[$($crate::store::db::Value::from($x)),*][..]
    };
}
pub(crate) use args;

/// A type a column reads as.
pub trait FromValue: Sized {
    fn from_value(v: &Value) -> Option<Self>;
    const WHAT: &'static str;
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> Option<i64> {
        match v {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
    const WHAT: &'static str = "an integer";
}
impl FromValue for bool {
    fn from_value(v: &Value) -> Option<bool> {
        match v {
            Value::Int(i) => Some(*i != 0),
            _ => None,
        }
    }
    const WHAT: &'static str = "a 0/1 flag";
}
impl FromValue for f64 {
    fn from_value(v: &Value) -> Option<f64> {
        match v {
            Value::Real(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    const WHAT: &'static str = "a number";
}
impl FromValue for String {
    fn from_value(v: &Value) -> Option<String> {
        match v {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
    const WHAT: &'static str = "text";
}
impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> Option<Vec<u8>> {
        match v {
            Value::Blob(b) => Some(b.clone()),
            Value::Text(s) => Some(s.as_bytes().to_vec()),
            _ => None,
        }
    }
    const WHAT: &'static str = "bytes";
}
impl FromValue for Value {
    fn from_value(v: &Value) -> Option<Value> {
        Some(v.clone())
    }
    const WHAT: &'static str = "a value";
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Option<Option<T>> {
        match v {
            Value::Null => Some(None),
            v => T::from_value(v).map(Some),
        }
    }
    const WHAT: &'static str = T::WHAT;
}

/// One row of a result.
#[derive(Clone, Debug, PartialEq)]
pub struct Row(pub Vec<Value>);

impl Row {
    /// Column `i` as a `T`; an error names the column and what it held.
    pub fn get<T: FromValue>(&self, i: usize) -> anyhow::Result<T> {
        let v = self
            .0
            .get(i)
            .with_context(|| format!("the row has no column {i}"))?;
        T::from_value(v).with_context(|| format!("column {i} holds {}, not {}", v.kind(), T::WHAT))
    }
}

/// The SQL interface every store function is written against: one open
/// transaction of either backend.
pub trait Sql {
    fn dialect(&self) -> Dialect;
    /// Runs a statement; the number of rows it changed.
    fn execute(&mut self, sql: &str, args: &[Value]) -> anyhow::Result<u64>;
    /// Runs a query; its column names and rows.
    fn query_named(&mut self, sql: &str, args: &[Value])
        -> anyhow::Result<(Vec<String>, Vec<Row>)>;
    /// Runs several statements without arguments (a migration).
    fn batch(&mut self, sql: &str) -> anyhow::Result<()>;
}

impl dyn Sql + '_ {
    pub fn query(&mut self, sql: &str, args: &[Value]) -> anyhow::Result<Vec<Row>> {
        Ok(self.query_named(sql, args)?.1)
    }

    /// The first row, if any.
    pub fn query_opt(&mut self, sql: &str, args: &[Value]) -> anyhow::Result<Option<Row>> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// The first row; its absence is an error.
    pub fn query_one(&mut self, sql: &str, args: &[Value]) -> anyhow::Result<Row> {
        self.query_opt(sql, args)?
            .with_context(|| format!("no row from `{}`", first_line(sql)))
    }

    /// The first column of the first row.
    pub fn value<T: FromValue>(&mut self, sql: &str, args: &[Value]) -> anyhow::Result<T> {
        self.query_one(sql, args)?.get(0)
    }

    /// The first column of the first row, if there is a row.
    pub fn value_opt<T: FromValue>(
        &mut self,
        sql: &str,
        args: &[Value],
    ) -> anyhow::Result<Option<T>> {
        self.query_opt(sql, args)?.map(|r| r.get(0)).transpose()
    }

    /// The first column of every row.
    pub fn column<T: FromValue>(&mut self, sql: &str, args: &[Value]) -> anyhow::Result<Vec<T>> {
        self.query(sql, args)?.iter().map(|r| r.get(0)).collect()
    }
}

fn first_line(sql: &str) -> &str {
    sql.trim().lines().next().unwrap_or_default()
}

// ---------------------------------------------------------------- SQLite

/// An open SQLite transaction (the connection it runs on).
pub struct Lite<'a>(pub &'a rusqlite::Connection);

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(*i),
            Value::Real(f) => ValueRef::Real(*f),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

fn from_sqlite(v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(f) => Value::Real(f),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

impl Sql for Lite<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn execute(&mut self, sql: &str, args: &[Value]) -> anyhow::Result<u64> {
        let mut st = self.0.prepare_cached(sql)?;
        Ok(st.execute(rusqlite::params_from_iter(args.iter()))? as u64)
    }

    fn query_named(
        &mut self,
        sql: &str,
        args: &[Value],
    ) -> anyhow::Result<(Vec<String>, Vec<Row>)> {
        let mut st = self.0.prepare_cached(sql)?;
        let names: Vec<String> = st.column_names().iter().map(|s| s.to_string()).collect();
        let n = names.len();
        let mut rows = st.query(rusqlite::params_from_iter(args.iter()))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut values = Vec::with_capacity(n);
            for i in 0..n {
                values.push(from_sqlite(r.get_ref(i)?));
            }
            out.push(Row(values));
        }
        Ok((names, out))
    }

    fn batch(&mut self, sql: &str) -> anyhow::Result<()> {
        Ok(self.0.execute_batch(sql)?)
    }
}

// ------------------------------------------------------------ PostgreSQL

/// An open PostgreSQL transaction, driven from a blocking thread.
pub struct Pg<'a, 'b> {
    pub tx: &'a deadpool_postgres::Transaction<'b>,
    pub rt: &'a tokio::runtime::Handle,
}

/// `?1` and `?` placeholders as PostgreSQL's `$1`: `?N` keeps its number, a
/// bare `?` takes the one after the largest so far (SQLite's rule). Text in
/// quotes is left alone.
pub fn pg_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.chars().peekable();
    let mut quote: Option<char> = None;
    let mut largest = 0u32;
    while let Some(c) = chars.next() {
        if let Some(q) = quote {
            out.push(c);
            if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '\'' | '"' => {
                quote = Some(c);
                out.push(c);
            }
            '?' => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    digits.push(*d);
                    chars.next();
                }
                let n = match digits.parse::<u32>() {
                    Ok(n) => n,
                    Err(_) => largest + 1,
                };
                largest = largest.max(n);
                out.push('$');
                out.push_str(&n.to_string());
            }
            c => out.push(c),
        }
    }
    out
}

impl tokio_postgres::types::ToSql for Value {
    /// Writes the value as the type PostgreSQL inferred for the parameter,
    /// converting where SQLite's column affinity would (a number compared
    /// with a text column, a numeric text with a number column).
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use tokio_postgres::types::{IsNull, Type};
        let int = |v: &Value| -> Result<i64, Box<dyn std::error::Error + Sync + Send>> {
            match v {
                Value::Int(i) => Ok(*i),
                Value::Real(f) if f.fract() == 0.0 => Ok(*f as i64),
                Value::Text(s) => Ok(s.trim().parse::<i64>()?),
                other => Err(format!("{} where an integer is wanted", other.kind()).into()),
            }
        };
        let text = |v: &Value| -> String {
            match v {
                Value::Int(i) => i.to_string(),
                Value::Real(f) => f.to_string(),
                Value::Text(s) => s.clone(),
                Value::Blob(b) => String::from_utf8_lossy(b).into_owned(),
                Value::Null => String::new(),
            }
        };
        if *self == Value::Null {
            return Ok(IsNull::Yes);
        }
        match *ty {
            Type::INT8 => int(self)?.to_sql(ty, out),
            Type::INT4 => i32::try_from(int(self)?)?.to_sql(ty, out),
            Type::INT2 => i16::try_from(int(self)?)?.to_sql(ty, out),
            Type::BOOL => (int(self)? != 0).to_sql(ty, out),
            Type::FLOAT8 | Type::FLOAT4 | Type::NUMERIC => {
                let f = match self {
                    Value::Int(i) => *i as f64,
                    Value::Real(f) => *f,
                    Value::Text(s) => s.trim().parse::<f64>()?,
                    other => {
                        return Err(format!("{} where a number is wanted", other.kind()).into())
                    }
                };
                if *ty == Type::FLOAT4 {
                    (f as f32).to_sql(ty, out)
                } else if *ty == Type::FLOAT8 {
                    f.to_sql(ty, out)
                } else {
                    Err("NUMERIC parameters are not used by kiln's store".into())
                }
            }
            Type::BYTEA => match self {
                Value::Blob(b) => b.as_slice().to_sql(ty, out),
                other => text(other).as_bytes().to_sql(ty, out),
            },
            _ => text(self).as_str().to_sql(ty, out),
        }
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

fn from_pg(row: &tokio_postgres::Row, i: usize) -> anyhow::Result<Value> {
    use tokio_postgres::types::Type;
    let col = &row.columns()[i];
    let ty = col.type_();
    let v = if *ty == Type::INT8 {
        row.try_get::<_, Option<i64>>(i)?.map(Value::Int)
    } else if *ty == Type::INT4 {
        row.try_get::<_, Option<i32>>(i)?
            .map(|v| Value::Int(v.into()))
    } else if *ty == Type::INT2 {
        row.try_get::<_, Option<i16>>(i)?
            .map(|v| Value::Int(v.into()))
    } else if *ty == Type::BOOL {
        row.try_get::<_, Option<bool>>(i)?
            .map(|v| Value::Int(v.into()))
    } else if *ty == Type::FLOAT8 {
        row.try_get::<_, Option<f64>>(i)?.map(Value::Real)
    } else if *ty == Type::FLOAT4 {
        row.try_get::<_, Option<f32>>(i)?
            .map(|v| Value::Real(v.into()))
    } else if *ty == Type::BYTEA {
        row.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Blob)
    } else if [
        Type::TEXT,
        Type::VARCHAR,
        Type::BPCHAR,
        Type::NAME,
        Type::UNKNOWN,
    ]
    .contains(ty)
    {
        row.try_get::<_, Option<String>>(i)?.map(Value::Text)
    } else {
        bail!(
            "column `{}` has the PostgreSQL type {ty}, which the store does not read (cast it in the SQL)",
            col.name()
        )
    };
    Ok(v.unwrap_or(Value::Null))
}

impl Pg<'_, '_> {
    fn statement(&self, sql: &str) -> anyhow::Result<tokio_postgres::Statement> {
        let text = pg_placeholders(sql);
        self.rt
            .block_on(self.tx.prepare_cached(&text))
            .with_context(|| format!("cannot prepare `{}`", first_line(sql)))
    }
}

fn pg_args(args: &[Value]) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    args.iter()
        .map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect()
}

impl Sql for Pg<'_, '_> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn execute(&mut self, sql: &str, args: &[Value]) -> anyhow::Result<u64> {
        let st = self.statement(sql)?;
        Ok(self.rt.block_on(self.tx.execute(&st, &pg_args(args)))?)
    }

    fn query_named(
        &mut self,
        sql: &str,
        args: &[Value],
    ) -> anyhow::Result<(Vec<String>, Vec<Row>)> {
        let st = self.statement(sql)?;
        let names = st.columns().iter().map(|c| c.name().to_string()).collect();
        let rows = self.rt.block_on(self.tx.query(&st, &pg_args(args)))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let mut values = Vec::with_capacity(r.len());
            for i in 0..r.len() {
                values.push(from_pg(r, i)?);
            }
            out.push(Row(values));
        }
        Ok((names, out))
    }

    fn batch(&mut self, sql: &str) -> anyhow::Result<()> {
        Ok(self.rt.block_on(self.tx.batch_execute(sql))?)
    }
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dialect::Sqlite => "SQLite",
            Dialect::Postgres => "PostgreSQL",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_numbered_outside_quotes() {
        assert_eq!(
            pg_placeholders("SELECT a FROM t WHERE a = ?1 AND b = ?2 OR c = ?1"),
            "SELECT a FROM t WHERE a = $1 AND b = $2 OR c = $1"
        );
        assert_eq!(
            pg_placeholders("x = ? AND y = ? AND z = '?' AND \"w?\" = ?"),
            "x = $1 AND y = $2 AND z = '?' AND \"w?\" = $3"
        );
        assert_eq!(pg_placeholders("a = ?2, b = ?"), "a = $2, b = $3");
    }

    #[test]
    fn a_column_of_the_wrong_kind_is_named() {
        let row = Row(vec![Value::Text("x".into()), Value::Null]);
        let err = format!("{:#}", row.get::<i64>(0).unwrap_err());
        assert_eq!(err, "column 0 holds text, not an integer");
        assert_eq!(row.get::<Option<i64>>(1).unwrap(), None);
        assert!(row.get::<i64>(2).is_err());
    }
}
