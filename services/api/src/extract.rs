//! Request extractors whose rejections are `ApiError`s: JSON bodies and query
//! strings that name the offending field, bearer-key authentication, and the
//! read's consistency (query parameter or header).

use std::borrow::Cow;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use turnpike_core::auth::Principal;
use turnpike_core::db::Lsn;

use crate::AppState;
use crate::error::ApiError;

/// The consistency-token header, on write responses and read requests.
pub const CONSISTENCY_HEADER: &str = "turnpike-consistency";

/// [`CONSISTENCY_HEADER`] as a header name: a look-up by `&str` parses and
/// checks the name on every request.
static CONSISTENCY_NAME: axum::http::HeaderName =
    axum::http::HeaderName::from_static(CONSISTENCY_HEADER);

/// A JSON body. Unknown fields, wrong types and malformed JSON are 400s that
/// name the field; an empty body reads as `{}`; a body over the limit is
/// 413, and one that stops arriving 408 ([`crate::body`]).
/// A missing Content-Type, or curl's default form type, is read as JSON too;
/// any other non-JSON type is a 415, as is a compressed body (one with a
/// `Content-Encoding` other than `identity`), which would otherwise read
/// as malformed JSON.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        if let Some(content_type) = req.headers().get(CONTENT_TYPE) {
            let is_json = content_type
                .to_str()
                .map(str::to_ascii_lowercase)
                .is_ok_and(|ct| {
                    ct.contains("json") || ct.starts_with("application/x-www-form-urlencoded")
                });
            if !is_json {
                return Err(ApiError::with_status(
                    axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "Expected a JSON body with Content-Type: application/json.",
                    "unsupported_media_type",
                ));
            }
        }
        if let Some(encoding) = req.headers().get(CONTENT_ENCODING)
            && !encoding.as_bytes().eq_ignore_ascii_case(b"identity")
        {
            let encoding = String::from_utf8_lossy(encoding.as_bytes());
            let mut refusal = ApiError::with_status(
                axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "Content-Encoding {encoding} is not supported; send the body uncompressed."
                ),
                "unsupported_media_type",
            );
            refusal.param = Some("Content-Encoding".to_owned());
            return Err(refusal);
        }
        let bytes = crate::body::read(req.into_body()).await?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        parse_json(bytes).map(Json)
    }
}

/// Parses JSON, reporting the JSON path of the first problem. Text that
/// PostgreSQL cannot store (U+0000) is refused here, for every body, with
/// the path of the field that holds it.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // JSON can carry U+0000 only as an escape, so a body without one needs
    // no further look.
    if bytes.windows(6).any(|w| w == b"\\u0000")
        && let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes)
        && let Some(path) = nul_path(&value, String::new())
    {
        let param = if path.is_empty() {
            ".".to_owned()
        } else {
            path
        };
        return Err(ApiError::bad_body(
            Some(param.clone()),
            format!(
                "Invalid request body: {param}: text must not contain the NUL character (U+0000)."
            ),
            "invalid_text",
        ));
    }
    // Read plainly first: tracking the path costs every field, and only a
    // refusal needs it, so the body is read again for that.
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let (code, what) = match inner.classify() {
            serde_json::error::Category::Data => ("invalid_body", "Invalid request body"),
            _ => ("invalid_json", "The body is not valid JSON"),
        };
        let param = if code == "invalid_body" {
            repeated_field(&path, &inner.to_string()).or((path != ".").then_some(path))
        } else {
            None
        };
        let message = match &param {
            Some(p) => format!("{what}: {p}: {inner}"),
            None => format!("{what}: {inner}"),
        };
        ApiError::bad_body(param, message, code)
    })?;
    de.end().map_err(|e| {
        ApiError::bad_body(
            None,
            format!("The body is not valid JSON: {e}"),
            "invalid_json",
        )
    })?;
    Ok(value)
}

/// The path of a field given twice, from serde's refusal of it: serde
/// refuses a repeated field before reading its value, while the path still
/// names the object holding it (`.` for the whole body or query).
fn repeated_field(path: &str, message: &str) -> Option<String> {
    let name = message
        .strip_prefix("duplicate field `")?
        .split('`')
        .next()?;
    Some(if path == "." {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    })
}

