//! JSON that Turnpike stored itself (item bodies), passed from Postgres to
//! the client without being parsed and re-serialized: the hot read path
//! copies bytes instead of building a value tree.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgTypeInfo, PgValueFormat, PgValueRef};
use sqlx::{Decode, Postgres, Type};
use turnpike_core::db::statement::{self, Column, PipelinedRow, RowIndex};

/// The text of a `jsonb` value.
#[derive(Debug, Clone)]
pub struct StoredJson(pub String);

impl Type<Postgres> for StoredJson {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_name("jsonb")
    }
}

impl<'r> Decode<'r, Postgres> for StoredJson {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        let format = value.format();
        let mut bytes = value.as_bytes()?;
        // jsonb's binary form is a version byte (1) and then the JSON text.
        if format == PgValueFormat::Binary {
            match bytes.split_first() {
                Some((1, rest)) => bytes = rest,
                _ => return Err("unsupported jsonb binary version".into()),
            }
        }
        Ok(StoredJson(std::str::from_utf8(bytes)?.to_owned()))
    }
}

impl Column for StoredJson {
    fn nullable<I>(row: &PipelinedRow, index: I) -> Result<Option<Self>, sqlx::Error>
    where
        I: RowIndex + std::fmt::Display + Copy,
    {
        Ok(statement::json_string(row, index)?.map(StoredJson))
    }
}

/// A JSON answer from bytes already serialized (a cached page).
pub fn response(body: bytes::Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

impl IntoResponse for StoredJson {
    fn into_response(self) -> Response {
        ([(header::CONTENT_TYPE, "application/json")], self.0).into_response()
    }
}

/// Writes OpenAI's list envelope around stored JSON elements.
pub fn list(
    data: &[StoredJson],
    first_id: Option<&str>,
    last_id: Option<&str>,
    has_more: bool,
) -> StoredJson {
    let size = data.iter().map(|d| d.0.len() + 1).sum::<usize>() + 128;
    let mut out = String::with_capacity(size);
    out.push_str(r#"{"object":"list","data":["#);
    for (i, item) in data.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&item.0);
    }
    out.push_str(r#"],"first_id":"#);
    push_json_string(&mut out, first_id);
    out.push_str(r#","last_id":"#);
    push_json_string(&mut out, last_id);
    out.push_str(if has_more {
        r#","has_more":true}"#
    } else {
        r#","has_more":false}"#
    });
    StoredJson(out)
}

fn push_json_string(out: &mut String, value: Option<&str>) {
    match value {
        // Ids are ASCII letters, digits and '_', but escape anyway.
        Some(v) => out.push_str(&serde_json::Value::from(v).to_string()),
        None => out.push_str("null"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_envelope_is_valid_json() {
        let data = vec![
            StoredJson(r#"{"a":1}"#.into()),
            StoredJson(r#"{"b":"x"}"#.into()),
        ];
        let out = list(&data, Some("msg_1"), Some("msg_2"), true);
        let parsed: serde_json::Value = serde_json::from_str(&out.0).unwrap_or_default();
        assert_eq!(
            parsed,
            serde_json::json!({"object":"list","data":[{"a":1},{"b":"x"}],"first_id":"msg_1","last_id":"msg_2","has_more":true})
        );
        let empty: serde_json::Value =
            serde_json::from_str(&list(&[], None, None, false).0).unwrap_or_default();
        assert_eq!(
            empty,
            serde_json::json!({"object":"list","data":[],"first_id":null,"last_id":null,"has_more":false})
        );
    }
}
