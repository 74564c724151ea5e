//! Sockets every HTTP listener of Turnpike shares, and the api's server.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::serve::{ListenerExt as _, TapIo};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The listener with `TCP_NODELAY` set on every accepted connection.
///
/// A server-sent event is one small write after another. With Nagle's
/// algorithm on, the kernel holds each small segment until the previous one
/// is acknowledged, and a client with nothing to send delays that
/// acknowledgement by up to 40 ms: a stream's second event, and every one
/// after a pause, would wait for it. `axum::serve` does not set the option.
pub fn nodelay(listener: TcpListener) -> TapIo<TcpListener, fn(&mut TcpStream)> {
    listener.tap_io(set_nodelay as fn(&mut TcpStream))
}

fn set_nodelay(stream: &mut TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY could not be set; serving anyway");
    }
}

/// What a client opening an HTTP/2 connection without TLS sends first.
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a new connection speaks, from its first bytes.
#[derive(Debug, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
    /// The bytes so far begin the HTTP/2 preface without completing it.
    Undecided,
}

fn protocol(first: &[u8]) -> Protocol {
    let n = first.len().min(HTTP2_PREFACE.len());
    if first[..n] != HTTP2_PREFACE[..n] {
        Protocol::Http1
    } else if n == HTTP2_PREFACE.len() {
        Protocol::Http2
    } else {
        Protocol::Undecided
    }
}

/// Serves `router` over HTTP/1.1 and cleartext HTTP/2 until `shutdown`
/// resolves, then stops accepting and lets every open connection finish
/// its requests (the caller bounds how long).
///
/// What `axum::serve` does, except for how a connection's protocol is
/// told: `axum::serve` reads the first bytes of every connection to look
/// for the HTTP/2 preface and hands them to the HTTP/1.1 parser ahead of
/// the socket, so the parser's first read returns those few bytes alone and
/// its 8 KiB read buffer is grown to 16 KiB to read the rest. A long-lived
/// stream holds that buffer for its whole life. Here the first bytes are
/// peeked, not read, so the parser reads the whole request head at once.
/// Connections cannot be upgraded (no route needs it: no WebSockets).
///
/// A connection idle for `idle_timeout` is closed ([`Activity`]): one
/// that sends nothing, an idle keep-alive one, one that sends its request
/// head a byte at a time and one whose client stopped reading its answer,
/// which would otherwise each hold a task and a socket for as long as the
/// client likes.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    idle_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let (stop, stopping) = watch::channel(());
    let mut shutdown = pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let mut stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                if must_pause(&e) {
                    // Shutdown does not wait for the pause.
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                continue;
            }
        };
        set_nodelay(&mut stream);
        tokio::spawn(connection(
            stream,
            router.clone(),
            idle_timeout,
            stopping.clone(),
        ));
    }
    drop(listener);
    drop(stopping);
    stop.send_replace(());
    // Every connection holds a receiver until it has finished.
    stop.closed().await;
    Ok(())
}

/// An error accepting a connection: one the client caused is skipped; any
/// other (out of file descriptors, say) is logged, and accepting pauses for
/// a second, as `axum::serve` does.
fn must_pause(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) {
        return false;
    }
    tracing::error!(error = %e, "accepting a connection failed; pausing for a second");
    true
}

