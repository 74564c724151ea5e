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
//!
//! A read on a node's pipelined connection ([`super::pipeline`]) goes out
//! there the same way: directly, prepared once per connection and bound
//! with the same argument types (rows in binary); through PgBouncer, as the
//! same one message (rows in text). Its rows are
//! decoded by [`StatementRow`], which every row type read here implements
//! beside sqlx's `FromRow` ([`statement_row!`](crate::statement_row) for a
//! struct, by column name).

use std::fmt::{self, Write as _};

use futures_util::TryStreamExt as _;
use futures_util::future::BoxFuture;
use sqlx::postgres::{PgArguments, PgQueryResult, PgRow};
use sqlx::{Arguments as _, Either, Executor as _, FromRow};
use tokio_postgres::types::{FromSql, ToSql, Type};
use uuid::Uuid;

use super::DbConn;

pub use tokio_postgres::row::RowIndex;

/// A row of a pipelined read: in binary, as a prepared statement on a
/// direct connection answers, or in text, as a simple-protocol message
/// through PgBouncer answers.
pub enum PipelinedRow {
    Binary(tokio_postgres::Row),
    Text(tokio_postgres::SimpleQueryRow),
}

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
    T: StatementRow,
{
    if let Some(shared) = db.pipelined() {
        let rows = shared.query(sql, args).await?;
        return rows.iter().map(T::from_pipelined).collect();
    }
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
    T: StatementRow,
{
    Ok(fetch_all(db, sql, args).await?.into_iter().next())
}

/// Runs `sql`; the number of rows it changed.
pub async fn execute(
    db: &mut impl DbConn,
    sql: &str,
    args: &[Arg<'_>],
) -> Result<u64, sqlx::Error> {
    if let Some(shared) = db.pipelined() {
        return shared.execute(sql, args).await;
    }
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

impl Arg<'_> {
    /// The type the argument is bound as (sqlx binds the same).
    pub(super) fn pg_type(&self) -> Type {
        match self {
            Arg::Uuid(_) => Type::UUID,
            Arg::Int(_) => Type::INT8,
            Arg::Text(_) => Type::TEXT,
            Arg::Bool(_) => Type::BOOL,
            Arg::Ints(_) => Type::INT8_ARRAY,
            Arg::Uuids(_) => Type::UUID_ARRAY,
            Arg::Texts(_) => Type::TEXT_ARRAY,
        }
    }

    /// The argument's value, owned, to bind as [`Arg::pg_type`].
    pub(super) fn param(self) -> Box<dyn ToSql + Send + Sync> {
        match self {
            Arg::Uuid(v) => Box::new(v),
            Arg::Int(v) => Box::new(v),
            Arg::Text(v) => Box::new(v.map(str::to_owned)),
            Arg::Bool(v) => Box::new(v),
            Arg::Ints(v) => Box::new(v.to_vec()),
            Arg::Uuids(v) => Box::new(v.to_vec()),
            Arg::Texts(v) => Box::new(v.to_vec()),
        }
    }
}

/// A row type the statements here return, from either driver: sqlx's
/// `FromRow` for pooled connections, [`StatementRow::from_pipelined`] for
/// pipelined ones. Tuples of [`Column`]s have it; a struct gets it from
/// [`statement_row!`](crate::statement_row).
pub trait StatementRow: for<'r> FromRow<'r, PgRow> + Sized {
    fn from_pipelined(row: &PipelinedRow) -> Result<Self, sqlx::Error>;
}

/// A column type [`StatementRow`] can decode from a pipelined row (by
/// position or by name), as sqlx decodes it from a pooled one; `Option<T>`
/// of any of them too.
pub trait Column: Sized {
    /// The column's value, `None` for NULL.
    fn nullable<I>(row: &PipelinedRow, index: I) -> Result<Option<Self>, sqlx::Error>
    where
        I: RowIndex + fmt::Display + Copy;

    /// The column's value; NULL is an error.
    fn column<I>(row: &PipelinedRow, index: I) -> Result<Self, sqlx::Error>
    where
        I: RowIndex + fmt::Display + Copy,
    {
        Self::nullable(row, index)?.ok_or_else(|| sqlx::Error::ColumnDecode {
            index: index.to_string(),
            source: "unexpected NULL".into(),
        })
    }
}

impl<T: Column> Column for Option<T> {
    fn nullable<I>(row: &PipelinedRow, index: I) -> Result<Option<Self>, sqlx::Error>
    where
        I: RowIndex + fmt::Display + Copy,
    {
        T::nullable(row, index).map(Some)
    }
}

fn decode_error<I: fmt::Display>(
    index: I,
    source: impl Into<sqlx::error::BoxDynError>,
) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: index.to_string(),
        source: source.into(),
    }
}

/// A column's text in a simple-protocol answer; `None` for NULL.
fn text_of<I>(row: &tokio_postgres::SimpleQueryRow, index: I) -> Result<Option<&str>, sqlx::Error>
where
    I: RowIndex + fmt::Display + Copy,
{
    row.try_get(index).map_err(|e| decode_error(index, e))
}

