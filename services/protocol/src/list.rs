//! OpenAI's cursor list envelope.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A page of results: `{"object":"list","data":[…],"first_id","last_id","has_more"}`.
/// The next page is asked for with `after=<last_id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct List<T> {
    /// Always `list`.
    pub object: String,
    pub data: Vec<T>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

impl<T> List<T> {
    /// Wraps a page; `ids` gives each element's public id.
    pub fn new(data: Vec<T>, has_more: bool, id: impl Fn(&T) -> String) -> Self {
        Self {
            object: "list".to_owned(),
            first_id: data.first().map(&id),
            last_id: data.last().map(&id),
            data,
            has_more,
        }
    }
}
