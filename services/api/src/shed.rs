//! Load shedding at the HTTP edge: each request's query class, and the
//! operators' kill switches.
//!
//! A request's class comes from its route (`overload.background_routes`;
//! everything else is interactive) and is set around its handling
//! ([`turnpike_core::db::with_class`]), so every read it makes, from the key
//! lookup to the handler's queries, goes to its class's replica group and
//! budget. A request a switch refuses costs no Redis call and no query: it is
//! answered before authentication.

use std::future::Future;

use axum::extract::{MatchedPath, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::future::Either;
use turnpike_core::config::{ConfigError, OverloadSettings};
use turnpike_core::db::{QueryClass, with_class};
use turnpike_core::switches::{Refusal, RoutePattern};
use turnpike_protocol::{ErrorType, SwitchAction};

use crate::AppState;
use crate::error::ApiError;

/// Which routes are background work.
#[derive(Debug, Clone)]
pub struct RouteClasses {
    background: Vec<RoutePattern>,
}

impl RouteClasses {
    pub fn new(settings: &OverloadSettings) -> Result<Self, ConfigError> {
        let background = settings
            .background_routes
            .iter()
            .map(|route| {
                RoutePattern::parse(route)
                    .map_err(|e| ConfigError::Invalid(format!("overload.background_routes: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { background })
    }

    /// The class of a request to `route` (its template) with `method`.
    pub fn class_of(&self, method: &str, route: &str) -> QueryClass {
        if self.background.iter().any(|p| p.matches(method, route)) {
            QueryClass::Background
        } else {
            QueryClass::Interactive
        }
    }
}

/// Routes no switch refuses: the operators' way back in, and the probes
/// that would otherwise take a switched-off process out of service.
fn exempt(route: &str) -> bool {
    route.starts_with("/v1/admin/") || matches!(route, "/healthz" | "/readyz" | "/metrics")
}

/// Refuses what a switch refuses and runs the rest (`next`) in its class.
/// `next` is called here, outside the class's scope, and only its future
/// runs inside it: it must do nothing until polled (an `async fn` call).
pub fn around<F, Fut>(
    app: &AppState,
    request: Request,
    next: F,
) -> impl Future<Output = Response> + use<F, Fut>
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let (class, refusal) = {
        let route = request
            .extensions()
            .get::<MatchedPath>()
            .map_or_else(|| request.uri().path(), MatchedPath::as_str);
        let method = request.method().as_str();
        let class = app.classes.class_of(method, route);
        let refusal = if exempt(route) {
            None
        } else {
            app.switches.check(method, route, class)
        };
        (class, refusal)
    };
    // Not an `async fn`, which would hold the request's future twice.
    match refusal {
        Some(refusal) => Either::Left(std::future::ready(refused(&refusal).into_response())),
        None => Either::Right(with_class(class, next(request))),
    }
}

/// A switch's refusal in the error shape: a block is a 503, a throttle a 429.
fn refused(refusal: &Refusal) -> ApiError {
    match refusal.action {
        SwitchAction::Block => {
            let mut e = ApiError::unavailable(
                format!(
                    "This request is switched off by the operators for now (switch '{}'). Retry later.",
                    refusal.switch
                ),
                refusal.retry_after_s,
            );
            e.code = Some("blocked_by_operator");
            e
        }
        SwitchAction::Throttle => {
            let mut e = ApiError::with_status(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "This request is throttled by the operators for now (switch '{}'). Retry after the delay in Retry-After.",
                    refusal.switch
                ),
                "throttled_by_operator",
            );
            e.kind = ErrorType::RateLimitError;
            e.retry_after = Some(refusal.retry_after_s);
            e
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_background_routes_are_listings_and_admin() {
        let classes =
            RouteClasses::new(&OverloadSettings::default()).unwrap_or_else(|e| panic!("{e}"));
        for (method, route, class) in [
            ("GET", "/v1/conversations", QueryClass::Background),
            ("POST", "/v1/conversations", QueryClass::Interactive),
            (
                "GET",
                "/v1/conversations/{conversation_id}/items",
                QueryClass::Interactive,
            ),
            (
                "GET",
                "/v1/responses/{response_id}/input_items",
                QueryClass::Background,
            ),
            (
                "GET",
                "/v1/responses/{response_id}",
                QueryClass::Interactive,
            ),
            ("GET", "/v1/admin/topology", QueryClass::Background),
        ] {
            assert_eq!(classes.class_of(method, route), class, "{method} {route}");
        }
    }

    #[test]
    fn admin_and_probes_are_never_switched_off() {
        assert!(exempt("/v1/admin/switches/{name}"));
        assert!(exempt("/readyz"));
        assert!(!exempt("/v1/conversations"));
    }
}
