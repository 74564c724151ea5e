//! Reading a request's body: by a deadline, and refused in the one error
//! shape when it cannot be read.
//!
//! A client that declares a body and stops sending it would otherwise hold
//! its request, and the admission and idempotency claim that go with it,
//! for as long as it keeps the connection open.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body::{Frame, SizeHint};

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

/// The rate at which a body always arrives in time, however large: each
/// byte received moves the deadline on by its share of a second at this
/// rate. 16 KiB/s is a slow mobile uplink.
const MIN_RATE_BYTES_PER_S: f64 = 16.0 * 1024.0;

/// A body that fails with [`TimedOut`] once its deadline passes: the
/// timeout from the request's head, plus the time its bytes so far take
/// at [`MIN_RATE_BYTES_PER_S`]. A large body sent slowly but steadily gets
/// through; one that stops, or trickles, does not.
struct Deadline {
    body: Body,
    timeout: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// Time earned by bytes received and not yet added to `sleep`: it is
    /// added when `sleep` fires, so a body read in one piece costs no
    /// timer reset.
    earned: Duration,
}

impl HttpBody for Deadline {
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

/// `request` with a body that must arrive by a deadline ([`Deadline`]),
/// `timeout` from now at first. A request without a body is left as it
/// is, and costs no timer.
pub(crate) fn with_deadline(request: Request, timeout: Duration) -> Request {
    if request.body().is_end_stream() {
        return request;
    }
    request.map(|body| {
        Body::new(Deadline {
            body,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            earned: Duration::ZERO,
        })
    })
}

/// The refusal of a body that could not be read (`error`, with its
/// sources): 408 when it did not arrive in time, 413 when it was over the
/// limit (`limit`, where the caller knows it), 400 otherwise (the client broke it off, or sent malformed
/// chunks). A refusal before the end of the body closes the connection: the
/// rest of it may still be on its way.
pub(crate) fn refusal(error: &(dyn std::error::Error + 'static), limit: Option<usize>) -> ApiError {
    let mut causes = std::iter::successors(Some(error), |e| e.source());
    let refusal = if let Some(timed_out) = causes.find_map(|e| e.downcast_ref::<TimedOut>()) {
        ApiError::with_status(
            StatusCode::REQUEST_TIMEOUT,
            format!("Request timed out: {timed_out}."),
            "request_timeout",
        )
    } else if std::iter::successors(Some(error), |e| e.source())
        .any(|e| e.is::<http_body_util::LengthLimitError>())
    {
        ApiError::with_status(
            StatusCode::PAYLOAD_TOO_LARGE,
            match limit {
                Some(limit) => {
                    format!("The request body is larger than the limit of {limit} bytes.")
                }
                None => "The request body is larger than the limit.".to_owned(),
            },
            "body_too_large",
        )
    } else {
        ApiError::with_status(
            StatusCode::BAD_REQUEST,
            "The request body could not be read to its end.",
            "invalid_body",
        )
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    refusal.with_headers(headers)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use axum::body::Body;
    use axum::extract::Request;
    use axum::http::StatusCode;
    use futures_util::StreamExt as _;
    use std::time::Duration;

    /// A body that never sends its bytes.
    fn stalled() -> Body {
        Body::from_stream(futures_util::stream::pending::<
            Result<bytes::Bytes, std::io::Error>,
        >())
    }

    #[tokio::test]
    async fn a_body_that_stops_arriving_is_refused_with_408() {
        let request = super::with_deadline(Request::new(stalled()), Duration::from_millis(50));
        let error = axum::body::to_bytes(request.into_body(), 1024)
            .await
            .unwrap_err();
        let refusal = super::refusal(&error, Some(1024));
        assert_eq!(refusal.status, StatusCode::REQUEST_TIMEOUT);
        assert!(refusal.message.contains("50 ms"), "{}", refusal.message);
    }

    #[tokio::test]
    async fn a_body_that_arrives_in_time_is_read_whole() {
        let request = super::with_deadline(
            Request::new(Body::from("{\"a\":1}")),
            Duration::from_secs(30),
        );
        let bytes = axum::body::to_bytes(request.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(&bytes[..], b"{\"a\":1}");
    }

    /// A body that keeps coming at the minimum rate is read whole, though
    /// it takes several times the timeout; one that stops is cut off.
    #[tokio::test]
    async fn a_steady_body_earns_its_time_and_a_stalled_one_does_not() {
        // 1 KiB every 10 ms (100 KiB/s, above the minimum) for 200 ms.
        let steady = futures_util::stream::unfold(0u32, |sent| async move {
            if sent == 20 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            Some((
                Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 1024])),
                sent + 1,
            ))
        });
        let request = super::with_deadline(
            Request::new(Body::from_stream(steady)),
            Duration::from_millis(50),
        );
        let bytes = axum::body::to_bytes(request.into_body(), 1 << 20)
            .await
            .unwrap();
        assert_eq!(bytes.len(), 20 * 1024);

        // The same start, then nothing: cut off once the time earned is spent.
        let stalls =
            futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(vec![
                b'x';
                1024
            ]))])
            .chain(futures_util::stream::pending());
        let request = super::with_deadline(
            Request::new(Body::from_stream(stalls)),
            Duration::from_millis(50),
        );
        let error = axum::body::to_bytes(request.into_body(), 1 << 20)
            .await
            .unwrap_err();
        assert_eq!(
            super::refusal(&error, None).status,
            StatusCode::REQUEST_TIMEOUT
        );
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused_with_413() {
        let request = super::with_deadline(
            Request::new(Body::from(vec![b'x'; 2048])),
            Duration::from_secs(30),
        );
        let error = axum::body::to_bytes(request.into_body(), 1024)
            .await
            .unwrap_err();
        assert_eq!(
            super::refusal(&error, Some(1024)).status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }
}