/// One connection: its protocol from a peek at its first bytes, then
/// served until it closes, the server stops (`stopping` changes) or it has
/// been idle for `idle_timeout`. Answers the protocol it was served with,
/// if any.
async fn connection(
    stream: TcpStream,
    router: Router,
    idle_timeout: Duration,
    mut stopping: watch::Receiver<()>,
) -> Option<Protocol> {
    let mut first = [0u8; HTTP2_PREFACE.len()];
    let peeked = tokio::select! {
        peeked = stream.peek(&mut first) => peeked,
        _ = stopping.changed() => return None,
        () = tokio::time::sleep(idle_timeout) => return None,
    };
    let protocol = match peeked {
        Ok(0) | Err(_) => return None,
        Ok(n) => protocol(&first[..n]),
    };
    let activity = Arc::new(Activity::default());
    let io = TokioIo::new(Counted {
        stream,
        activity: Arc::clone(&activity),
    });
    let service = Watched {
        router,
        activity: Arc::clone(&activity),
    };
    let watch = IdleWatch {
        activity,
        timeout: idle_timeout,
    };
    match &protocol {
        Protocol::Http1 => {
            let conn = http1::Builder::new().serve_connection(io, service);
            drive(conn, watch, stopping).await;
        }
        // Boxed: the task of every HTTP/1.1 connection, an idle stream's
        // included, is then only as large as an HTTP/1.1 connection needs.
        Protocol::Http2 => {
            let conn = http2::Builder::new(TokioExecutor::new()).serve_connection(io, service);
            Box::pin(drive(conn, watch, stopping)).await;
        }
        // A client that sent part of the preface so far: the version is
        // read the usual way.
        Protocol::Undecided => {
            let builder = auto::Builder::new(TokioExecutor::new());
            Box::pin(drive(
                builder.serve_connection(io, service),
                watch,
                stopping,
            ))
            .await;
        }
    }
    Some(protocol)
}

/// What a connection has done, for telling when it has gone idle: a
/// connection is idle while no request of it is being handled and nothing
/// is sent on it (a request that arrives is handled, and its answer sent). A stream is not idle: it sends
/// its events, and a keep-alive comment when there are none
/// (`events.keepalive_ms`, below the idle timeout).
///
/// hyper's own header read timeout would do part of this, with a timer set
/// and cancelled for every request; these counters cost a few atomic adds
/// per request, and one timer per connection that fires a few times per
/// idle timeout.
#[derive(Debug, Default)]
struct Activity {
    /// Requests whose handler has not answered yet.
    handling: AtomicUsize,
    /// Bytes sent so far.
    sent: AtomicU64,
}

impl Activity {
    /// The bytes sent so far; `None` while a request is being handled.
    fn progress(&self) -> Option<u64> {
        (self.handling.load(Ordering::Relaxed) == 0).then(|| self.sent.load(Ordering::Relaxed))
    }
}