macro_rules! native_columns {
    ($($t:ty),*) => {$(
        impl Column for $t {
            fn nullable<I>(row: &PipelinedRow, index: I) -> Result<Option<Self>, sqlx::Error>
            where
                I: RowIndex + fmt::Display + Copy,
            {
                match row {
                    PipelinedRow::Binary(row) => row.try_get(index).map_err(|e| decode_error(index, e)),
                    PipelinedRow::Text(row) => text_of(row, index)?
                        .map(|text| <$t as FromText>::from_text(text).map_err(|e| decode_error(index, e)))
                        .transpose(),
                }
            }
        }
    )*};
}

/// A value from PostgreSQL's text output of its type. A text row names its
/// columns but not their types, so unlike a binary row it does not catch a
/// column whose SQL type differs from the field's (an int4 read as i64
/// passes here): the tests that decode rows run on both paths.
trait FromText: Sized {
    fn from_text(text: &str) -> Result<Self, sqlx::error::BoxDynError>;
}

impl FromText for Uuid {
    fn from_text(text: &str) -> Result<Self, sqlx::error::BoxDynError> {
        Ok(Uuid::parse_str(text)?)
    }
}

impl FromText for i64 {
    fn from_text(text: &str) -> Result<Self, sqlx::error::BoxDynError> {
        Ok(text.parse()?)
    }
}

impl FromText for i32 {
    fn from_text(text: &str) -> Result<Self, sqlx::error::BoxDynError> {
        Ok(text.parse()?)
    }
}

impl FromText for bool {
    fn from_text(text: &str) -> Result<Self, sqlx::error::BoxDynError> {
        match text {
            "t" => Ok(true),
            "f" => Ok(false),
            other => Err(format!("not a boolean: {other:?}").into()),
        }
    }
}

impl FromText for String {
    fn from_text(text: &str) -> Result<Self, sqlx::error::BoxDynError> {
        Ok(text.to_owned())
    }
}

impl FromText for Vec<u8> {
    /// `bytea` in its hex output (`\x0a1b…`, the server's default).
    fn from_text(text: &str) -> Result<Self, sqlx::error::BoxDynError> {
        let hex = text.strip_prefix("\\x").ok_or("bytea not in hex output")?;
        if hex.len() % 2 != 0 || !hex.is_ascii() {
            return Err("bytea hex of odd length or not hex".into());
        }
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(Into::into))
            .collect()
    }
}

impl<T: FromText> FromText for Vec<T> {
    fn from_text(text: &str) -> Result<Self, sqlx::error::BoxDynError> {
        array_elements(text)?
            .into_iter()
            .map(|element| T::from_text(&element.ok_or("NULL in an array of non-null elements")?))
            .collect()
    }
}

impl FromText for Vec<Option<String>> {
    fn from_text(text: &str) -> Result<Self, sqlx::error::BoxDynError> {
        array_elements(text)
    }
}

/// The elements of a one-dimensional array's text output (`{a,"b c",NULL}`):
/// quoted ones unescaped, an unquoted `NULL` as `None`.
fn array_elements(text: &str) -> Result<Vec<Option<String>>, sqlx::error::BoxDynError> {
    let inner = text
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .ok_or_else(|| format!("not an array: {text:?}"))?;
    let mut elements = Vec::new();
    if inner.is_empty() {
        return Ok(elements);
    }
    let mut chars = inner.chars().peekable();
    loop {
        let mut element = String::new();
        let quoted = chars.peek() == Some(&'"');
        if quoted {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => element.push(chars.next().ok_or("array ends in an escape")?),
                    Some(c) => element.push(c),
                    None => return Err("unterminated quoted array element".into()),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                if c == '{' || c == '"' || c == '\\' {
                    return Err("a multidimensional or malformed array".into());
                }
                element.push(c);
                chars.next();
            }
        }
        let null = !quoted && element.eq_ignore_ascii_case("NULL");
        elements.push((!null).then_some(element));
        match chars.next() {
            Some(',') => {}
            None => return Ok(elements),
            Some(c) => return Err(format!("unexpected {c:?} after an array element").into()),
        }
    }
}

native_columns!(
    Uuid,
    i64,
    i32,
    bool,
    String,
    Vec<u8>,
    Vec<i64>,
    Vec<Uuid>,
    Vec<String>,
    Vec<Option<String>>
);

/// The text of a `json` or `jsonb` value, as the server sent it.
struct JsonText<'a>(&'a [u8]);

impl<'a> FromSql<'a> for JsonText<'a> {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            // jsonb's binary form: a version byte (1), then the JSON text.
            return match raw.split_first() {
                Some((1, rest)) => Ok(JsonText(rest)),
                _ => Err("unsupported jsonb binary version".into()),
            };
        }
        Ok(JsonText(raw))
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::JSON | Type::JSONB)
    }
}

