//! Accepting connections: the loop every listener shares. Errors of one peer (a reset
//! before accept) are skipped; errors of the listener (out of descriptors, out of
//! buffers) back off instead of spinning a core, and are logged at most every few
//! seconds.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use futures_util::{Stream, stream};
use socket2::{SockRef, TcpKeepalive};
use tokio::{
    net::{TcpListener, TcpStream},
    time::Instant,
};
use tracing::{info, warn};

use super::conn::{Connection, Connections};

/// After an accept error other than a peer's own (EMFILE, ENFILE, ENOBUFS...), the
/// loop waits this long before accepting again: retrying at once spins a core while
/// the process is out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Accept errors are logged at most once per this interval.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(5);

/// The next connection of `listener`, waiting out listener errors. `last_logged` is
/// when an accept error was last logged, kept by the caller across calls.
pub(crate) async fn accept(
    listener: &TcpListener,
    last_logged: &mut Option<Instant>,
) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) if is_peer_error(&e) => continue,
            Err(e) => {
                if last_logged.is_none_or(|at| at.elapsed() >= ACCEPT_LOG_EVERY) {
                    warn!(error = %e, backoff = ?ACCEPT_BACKOFF, "cannot accept connections");
                    *last_logged = Some(Instant::now());
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Raises the soft limit on open files to the hard limit, so that the connection cap
/// and not the default 1024 descriptors is what bounds connections.
pub(crate) fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => info!(limit, "open files limit"),
        Err(e) => warn!(error = %e, "cannot raise the open files limit"),
    }
}

/// Connections accepted from `listener` with TCP_NODELAY and TCP keepalive, at most
/// `--max-connections` open at once: one past the cap is closed at once. Accept errors
/// never end the stream.
pub(crate) fn incoming(
    listener: TcpListener,
    connections: Arc<Connections>,
    keepalive: Duration,
) -> impl Stream<Item = io::Result<Connection>> {
    let keepalive = TcpKeepalive::new().with_time(keepalive);
    let last_logged: Option<Instant> = None;
    stream::unfold(
        (listener, connections, keepalive, last_logged),
        |(listener, connections, keepalive, mut last_logged)| async move {
            loop {
                let (tcp, peer) = accept(&listener, &mut last_logged).await;
                let Ok(permit) = connections.permits.clone().try_acquire_owned() else {
                    crate::metrics::connection_refused();
                    continue;
                };
                if let Err(e) = tcp.set_nodelay(true) {
                    warn!(error = %e, "cannot set TCP_NODELAY");
                }
                if let Err(e) = SockRef::from(&tcp).set_tcp_keepalive(&keepalive) {
                    warn!(error = %e, "cannot set TCP keepalive");
                }
                let conn = Connection::new(tcp, peer, permit, &connections);
                return Some((Ok(conn), (listener, connections, keepalive, last_logged)));
            }
        },
    )
}

/// An error that concerns one peer only, not the listener.
fn is_peer_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}