/// The connection's socket, counting what is sent on it.
struct Counted {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl Counted {
    fn sent(&self, result: &Poll<std::io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = result {
            self.activity.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.sent(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.sent(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The router, counting the requests it handles. A hyper service of its
/// own, so that a request counts from the moment hyper hands it over (an
/// HTTP/2 stream's handling is spawned, and a request counted only once
/// that task first ran could start just as its connection is judged idle).
#[derive(Clone)]
struct Watched {
    router: Router,
    activity: Arc<Activity>,
}

impl<B> hyper::service::Service<hyper::Request<B>> for Watched
where
    Router: tower::Service<hyper::Request<B>>,
{
    type Response = <Router as tower::Service<hyper::Request<B>>>::Response;
    type Error = <Router as tower::Service<hyper::Request<B>>>::Error;
    type Future = Handling<tower::util::Oneshot<Router, hyper::Request<B>>>;

    fn call(&self, request: hyper::Request<B>) -> Self::Future {
        self.activity.handling.fetch_add(1, Ordering::Relaxed);
        Handling {
            inner: tower::ServiceExt::oneshot(self.router.clone(), request),
            handled: Handled(Arc::clone(&self.activity)),
        }
    }
}

/// Counts its request as handled when dropped: answered, or given up.
struct Handled(Arc<Activity>);

impl Drop for Handled {
    fn drop(&mut self) {
        self.0.handling.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// A request's handling, counted while it runs.
    struct Handling<F> {
        #[pin]
        inner: F,
        handled: Handled,
    }
}

impl<F: Future> Future for Handling<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

/// Tells when a connection has been idle for its timeout, looking a few
/// times per timeout: it is closed between one and one and a quarter
/// timeouts after it went idle.
struct IdleWatch {
    activity: Arc<Activity>,
    timeout: Duration,
}

impl IdleWatch {
    /// Resolves once the connection has been idle for the timeout.
    async fn idle(&self) {
        let every = self.timeout / 4;
        let mut seen = self.activity.progress();
        let mut quiet = Duration::ZERO;
        loop {
            tokio::time::sleep(every).await;
            let now = self.activity.progress();
            if now.is_none() || now != seen {
                seen = now;
                quiet = Duration::ZERO;
            } else {
                quiet += every;
                if quiet >= self.timeout {
                    return;
                }
            }
        }
    }
}

/// Runs a connection to its end, asking it to finish its requests and
/// close once the server stops, and closing it once it is idle.
async fn drive<C>(conn: C, watch: IdleWatch, mut stopping: watch::Receiver<()>)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let mut conn = pin!(conn);
    let result = tokio::select! {
        // In this order: no random start for each of the connection's wakes.
        biased;
        result = conn.as_mut() => result,
        _ = stopping.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        () = watch.idle() => {
            // Closed the way a stopping server closes it (an HTTP/2 client
            // is told with a GOAWAY which streams were handled), and dropped
            // if it does not close by itself soon.
            tracing::debug!(timeout = ?watch.timeout, "closing an idle connection");
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(watch.timeout / 4, conn).await {
                Ok(result) => result,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::time::Duration;

    use axum::serve::Listener as _;

    /// An idle timeout no test waits out.
    const LONG: Duration = Duration::from_secs(600);

    #[tokio::test]
    async fn accepted_connections_have_nodelay_set() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut listener = super::nodelay(listener);
        let client = tokio::net::TcpStream::connect(addr);
        let ((accepted, _), _client) = tokio::join!(listener.accept(), client);
        assert!(accepted.nodelay().unwrap());
    }

    /// Reads one answer from `stream`: the test router's 200.
    async fn assert_served(stream: &mut tokio::net::TcpStream) {
        use tokio::io::AsyncReadExt as _;
        let mut answer = vec![0u8; 1024];
        let n = stream.read(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("served"), "{answer}");
    }

    /// `serve` answers, and stops at shutdown although a connection has
    /// sent nothing (its protocol is never known) and another is still open.
    #[tokio::test]
    async fn serve_answers_and_stops_with_connections_open() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new().route("/", axum::routing::post(|| async { "served" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(super::serve(listener, router, LONG, async {
            let _ = stopped.await;
        }));

        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"POST / HTTP/1.1\r\nhost: test\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        assert_served(&mut kept).await;

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        // Both connections were closed by the server.
        assert_eq!(silent.read(&mut [0u8; 16]).await.unwrap(), 0);
        assert_eq!(kept.read(&mut [0u8; 16]).await.unwrap(), 0);
    }

    /// A connection idle for the idle timeout is closed: one that sends
    /// nothing, one that stops halfway through its request head, and one
    /// left idle after its answer. One whose request is being handled, or
    /// whose answer is still being sent, is not idle however long that
    /// takes.
    #[tokio::test]
    async fn idle_connections_are_closed_and_busy_ones_kept() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let idle_timeout = Duration::from_millis(200);
        let release = std::sync::Arc::new(tokio::sync::Notify::new());
        let released = std::sync::Arc::clone(&release);
        let router = axum::Router::new()
            .route("/", axum::routing::post(|| async { "served" }))
            // Answers once the test says so.
            .route(
                "/slow",
                axum::routing::post(move || {
                    let released = std::sync::Arc::clone(&released);
                    async move {
                        released.notified().await;
                        "served"
                    }
                }),
            )
            // A byte every 50 ms for a second: five idle timeouts.
            .route(
                "/trickle",
                axum::routing::post(|| async {
                    let bytes = futures_util::stream::unfold(0u32, |sent| async move {
                        if sent == 20 {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let byte = axum::body::Bytes::from_static(b".");
                        Some((Ok::<_, std::convert::Infallible>(byte), sent + 1))
                    });
                    axum::body::Body::from_stream(bytes)
                }),
            );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(super::serve(listener, router, idle_timeout, async {
            let _ = stopped.await;
        }));
        let request =
            |path: &str| format!("POST {path} HTTP/1.1\r\nhost: test\r\ncontent-length: 0\r\n\r\n");
        let connect = || tokio::net::TcpStream::connect(addr);

        let started = std::time::Instant::now();
        let mut silent = connect().await.unwrap();
        let mut partial = connect().await.unwrap();
        partial
            .write_all(&request("/").as_bytes()[..20])
            .await
            .unwrap();
        let mut idle = connect().await.unwrap();
        idle.write_all(request("/").as_bytes()).await.unwrap();
        assert_served(&mut idle).await;
        let mut slow = connect().await.unwrap();
        slow.write_all(request("/slow").as_bytes()).await.unwrap();
        let mut trickle = connect().await.unwrap();
        trickle
            .write_all(request("/trickle").as_bytes())
            .await
            .unwrap();

        for stream in [&mut silent, &mut partial, &mut idle] {
            let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut [0u8; 64]))
                .await
                .expect("the server closed the connection");
            // Closed, or reset (the partial head was left unread).
            assert_eq!(read.unwrap_or(0), 0);
        }
        assert!(started.elapsed() >= idle_timeout, "{:?}", started.elapsed());

        // The trickle runs for five idle timeouts and arrives whole.
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), async {
            let mut buffer = [0u8; 1024];
            while !answer.ends_with(b"0\r\n\r\n") {
                let n = trickle.read(&mut buffer).await.unwrap();
                assert_ne!(
                    n,
                    0,
                    "closed mid-answer: {}",
                    String::from_utf8_lossy(&answer)
                );
                answer.extend_from_slice(&buffer[..n]);
            }
        })
        .await
        .expect("the trickle ended");
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(answer.matches("\r\n.\r\n").count(), 20, "{answer}");
        // The slow request has been handled for as long: it is answered.
        release.notify_one();
        assert_served(&mut slow).await;

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    /// A connection whose first bytes so far could begin the HTTP/2
    /// preface goes to the server that reads the version itself, and is
    /// served once the rest arrives; it ends when the server stops.
    #[tokio::test]
    async fn a_connection_that_could_still_be_http2_is_served() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.set_nodelay(true).unwrap();
        client.write_all(b"P").await.unwrap();
        // The byte has arrived (and the socket is known to be readable).
        assert_eq!(server.peek(&mut [0u8; 24]).await.unwrap(), 1);
        let router = axum::Router::new().route("/", axum::routing::post(|| async { "served" }));
        let (stop, stopping) = tokio::sync::watch::channel(());
        let served = tokio::spawn(super::connection(server, router, LONG, stopping));
        // The connection's task peeks before this task writes again (one
        // thread: the spawned task runs when this one yields).
        tokio::task::yield_now().await;
        client
            .write_all(b"OST / HTTP/1.1\r\nhost: test\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        assert_served(&mut client).await;
        stop.send_replace(());
        assert_eq!(served.await.unwrap(), Some(super::Protocol::Undecided));
        assert_eq!(client.read(&mut [0u8; 16]).await.unwrap(), 0);
    }

    #[test]
    fn a_connection_is_told_by_its_first_bytes() {
        use super::{HTTP2_PREFACE, Protocol, protocol};
        assert_eq!(protocol(b"GET /v1/models HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(
            protocol(b"POST /v1/responses HTTP/1.1\r\n"),
            Protocol::Http1
        );
        assert_eq!(protocol(b"PUT"), Protocol::Http1);
        assert_eq!(protocol(b"PR"), Protocol::Undecided);
        assert_eq!(protocol(&HTTP2_PREFACE[..23]), Protocol::Undecided);
        assert_eq!(protocol(HTTP2_PREFACE), Protocol::Http2);
    }
}
