//! Reading a request's body: within its route's limit and by a deadline,
//! and refused in the one error shape when it cannot be read.
//!
//! A client that declares a body and stops sending it would otherwise hold
//! its request, and the idempotency claim that goes with it, for as long
//! as it keeps the connection open. The limit is kept here rather than by
//! axum's `DefaultBodyLimit`, which every request, a body or not, paid for
//! with an entry in its extensions.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body::{Frame, SizeHint};

use turnpike_core::config::ApiSettings;

use crate::error::ApiError;

/// Why a body ended early: its deadline passed.
#[derive(Debug)]
struct TimedOut(Duration);

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body did not arrive within {} ms (and a second for each {} KiB received)",
            self.0.as_millis(),
            MIN_RATE_BYTES_PER_S as u64 / 1024
        )
    }
}

impl std::error::Error for TimedOut {}

/// Why a body ended early: it went past its route's limit (bytes).
#[derive(Debug)]
struct TooLarge(usize);

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "The request body is larger than the limit of {} bytes",
            self.0
        )
    }
}

impl std::error::Error for TooLarge {}

/// The rate at which a body always arrives in time, however large: each
/// byte received moves the deadline on by its share of a second at this
/// rate. 16 KiB/s is a slow mobile uplink.
const MIN_RATE_BYTES_PER_S: f64 = 16.0 * 1024.0;

/// A body that fails with [`TooLarge`] past its limit, and with
/// [`TimedOut`] once its deadline passes: the timeout from the request's
/// head, plus the time its bytes so far take at [`MIN_RATE_BYTES_PER_S`].
/// A large body sent slowly but steadily gets through; one that stops, or
/// trickles, does not.
struct Guarded {
    body: Body,
    /// Bytes it may still bring.
    room: usize,
    limit: usize,
    timeout: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// Time earned by bytes received and not yet added to `sleep`: it is
    /// added when `sleep` fires, so a body read in one piece costs no
    /// timer reset.
    earned: Duration,
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref))
                && let Some(data) = data
            {
                let Some(room) = this.room.checked_sub(data.len()) else {
                    this.room = 0;
                    return Poll::Ready(Some(Err(axum::Error::new(TooLarge(this.limit)))));
                };
                this.room = room;
                this.earned += Duration::from_secs_f64(data.len() as f64 / MIN_RATE_BYTES_PER_S);
            }
            return Poll::Ready(frame);
        }
        while this.sleep.as_mut().poll(cx).is_ready() {
            if this.earned.is_zero() {
                return Poll::Ready(Some(Err(axum::Error::new(TimedOut(this.timeout)))));
            }
            let later = this.sleep.deadline() + std::mem::take(&mut this.earned);
            this.sleep.as_mut().reset(later);
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The largest body a request to `path` may send: requests carrying a
/// model's input (a stateless client's whole history) get the larger limit.
fn limit_for(settings: &ApiSettings, path: &str) -> usize {
    if path.starts_with("/v1/responses") || path == "/v1/chat/completions" {
        settings
            .input_body_limit_bytes
            .max(settings.body_limit_bytes)
    } else {
        settings.body_limit_bytes
    }
}

/// `request` with a body that must stay within its route's limit and
/// arrive by a deadline ([`Guarded`]), `api.request_body_timeout_ms` from
/// now at first; or its refusal, before any of the body is read, when its
/// `Content-Length` is over the limit. A request without a body is left as
/// it is, and costs no timer.
pub(crate) fn guard(request: Request, settings: &ApiSettings) -> Result<Request, ApiError> {
    let limit = limit_for(settings, request.uri().path());
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(closing(too_large(limit)));
    }
    if request.body().is_end_stream() {
        return Ok(request);
    }
    let timeout = Duration::from_millis(settings.request_body_timeout_ms);
    Ok(request.map(|body| guarded(body, limit, timeout)))
}

fn guarded(body: Body, limit: usize, timeout: Duration) -> Body {
    Body::new(Guarded {
        body,
        room: limit,
        limit,
        timeout,
        sleep: Box::pin(tokio::time::sleep(timeout)),
        earned: Duration::ZERO,
    })
}

/// The whole of `body`, or its refusal ([`refusal`]).
pub(crate) async fn read(body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, usize::MAX)
        .await
        .map_err(|e| refusal(&e))
}

