//! Sockets every HTTP listener of Turnpike shares, and the api's server.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use axum::Router;
use axum::serve::{ListenerExt as _, TapIo};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::service::TowerToHyperService;
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
/// A connection that sends no request head within `head_timeout` (from
/// its start, or from the end of its last answer) is closed: one that
/// sends nothing, an idle keep-alive one, and one that sends its head a
/// byte at a time, which would otherwise each hold a task and a socket
/// for as long as the client likes.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    head_timeout: Duration,
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
            head_timeout,
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
/// served until it closes or the server stops (`stopping` changes).
/// Answers the protocol it was served with, if any.
async fn connection(
    stream: TcpStream,
    router: Router,
    head_timeout: Duration,
    mut stopping: watch::Receiver<()>,
) -> Option<Protocol> {
    let mut first = [0u8; HTTP2_PREFACE.len()];
    let peeked = tokio::select! {
        peeked = stream.peek(&mut first) => peeked,
        _ = stopping.changed() => return None,
        () = tokio::time::sleep(head_timeout) => return None,
    };
    let protocol = match peeked {
        Ok(0) | Err(_) => return None,
        Ok(n) => protocol(&first[..n]),
    };
    let io = TokioIo::new(stream);
    let service = TowerToHyperService::new(router);
    match &protocol {
        Protocol::Http1 => {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(head_timeout)
                .serve_connection(io, service);
            drive(conn, stopping).await;
        }
        // Boxed: the task of every HTTP/1.1 connection, an idle stream's
        // included, is then only as large as an HTTP/1.1 connection needs.
        Protocol::Http2 => {
            let conn = http2::Builder::new(TokioExecutor::new()).serve_connection(io, service);
            Box::pin(drive(conn, stopping)).await;
        }
        // A client that sent part of the preface so far: the version is
        // read the usual way.
        Protocol::Undecided => {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(head_timeout);
            Box::pin(drive(builder.serve_connection(io, service), stopping)).await;
        }
    }
    Some(protocol)
}

/// Runs a connection to its end, asking it to finish its requests and
/// close once the server stops.
async fn drive<C>(conn: C, mut stopping: watch::Receiver<()>)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let mut conn = pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = stopping.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
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

    /// A head timeout no test waits out.
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

    /// A connection that sends no request head within the head timeout is
    /// closed: one that sends nothing, one that stops halfway through its
    /// head, and one left idle after its answer; the server goes on serving.
    #[tokio::test]
    async fn connections_without_a_head_are_closed_after_the_head_timeout() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new().route("/", axum::routing::post(|| async { "served" }));
        let head_timeout = Duration::from_millis(300);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(super::serve(listener, router, head_timeout, async {
            let _ = stopped.await;
        }));
        let request = b"POST / HTTP/1.1\r\nhost: test\r\ncontent-length: 0\r\n\r\n";

        let started = std::time::Instant::now();
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
        partial.write_all(&request[..20]).await.unwrap();
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        idle.write_all(request).await.unwrap();
        assert_served(&mut idle).await;
        for stream in [&mut silent, &mut partial, &mut idle] {
            let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut [0u8; 64]))
                .await
                .expect("the server closed the connection");
            // Closed, or reset (the partial head was left unread).
            assert_eq!(read.unwrap_or(0), 0);
        }
        assert!(started.elapsed() >= head_timeout, "{:?}", started.elapsed());

        let mut fresh = tokio::net::TcpStream::connect(addr).await.unwrap();
        fresh.write_all(request).await.unwrap();
        assert_served(&mut fresh).await;
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