/// The path (`items[0].content`) of the first string or key holding U+0000.
fn nul_path(value: &serde_json::Value, at: String) -> Option<String> {
    match value {
        serde_json::Value::String(text) => text.contains('\0').then_some(at),
        serde_json::Value::Array(values) => values
            .iter()
            .enumerate()
            .find_map(|(i, v)| nul_path(v, format!("{at}[{i}]"))),
        serde_json::Value::Object(fields) => fields.iter().find_map(|(key, v)| {
            let path = if at.is_empty() {
                key.clone()
            } else {
                format!("{at}.{key}")
            };
            if key.contains('\0') {
                return Some(path);
            }
            nul_path(v, path)
        }),
        _ => None,
    }
}

/// A query string, with errors naming the parameter.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parse_query(parts.uri.query().unwrap_or("")).map(Query)
    }
}

fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    // A query with nothing escaped is read from its text as it is: the form
    // parser's decoding of each name and value has nothing to do there, yet
    // cost a cached read more than the rest of its query handling.
    if let Some(pairs) = plain_pairs(query)
        && let Ok(value) = plain::from_pairs(pairs)
    {
        return Ok(value);
    }
    // As for bodies: the path is tracked only to name a refused parameter.
    if let Ok(value) = serde_urlencoded::from_str(query) {
        return Ok(value);
    }
    let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let param = repeated_field(&path, &inner.to_string()).or((path != ".").then_some(path));
        let message = match &param {
            Some(p) => format!("Invalid query parameter '{p}': {inner}"),
            None => format!("Invalid query string: {inner}"),
        };
        ApiError::bad_body(param, message, "invalid_query")
    })
}

/// A query's name–value pairs, split as the form parser splits them (empty
/// pairs skipped, a name without `=` has an empty value), when nothing in
/// it is escaped (`%`, or `+` for a space), so that each pair reads as it
/// is written; `None` otherwise.
fn plain_pairs(query: &str) -> Option<impl Iterator<Item = (&str, &str)>> {
    if query.bytes().any(|b| matches!(b, b'%' | b'+')) {
        return None;
    }
    Some(
        query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| pair.split_once('=').unwrap_or((pair, ""))),
    )
}

/// Deserializing a plain query's pairs into a struct of parameters as
/// `serde_urlencoded` would: a
/// value is text, parsed where a number or a `bool` is wanted, a variant's
/// name for an enum, and `Some` for an option that is present. Any error
/// sends the query through `serde_urlencoded`, which words the refusal.
mod plain {
    use serde::de::value::{Error, MapDeserializer, StrDeserializer};
    use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};

    pub fn from_pairs<'de, T: DeserializeOwned>(
        pairs: impl Iterator<Item = (&'de str, &'de str)>,
    ) -> Result<T, Error> {
        // Checks that every pair was read, as `serde_urlencoded` does.
        T::deserialize(MapDeserializer::new(
            pairs.map(|(name, value)| (name, Value(value))),
        ))
    }

    /// One parameter's value.
    struct Value<'de>(&'de str);

    impl<'de> IntoDeserializer<'de, Error> for Value<'de> {
        type Deserializer = Self;

        fn into_deserializer(self) -> Self {
            self
        }
    }

    macro_rules! parsed {
        ($de:lifetime; $($method:ident => $visit:ident,)*) => {$(
            fn $method<V: Visitor<$de>>(self, visitor: V) -> Result<V::Value, Error> {
                match self.0.parse() {
                    Ok(value) => visitor.$visit(value),
                    Err(e) => Err(de::Error::custom(e)),
                }
            }
        )*};
    }

    impl<'de> de::Deserializer<'de> for Value<'de> {
        type Error = Error;

        fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            visitor.visit_borrowed_str(self.0)
        }

        fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            visitor.visit_some(self)
        }

        fn deserialize_newtype_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            visitor: V,
        ) -> Result<V::Value, Error> {
            visitor.visit_newtype_struct(self)
        }

        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _name: &'static str,
            _variants: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Error> {
            visitor.visit_enum(StrDeserializer::<Error>::new(self.0))
        }

        parsed! {
            'de;
            deserialize_bool => visit_bool,
            deserialize_i8 => visit_i8,
            deserialize_i16 => visit_i16,
            deserialize_i32 => visit_i32,
            deserialize_i64 => visit_i64,
            deserialize_u8 => visit_u8,
            deserialize_u16 => visit_u16,
            deserialize_u32 => visit_u32,
            deserialize_u64 => visit_u64,
            deserialize_f32 => visit_f32,
            deserialize_f64 => visit_f64,
        }

        serde::forward_to_deserialize_any! {
            i128 u128 char str string bytes byte_buf unit unit_struct seq tuple
            tuple_struct map struct identifier ignored_any
        }
    }
}