/// The refusal of a body that could not be read (`error`, with its
/// sources): 408 when it did not arrive in time, 413 when it went past its
/// limit, 400 otherwise (the client broke it off, or sent malformed
/// chunks), each closing the connection ([`closing`]).
fn refusal(error: &(dyn std::error::Error + 'static)) -> ApiError {
    let causes = || std::iter::successors(Some(error), |e| e.source());
    let refusal = if let Some(timed_out) = causes().find_map(|e| e.downcast_ref::<TimedOut>()) {
        ApiError::with_status(
            StatusCode::REQUEST_TIMEOUT,
            format!("Request timed out: {timed_out}."),
            "request_timeout",
        )
    } else if let Some(TooLarge(limit)) = causes().find_map(|e| e.downcast_ref::<TooLarge>()) {
        too_large(*limit)
    } else {
        ApiError::with_status(
            StatusCode::BAD_REQUEST,
            "The request body could not be read to its end.",
            "invalid_body",
        )
    };
    closing(refusal)
}

/// The refusal of a body over its route's limit of `limit` bytes.
fn too_large(limit: usize) -> ApiError {
    ApiError::with_status(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("{}.", TooLarge(limit)),
        "body_too_large",
    )
}

/// `refusal`, closing the connection (over HTTP/1.1): the rest of the body
/// may still be on its way.
fn closing(refusal: ApiError) -> ApiError {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    refusal.with_headers(headers)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use axum::body::{Body, Bytes};
    use axum::http::StatusCode;
    use futures_util::StreamExt as _;
    use std::time::Duration;

    /// A body of `chunks` KiB, one every 10 ms, then nothing more if `stall`.
    fn kibs(chunks: u32, stall: bool) -> Body {
        let sent = futures_util::stream::unfold(0u32, move |sent| async move {
            if sent == chunks {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            Some((
                Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 1024])),
                sent + 1,
            ))
        });
        let rest = futures_util::stream::iter(stall.then(futures_util::stream::pending)).flatten();
        Body::from_stream(sent.chain(rest))
    }

    async fn read(body: Body, limit: usize, timeout: Duration) -> Result<Bytes, StatusCode> {
        super::read(super::guarded(body, limit, timeout))
            .await
            .map_err(|e| e.status)
    }

    #[tokio::test]
    async fn a_body_that_stops_arriving_is_refused_with_408() {
        let body = super::guarded(kibs(0, true), 1024, Duration::from_millis(50));
        let refusal = super::read(body).await.unwrap_err();
        assert_eq!(refusal.status, StatusCode::REQUEST_TIMEOUT);
        assert!(refusal.message.contains("50 ms"), "{}", refusal.message);
    }

    #[tokio::test]
    async fn a_body_within_its_limit_and_time_is_read_whole() {
        let body = Body::from("{\"a\":1}");
        let bytes = read(body, 7, Duration::from_secs(30)).await.unwrap();
        assert_eq!(&bytes[..], b"{\"a\":1}");
    }

    /// A body that keeps coming above the minimum rate is read whole,
    /// though it takes several times the timeout; one that stops is cut off
    /// once the time its bytes earned is spent.
    #[tokio::test]
    async fn a_steady_body_earns_its_time_and_a_stalled_one_does_not() {
        // 100 KiB/s for 200 ms, against a 50 ms timeout.
        let bytes = read(kibs(20, false), 1 << 20, Duration::from_millis(50)).await;
        assert_eq!(bytes.unwrap().len(), 20 * 1024);
        let stalled = read(kibs(1, true), 1 << 20, Duration::from_millis(50)).await;
        assert_eq!(stalled.unwrap_err(), StatusCode::REQUEST_TIMEOUT);
    }

    #[tokio::test]
    async fn a_body_over_its_limit_is_refused_with_413() {
        let whole = read(Body::from(vec![b'x'; 2048]), 2047, Duration::from_secs(30)).await;
        assert_eq!(whole.unwrap_err(), StatusCode::PAYLOAD_TOO_LARGE);
        let streamed = read(kibs(3, false), 2048, Duration::from_secs(30)).await;
        assert_eq!(streamed.unwrap_err(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