/// A `json` or `jsonb` column parsed with serde, as sqlx's `Json<T>` and
/// `serde_json::Value` are.
fn json_column<T, I>(row: &PipelinedRow, index: I) -> Result<Option<T>, sqlx::Error>
where
    T: serde::de::DeserializeOwned,
    I: RowIndex + fmt::Display + Copy,
{
    json_text(row, index)?
        .map(|text| serde_json::from_slice(text).map_err(|e| decode_error(index, e)))
        .transpose()
}

/// The text of a `json` or `jsonb` column as the server sent it, from
/// either kind of row; `None` for NULL.
fn json_text<I>(row: &PipelinedRow, index: I) -> Result<Option<&[u8]>, sqlx::Error>
where
    I: RowIndex + fmt::Display + Copy,
{
    Ok(match row {
        PipelinedRow::Binary(row) => {
            let text: Option<JsonText<'_>> =
                row.try_get(index).map_err(|e| decode_error(index, e))?;
            text.map(|t| t.0)
        }
        PipelinedRow::Text(row) => text_of(row, index)?.map(str::as_bytes),
    })
}

/// The text of a `json` or `jsonb` column, unparsed; `None` for NULL.
pub fn json_string<I>(row: &PipelinedRow, index: I) -> Result<Option<String>, sqlx::Error>
where
    I: RowIndex + fmt::Display + Copy,
{
    json_text(row, index)?
        .map(|text| String::from_utf8(text.to_vec()).map_err(|e| decode_error(index, e)))
        .transpose()
}

impl<T: serde::de::DeserializeOwned> Column for sqlx::types::Json<T> {
    fn nullable<I>(row: &PipelinedRow, index: I) -> Result<Option<Self>, sqlx::Error>
    where
        I: RowIndex + fmt::Display + Copy,
    {
        Ok(json_column(row, index)?.map(sqlx::types::Json))
    }
}

impl Column for serde_json::Value {
    fn nullable<I>(row: &PipelinedRow, index: I) -> Result<Option<Self>, sqlx::Error>
    where
        I: RowIndex + fmt::Display + Copy,
    {
        json_column(row, index)
    }
}

macro_rules! tuple_rows {
    ($(($($t:ident $i:tt),+)),*) => {$(
        impl<$($t),+> StatementRow for ($($t,)+)
        where
            $($t: Column + for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,)+
        {
            fn from_pipelined(row: &PipelinedRow) -> Result<Self, sqlx::Error> {
                Ok(($($t::column(row, $i)?,)+))
            }
        }
    )*};
}

tuple_rows!(
    (A 0),
    (A 0, B 1),
    (A 0, B 1, C 2),
    (A 0, B 1, C 2, D 3),
    (A 0, B 1, C 2, D 3, E 4),
    (A 0, B 1, C 2, D 3, E 4, F 5)
);

/// [`StatementRow`] for a struct that derives `sqlx::FromRow`, decoding
/// each named field from the column of the same name:
/// `statement_row!(ConversationRow { id, metadata, created_at });`.
#[macro_export]
macro_rules! statement_row {
    ($row:ty { $($field:ident),* $(,)? }) => {
        impl $crate::db::statement::StatementRow for $row {
            fn from_pipelined(
                row: &$crate::db::statement::PipelinedRow,
            ) -> Result<Self, ::sqlx::Error> {
                Ok(Self {
                    $($field: $crate::db::statement::Column::column(row, stringify!($field))?,)*
                })
            }
        }
    };
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
    fn array_text_output_is_read_back_element_by_element() {
        let read = |text: &str| array_elements(text).unwrap_or_default();
        assert_eq!(read("{}"), Vec::<Option<String>>::new());
        assert_eq!(
            read(r#"{a,"b c",NULL,"NULL","",null}"#),
            [Some("a"), Some("b c"), None, Some("NULL"), Some(""), None]
                .map(|e| e.map(str::to_owned))
        );
        assert_eq!(
            read(r#"{"say \"hi\"","back\\slash","{brace},comma"}"#),
            [r#"say "hi""#, r"back\slash", "{brace},comma"].map(|e| Some(e.to_owned()))
        );
        for bad in ["", "a,b", "{a", r#"{"open}"#, "{{1,2},{3,4}}", "{a}b"] {
            assert!(array_elements(bad).is_err(), "{bad:?} was read");
        }
        assert_eq!(
            <Vec<i64> as FromText>::from_text("{-1,0,9223372036854775807}").ok(),
            Some(vec![-1, 0, i64::MAX])
        );
        assert!(<Vec<i64> as FromText>::from_text("{1,NULL}").is_err());
        assert_eq!(
            <Vec<u8> as FromText>::from_text(r"\x00ff10").ok(),
            Some(vec![0x00, 0xff, 0x10])
        );
        assert_eq!(<bool as FromText>::from_text("t").ok(), Some(true));
        assert!(<bool as FromText>::from_text("yes").is_err());
        assert!(<Vec<u8> as FromText>::from_text("\\xaé0").is_err());
    }

    #[test]
    fn text_with_a_nul_byte_is_refused() {
        assert!(render("SELECT $1", &[Arg::from("a\0b")]).is_err());
    }
}