/// The authenticated caller.
pub struct Auth(pub Principal);

/// A request extension: the caller as an outer layer (the rate limits)
/// already authenticated it, so that `Auth` does not look the key up twice.
#[derive(Debug, Clone, Copy)]
pub struct Authenticated(pub Principal);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(Authenticated(principal)) = parts.extensions.get::<Authenticated>() {
            return Ok(Auth(*principal));
        }
        let header = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
            ApiError::unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
            )
        })?;
        let key = header
            .to_str()
            .ok()
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                ApiError::unauthorized("Malformed Authorization header: expected 'Bearer <key>'.")
            })?;
        match state.auth.authenticate(key).await? {
            Some(principal) => Ok(Auth(principal)),
            None => Err(ApiError::unauthorized("Incorrect API key provided.")),
        }
    }
}

/// An authenticated caller holding an admin key.
pub struct Admin(pub Principal);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Auth(principal) = Auth::from_request_parts(parts, state).await?;
        if principal.admin {
            Ok(Admin(principal))
        } else {
            Err(ApiError::forbidden("This route needs an admin key."))
        }
    }
}

/// A read's requested consistency mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadMode {
    Eventual,
    Bounded,
    Session,
    Strong,
}

/// What the client asked for: `?consistency=` (default `session`) and the
/// `Turnpike-Consistency` token, if sent.
#[derive(Debug, Clone, Copy)]
pub struct ReadConsistency {
    pub mode: ReadMode,
    pub token: Option<Lsn>,
}

impl ReadMode {
    /// The mode `?consistency=` names, read without serde: every read
    /// parses it, and the query's other parameters are its handler's.
    fn from_query(query: &str) -> Result<Option<Self>, ApiError> {
        // A query with nothing escaped is split as it is, as the form
        // parser would split it, without decoding each name and value.
        match plain_pairs(query) {
            Some(pairs) => {
                Self::pick(pairs.map(|(name, value)| (Cow::Borrowed(name), Cow::Borrowed(value))))
            }
            None => Self::pick(form_urlencoded::parse(query.as_bytes())),
        }
    }

