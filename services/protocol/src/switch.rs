//! Query classes and operator kill switches (`/v1/admin/switches`).
//!
//! A switch throttles or blocks the requests of one route, or of every
//! route in one query class, on every api process at once. Its stored form
//! in Redis is the same [`Switch`] the admin API returns.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The two priority classes of database work. Each class has its own
/// concurrency budget on every node, and replicas can be dedicated to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum QueryClass {
    /// A person is waiting: reading a conversation, posting a turn.
    Interactive,
    /// Bulk or tolerant reads (listings, exports, admin), which must never
    /// take interactive capacity.
    Background,
}

impl QueryClass {
    /// The class's name, as in configuration and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Interactive => "interactive",
            Self::Background => "background",
        }
    }
}

/// What a switch does to the requests it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SwitchAction {
    /// Refuse every matching request: 503 with `Retry-After`, code `blocked_by_operator`.
    Block,
    /// Admit matching requests up to `rate_per_s` per api process, or
    /// `share_percent` of them; the rest get 429 with `Retry-After`, code
    /// `throttled_by_operator`.
    Throttle,
}

/// `PUT /v1/admin/switches/{name}`: sets (creates or replaces) a switch.
/// Exactly one of `route` and `class`; a throttle names exactly one of
/// `rate_per_s` and `share_percent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSwitch {
    /// The route it applies to: `METHOD /path/{param}` as the route is
    /// declared (e.g. `GET /v1/conversations/{conversation_id}/items`),
    /// a path without a method (every method), a prefix ending in `*`
    /// (`/v1/responses*`), or `*` for every route. Admin, health and
    /// metrics routes are never switched off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Or every route of a query class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<QueryClass>,
    pub action: SwitchAction,
    /// Throttle: requests admitted per second, per api process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_s: Option<f64>,
    /// Throttle: the share of requests admitted, 0 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_percent: Option<u8>,
    /// What `Retry-After` tells refused clients, in seconds (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u64>,
    /// Why it was set, for the operators who read the switch list; never
    /// shown to refused clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A switch as stored and as the admin API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Switch {
    /// The operator's name for it (`[A-Za-z0-9_.-]`, at most 64 characters).
    pub name: String,
    /// Always `switch`.
    pub object: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<QueryClass>,
    pub action: SwitchAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_percent: Option<u8>,
    /// Seconds refused clients are told to wait.
    pub retry_after_s: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unix milliseconds of the last change.
    pub updated_at_ms: u64,
}

impl Switch {
    /// The switch `spec` sets under `name`, stamped `updated_at_ms`.
    pub fn new(name: String, spec: SetSwitch, updated_at_ms: u64) -> Self {
        Self {
            name,
            object: "switch".to_owned(),
            route: spec.route,
            class: spec.class,
            action: spec.action,
            rate_per_s: spec.rate_per_s,
            share_percent: spec.share_percent,
            retry_after_s: spec.retry_after_s.unwrap_or(1),
            reason: spec.reason,
            updated_at_ms,
        }
    }
}

/// `DELETE /v1/admin/switches/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SwitchDeleted {
    pub name: String,
    /// Always `switch.deleted`.
    pub object: String,
    pub deleted: bool,
}
