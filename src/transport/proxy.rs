//! The PROXY protocol, version 2 (HAProxy's binary header), read at the start of a
//! connection accepted behind a proxy that speaks it (`--proxy-protocol`): the address
//! it carries is the connection's peer, so that per-peer shares count callers and not
//! the proxy. Exactly the header's bytes are read; what follows (TLS, HTTP) is left for
//! the connection. A connection without a valid header is refused. With the flag off
//! nothing is read here, and a header is just bytes the protocol after it rejects.

use std::{net::SocketAddr, time::Duration};

use ppp::v2::{Addresses, Command, Header};
use tokio::{io::AsyncReadExt, net::TcpStream};

/// The header's fixed part: 12 signature bytes, version and command, family and
/// protocol, and the length of the rest.
const FIXED_LEN: usize = 16;
/// The proxy sends the header as soon as it connects: a connection whose header has not
/// arrived within this long is refused.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    #[error("no PROXY header within {HEADER_TIMEOUT:?}")]
    Timeout,
    #[error("the connection ended before its PROXY header did")]
    Io(#[from] std::io::Error),
    #[error("not a PROXY protocol v2 header: {0}")]
    Invalid(String),
}

/// Reads the header at the start of `tcp` and returns the peer it names: the source
/// address it carries, or `tcp`'s own peer for a LOCAL command (the proxy's health
/// check) or an address family other than IPv4 and IPv6.
pub(crate) async fn read_header(
    tcp: &mut TcpStream,
    tcp_peer: SocketAddr,
) -> Result<SocketAddr, Refused> {
    tokio::time::timeout(HEADER_TIMEOUT, read(tcp, tcp_peer))
        .await
        .map_err(|_| Refused::Timeout)?
}

async fn read(tcp: &mut TcpStream, tcp_peer: SocketAddr) -> Result<SocketAddr, Refused> {
    let mut bytes = vec![0u8; FIXED_LEN];
    tcp.read_exact(&mut bytes).await?;
    if !bytes.starts_with(ppp::v2::PROTOCOL_PREFIX) {
        return Err(Refused::Invalid("no PROXY v2 signature".into()));
    }
    let rest = u16::from_be_bytes([bytes[14], bytes[15]]) as usize;
    bytes.resize(FIXED_LEN + rest, 0);
    tcp.read_exact(&mut bytes[FIXED_LEN..]).await?;
    peer_of(&bytes, tcp_peer)
}

/// The peer a whole header names (see [`read_header`]).
fn peer_of(bytes: &[u8], tcp_peer: SocketAddr) -> Result<SocketAddr, Refused> {
    let header = Header::try_from(bytes).map_err(|e| Refused::Invalid(e.to_string()))?;
    if header.command == Command::Local {
        return Ok(tcp_peer);
    }
    Ok(match header.addresses {
        Addresses::IPv4(a) => SocketAddr::from((a.source_address, a.source_port)),
        Addresses::IPv6(a) => SocketAddr::from((a.source_address, a.source_port)),
        Addresses::Unspecified | Addresses::Unix(_) => tcp_peer,
    })
}

#[cfg(test)]
mod tests {
    use ppp::v2::{Builder, Protocol, Version};

    use super::*;

    fn header(command: Command, addresses: impl Into<Addresses>) -> Vec<u8> {
        Builder::with_addresses(Version::Two | command, Protocol::Stream, addresses)
            .build()
            .unwrap()
    }

    /// A PROXY command names the source it carries; LOCAL names the proxy itself; a
    /// header that is not PROXY v2 is refused.
    #[test]
    fn the_header_names_the_peer() {
        let proxy: SocketAddr = "10.0.0.9:40000".parse().unwrap();
        let v4 = header(
            Command::Proxy,
            (
                "192.0.2.7:5555".parse::<SocketAddr>().unwrap(),
                "10.0.0.1:443".parse::<SocketAddr>().unwrap(),
            ),
        );
        assert_eq!(
            peer_of(&v4, proxy).unwrap(),
            "192.0.2.7:5555".parse().unwrap()
        );
        let v6 = header(
            Command::Proxy,
            (
                "[2001:db8::7]:5555".parse::<SocketAddr>().unwrap(),
                "[2001:db8::1]:443".parse::<SocketAddr>().unwrap(),
            ),
        );
        assert_eq!(
            peer_of(&v6, proxy).unwrap(),
            "[2001:db8::7]:5555".parse().unwrap()
        );
        let local = header(Command::Local, Addresses::Unspecified);
        assert_eq!(peer_of(&local, proxy).unwrap(), proxy);
        let mut broken = v4.clone();
        broken[12] = 0x11;
        assert!(matches!(peer_of(&broken, proxy), Err(Refused::Invalid(_))));
    }
}
