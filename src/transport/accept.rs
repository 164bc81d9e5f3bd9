//! Accepting connections, the same way on every listener: the accept loop, where errors
//! of one peer (a reset before accept) are skipped and errors of the listener (out of
//! descriptors, out of buffers) back off instead of spinning a core, logged at most every
//! few seconds; then the connection's place under the listener's cap ([`enter`], at
//! once) and in its peer's share ([`identify`], once the PROXY header, if any, says who
//! the peer is). A connection refused either way is closed at once.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use socket2::{SockRef, TcpKeepalive};
use tokio::{
    net::{TcpListener, TcpStream},
    time::Instant,
};
use tracing::{debug, info, warn};

use super::peers::{Entered, Peer, Peers, Place};

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

/// Takes a place under `peers`' cap for a connection `listener` just accepted; `None`
/// (counted, and the connection closed when the caller drops it) past the cap.
pub(crate) fn enter(peers: &Arc<Peers>, listener: &'static str) -> Option<Entered> {
    match peers.enter() {
        Ok(entered) => Some(entered),
        Err(refused) => {
            crate::metrics::connection_refused(listener, refused.label());
            None
        }
    }
}

/// Whom an accepted connection is for, and its place charged to that peer: the address
/// its PROXY header carries when `proxy`, else its own. `None` (counted; the caller
/// drops the connection, which closes it) when the header is missing or invalid, or
/// the peer holds its share.
pub(crate) async fn identify(
    tcp: &mut TcpStream,
    addr: SocketAddr,
    entered: Entered,
    proxy: bool,
    listener: &'static str,
) -> Option<(SocketAddr, Place)> {
    let peer = if proxy {
        match super::proxy::read_header(tcp, addr).await {
            Ok(peer) => peer,
            Err(e) => {
                debug!(error = %e, %addr, listener, "connection refused: PROXY header");
                crate::metrics::connection_refused(listener, "proxy");
                return None;
            }
        }
    } else {
        addr
    };
    match entered.assign(Peer::of_addr(peer)) {
        Ok(place) => Some((peer, place)),
        Err(refused) => {
            crate::metrics::connection_refused(listener, refused.label());
            None
        }
    }
}

/// TCP keepalive, for peers that vanish without closing (also below HTTP/2's pings).
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// TCP_NODELAY (a unary reply is one small write that must not wait for the client's
/// ACK of the previous one) and TCP keepalive (for peers that vanish without closing),
/// on every listener's connections.
pub(crate) fn configure(tcp: &TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        warn!(error = %e, "cannot set TCP_NODELAY");
    }
    let keepalive = TcpKeepalive::new().with_time(TCP_KEEPALIVE);
    if let Err(e) = SockRef::from(tcp).set_tcp_keepalive(&keepalive) {
        warn!(error = %e, "cannot set TCP keepalive");
    }
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
