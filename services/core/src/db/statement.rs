//! One statement, sent the cheapest way the connection allows.
//!
//! On a direct connection it is a prepared statement with bound arguments
//! (sqlx caches it per connection: one round trip, planned once). Through
//! PgBouncer in transaction mode a statement cannot outlive one round trip,
//! and sqlx sends an unprepared statement in two (Parse and Describe, then
//! Bind and Execute), which must then run inside a transaction so that both
//! reach the same server: four round trips for one read. Here it goes as one
//! simple-protocol message with its arguments written as typed literals —
//! one round trip, no transaction needed, what `pgbench -M simple` sends.
//!
//! Only the argument types below are written as literals, each in a form
//! that cannot end the literal it sits in: a UUID, an integer or a boolean
//! is printed from its value; text (JSON too, cast in the SQL) is an escape
//! string with every backslash and quote doubled (text with a NUL byte is
//! refused; PostgreSQL cannot store one).

use std::fmt::Write as _;

use futures_util::TryStreamExt as _;
use futures_util::future::BoxFuture;
use sqlx::postgres::{PgArguments, PgQueryResult, PgRow};
use sqlx::{Arguments as _, Either, Executor as _, FromRow};
use uuid::Uuid;

use super::DbConn;

/// A statement's argument (`$1` is the first).
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    Uuid(Option<Uuid>),
    Int(Option<i64>),
    Text(Option<&'a str>),
    Bool(Option<bool>),
    Ints(&'a [i64]),
    Uuids(&'a [Uuid]),
    /// Text elements, any of them NULL.
    Texts(&'a [Option<String>]),
}

impl From<Uuid> for Arg<'_> {
    fn from(value: Uuid) -> Self {
        Arg::Uuid(Some(value))
    }
}

impl From<Option<Uuid>> for Arg<'_> {
    fn from(value: Option<Uuid>) -> Self {
        Arg::Uuid(value)
    }
}

impl From<i64> for Arg<'_> {
    fn from(value: i64) -> Self {
        Arg::Int(Some(value))
    }
}

impl From<bool> for Arg<'_> {
    fn from(value: bool) -> Self {
        Arg::Bool(Some(value))
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(value: &'a str) -> Self {
        Arg::Text(Some(value))
    }
}

/// Every row `sql` returns.
pub async fn fetch_all<T>(
    db: &mut impl DbConn,
    sql: &str,
    args: &[Arg<'_>],
) -> Result<Vec<T>, sqlx::Error>
where
    T: for<'r> FromRow<'r, PgRow>,
{
    send(db, sql, args)
        .await?
        .iter()
        .filter_map(|result| result.as_ref().right())
        .map(T::from_row)
        .collect()
}

/// The first row `sql` returns, if any.
pub async fn fetch_optional<T>(
    db: &mut impl DbConn,
    sql: &str,
    args: &[Arg<'_>],
) -> Result<Option<T>, sqlx::Error>
where
    T: for<'r> FromRow<'r, PgRow>,
{
    Ok(fetch_all(db, sql, args).await?.into_iter().next())
}

/// Runs `sql`; the number of rows it changed.
pub async fn execute(
    db: &mut impl DbConn,
    sql: &str,
    args: &[Arg<'_>],
) -> Result<u64, sqlx::Error> {
    Ok(send(db, sql, args)
        .await?
        .iter()
        .filter_map(|result| result.as_ref().left())
        .map(PgQueryResult::rows_affected)
        .sum())
}

/// What `sql` answers: its rows and its command's result.
type Answer = Vec<Either<PgQueryResult, PgRow>>;

/// Sends `sql` the way `db` allows: prepared and bound, or one message.
async fn send(db: &mut impl DbConn, sql: &str, args: &[Arg<'_>]) -> Result<Answer, sqlx::Error> {
    let send: BoxFuture<'_, Result<Answer, sqlx::Error>> = if db.prepared() {
        let query = sqlx::query_with(sql, bound(args)?).persistent(true);
        Box::pin(db.conn().fetch_many(query).try_collect())
    } else {
        let text = render(sql, args)?;
        let conn = db.conn_for_one_message();
        Box::pin(async move { conn.fetch_many(text.as_str()).try_collect().await })
    };
    // A boxed future of a concrete type: a generic `async fn` around sqlx's
    // generic executors is not provably `Send` for every lifetime the
    // callers' boxed read closures need.
    send.await
}

fn bound(args: &[Arg<'_>]) -> Result<PgArguments, sqlx::Error> {
    let mut arguments = PgArguments::default();
    for arg in args {
        match *arg {
            Arg::Uuid(v) => arguments.add(v),
            Arg::Int(v) => arguments.add(v),
            Arg::Text(v) => arguments.add(v),
            Arg::Bool(v) => arguments.add(v),
            Arg::Ints(v) => arguments.add(v),
            Arg::Uuids(v) => arguments.add(v),
            Arg::Texts(v) => arguments.add(v),
        }
        .map_err(sqlx::Error::Encode)?;
    }
    Ok(arguments)
}

/// `value` as JSON text, for an argument the SQL casts to `jsonb`.
pub fn json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String, sqlx::Error> {
    serde_json::to_string(value).map_err(|e| sqlx::Error::Encode(e.into()))
}

/// `sql` with each `$n` replaced by the literal of `args[n - 1]`. The
/// placeholders are found in `sql` alone (which must hold no `$` inside a
/// string or a quoted name), never in what was put in their place.
pub fn render(sql: &str, args: &[Arg<'_>]) -> Result<String, sqlx::Error> {
    let extra: usize = args
        .iter()
        .map(|arg| match arg {
            Arg::Text(Some(text)) => text.len() + 12,
            _ => 48,
        })
        .sum();
    let mut out = String::with_capacity(sql.len() + extra);
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad(format!("a `$` that is not a placeholder in: {sql}")));
        }
        let n: usize = after[..digits]
            .parse()
            .map_err(|_| bad(format!("placeholder out of range in: {sql}")))?;
        let arg = n
            .checked_sub(1)
            .and_then(|i| args.get(i))
            .ok_or_else(|| bad(format!("${n} has no argument ({} given)", args.len())))?;
        literal(&mut out, arg)?;
        rest = &after[digits..];
    }
    out.push_str(rest);
    Ok(out)
}

fn literal(out: &mut String, arg: &Arg<'_>) -> Result<(), sqlx::Error> {
    // `write!` into a String cannot fail.
    match *arg {
        Arg::Uuid(Some(v)) => {
            let _ = write!(out, "'{v}'::uuid");
        }
        Arg::Uuid(None) => out.push_str("NULL::uuid"),
        // Quoted, so that a negative number after a `-` cannot start a comment.
        Arg::Int(Some(v)) => {
            let _ = write!(out, "'{v}'::int8");
        }
        Arg::Int(None) => out.push_str("NULL::int8"),
        Arg::Text(Some(text)) => {
            if text.contains('\0') {
                return Err(sqlx::Error::Encode("text with a NUL byte".into()));
            }
            out.push_str("E'");
            for c in text.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\'' => out.push_str("''"),
                    c => out.push(c),
                }
            }
            out.push_str("'::text");
        }
        Arg::Text(None) => out.push_str("NULL::text"),
        Arg::Bool(Some(v)) => out.push_str(if v { "true" } else { "false" }),
        Arg::Bool(None) => out.push_str("NULL::bool"),
        Arg::Ints(values) => array(out, values, "int8", |out, v| literal(out, &Arg::from(*v)))?,
        Arg::Uuids(values) => array(out, values, "uuid", |out, v| literal(out, &Arg::from(*v)))?,
        Arg::Texts(values) => array(out, values, "text", |out, v| {
            literal(out, &Arg::Text(v.as_deref()))
        })?,
    }
    Ok(())
}