    /// The `consistency` parameter among a query's pairs, if any.
    fn pick<'a>(
        pairs: impl Iterator<Item = (Cow<'a, str>, Cow<'a, str>)>,
    ) -> Result<Option<Self>, ApiError> {
        let invalid = || {
            ApiError::invalid(
                "consistency",
                "consistency must be one of: eventual, bounded, session, strong.",
            )
        };
        let mut mode = None;
        for (name, value) in pairs {
            if name != "consistency" {
                continue;
            }
            if mode.is_some() {
                return Err(invalid());
            }
            mode = Some(match &*value {
                "eventual" => ReadMode::Eventual,
                "bounded" => ReadMode::Bounded,
                "session" => ReadMode::Session,
                "strong" => ReadMode::Strong,
                _ => return Err(invalid()),
            });
        }
        Ok(mode)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ReadConsistency {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let consistency = ReadMode::from_query(parts.uri.query().unwrap_or(""))?;
        let token = match parts.headers.get(&CONSISTENCY_NAME) {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<Lsn>().ok())
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "Turnpike-Consistency",
                            "Turnpike-Consistency must be a token from a write response, like 0/16B3748.",
                        )
                    })?,
            ),
        };
        Ok(ReadConsistency {
            mode: consistency.unwrap_or(ReadMode::Session),
            token,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;

    #[derive(Debug, PartialEq, serde::Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Order {
        Asc,
        Desc,
    }

    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Params {
        limit: Option<i64>,
        after: Option<String>,
        order: Option<Order>,
        stream: Option<bool>,
        starting_after: Option<u64>,
        ratio: Option<f64>,
        consistency: Option<serde::de::IgnoredAny>,
    }

    #[test]
    fn a_plain_query_reads_as_the_form_parser_reads_it() {
        for query in [
            "",
            "limit=20",
            "limit=20&order=asc&consistency=eventual",
            "after=msg_1&limit=5&order=desc",
            "stream=true&starting_after=7",
            "ratio=0.5&limit=-1",
            "&&limit=4&",
            "after=",
            "unknown=1&include[]=a&include[]=b&limit=3",
            // Refused by both, so worded by the form parser.
            "limit=ten",
            "limit=",
            "limit",
            "order=sideways",
            "order=Asc",
            "stream=yes",
            "stream=TRUE",
            "starting_after=-1",
            "limit=99999999999999999999",
            "limit=1&limit=2",
        ] {
            let pairs = plain_pairs(query).expect("nothing escaped");
            let plain = plain::from_pairs::<Params>(pairs).ok();
            let form = serde_urlencoded::from_str::<Params>(query).ok();
            assert_eq!(plain, form, "{query}");
        }
        assert!(plain_pairs("after=a%20b").is_none());
        assert!(plain_pairs("after=a+b").is_none());
    }

    #[test]
    fn a_refused_query_names_its_parameter() {
        let refusal = |query| match parse_query::<Params>(query) {
            Ok(params) => panic!("{query} was read as {params:?}"),
            Err(e) => (e.param, e.message),
        };
        assert_eq!(
            refusal("limit=ten"),
            (
                Some("limit".to_owned()),
                "Invalid query parameter 'limit': invalid digit found in string".to_owned()
            )
        );
        // Escaped, so read by the form parser.
        assert_eq!(refusal("order=%20asc").0.as_deref(), Some("order"));
        assert_eq!(
            refusal("limit=1&after=x&limit=2"),
            (
                Some("limit".to_owned()),
                "Invalid query parameter 'limit': duplicate field `limit`".to_owned()
            )
        );
        // A body's repeated field is named the same way.
        let body = parse_json::<Params>(br#"{"limit": 1, "limit": 2}"#).map(|_| ());
        assert_eq!(body.map_err(|e| e.param), Err(Some("limit".to_owned())));
        let read = parse_query::<Params>("after=a%20b&order=asc").map_err(|e| e.message);
        assert_eq!(
            read.map(|p| (p.after, p.order)),
            Ok((Some("a b".to_owned()), Some(Order::Asc)))
        );
    }

    #[test]
    fn the_consistency_parameter_is_read_from_the_query() {
        let mode = |query| ReadMode::from_query(query).map_err(|e| e.param);
        assert_eq!(mode(""), Ok(None));
        assert_eq!(mode("limit=20&order=asc"), Ok(None));
        assert_eq!(
            mode("limit=20&consistency=eventual"),
            Ok(Some(ReadMode::Eventual))
        );
        assert_eq!(mode("consistency=bounded"), Ok(Some(ReadMode::Bounded)));
        assert_eq!(mode("consistency=session"), Ok(Some(ReadMode::Session)));
        // Percent-encoded, as any form parser reads it.
        assert_eq!(mode("consistency=%73trong"), Ok(Some(ReadMode::Strong)));
        let refused = Err(Some("consistency".to_owned()));
        assert_eq!(mode("consistency=Strong"), refused);
        assert_eq!(mode("consistency="), refused);
        assert_eq!(mode("consistency=strong&consistency=eventual"), refused);
        // Split as the form parser splits: empty pairs skipped, a name
        // without `=` has an empty value.
        assert_eq!(mode("&&consistency=strong&"), Ok(Some(ReadMode::Strong)));
        assert_eq!(mode("consistency"), refused);
        assert_eq!(
            mode("q=a+b&consistency=bounded"),
            Ok(Some(ReadMode::Bounded))
        );
        assert_eq!(mode("consistency=+strong"), refused);
    }
}
