//! Sockets every HTTP listener of Turnpike shares.

use axum::serve::{ListenerExt as _, TapIo};
use tokio::net::{TcpListener, TcpStream};

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use axum::serve::Listener as _;

    #[tokio::test]
    async fn accepted_connections_have_nodelay_set() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut listener = super::nodelay(listener);
        let client = tokio::net::TcpStream::connect(addr);
        let ((accepted, _), _client) = tokio::join!(listener.accept(), client);
        assert!(accepted.nodelay().unwrap());
    }
}