/// `ARRAY[…]::type[]` of the elements' literals.
fn array<T>(
    out: &mut String,
    values: &[T],
    element_type: &str,
    mut element: impl FnMut(&mut String, &T) -> Result<(), sqlx::Error>,
) -> Result<(), sqlx::Error> {
    out.push_str("ARRAY[");
    for (i, value) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        element(out, value)?;
    }
    out.push_str("]::");
    out.push_str(element_type);
    out.push_str("[]");
    Ok(())
}

fn bad(message: String) -> sqlx::Error {
    sqlx::Error::Protocol(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_typed_literals() {
        let id = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let sql = render(
            "SELECT $1, $2 - $3, $10, $4",
            &[
                Arg::from(id),
                Arg::from(-5),
                Arg::Int(None),
                Arg::from("it's a \\ test $1"),
                Arg::Uuid(None),
                Arg::Text(None),
                Arg::Int(Some(0)),
                Arg::Int(Some(0)),
                Arg::Int(Some(0)),
                Arg::Int(Some(10)),
            ],
        )
        .unwrap_or_default();
        assert_eq!(
            sql,
            "SELECT '01234567-89ab-cdef-0123-456789abcdef'::uuid, '-5'::int8 - NULL::int8, \
             '10'::int8, E'it''s a \\\\ test $1'::text"
        );
    }

    #[test]
    fn a_missing_argument_or_a_stray_dollar_is_an_error() {
        assert!(render("SELECT $2", &[Arg::from(1)]).is_err());
        assert!(render("SELECT $0", &[Arg::from(1)]).is_err());
        assert!(render("SELECT $", &[]).is_err());
        assert!(render("SELECT 1", &[]).is_ok());
    }

    #[test]
    fn arrays_are_arrays_of_literals() {
        let id = Uuid::from_u128(1);
        let texts = [Some("a'b".to_owned()), None];
        let sql = render(
            "SELECT $1, $2, $3, $4",
            &[
                Arg::Ints(&[1, -2]),
                Arg::Uuids(&[id]),
                Arg::Texts(&texts),
                Arg::Ints(&[]),
            ],
        )
        .unwrap_or_default();
        assert_eq!(
            sql,
            "SELECT ARRAY['1'::int8,'-2'::int8]::int8[], \
             ARRAY['00000000-0000-0000-0000-000000000001'::uuid]::uuid[], \
             ARRAY[E'a''b'::text,NULL::text]::text[], ARRAY[]::int8[]"
        );
    }

    #[test]
    fn text_with_a_nul_byte_is_refused() {
        assert!(render("SELECT $1", &[Arg::from("a\0b")]).is_err());
    }
}
