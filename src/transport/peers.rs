//! Who holds a listener's connections: each peer (a remote IPv4 address, or the /64 of
//! an IPv6 one) may hold at most its share of them, so that one peer cannot take every
//! place and lock the others out. Any listener takes a [`Peers`] of its own; a
//! connection holds its [`Place`] until it ends.
//!
//! A listener may keep part of its connections for authenticated callers: a connection
//! taken from that reserve is on probation ([`Place::on_probation`]) until a call on it
//! authenticates, and the listener closes it when none does.
//!
//! Taking a place is two steps, so that a listener behind a proxy can hold the
//! connection under its cap while it reads whom the connection is for (PROXY protocol):
//! [`Peers::enter`] takes a place under the cap, [`Entered::assign`] charges it to its
//! peer.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

/// A peer: an IPv4 address, or an IPv6 /64 (one host or one network on IPv6 owns a whole
/// /64, and can pick any address in it). An IPv4 address mapped into IPv6 is that IPv4
/// address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Peer(IpAddr);

impl Peer {
    pub(crate) fn of(ip: IpAddr) -> Peer {
        match ip {
            IpAddr::V4(v4) => Peer(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Peer(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Peer(IpAddr::V6(Ipv6Addr::from(prefix)))
                }
            },
        }
    }

    pub(crate) fn of_addr(addr: SocketAddr) -> Peer {
        Peer::of(addr.ip())
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// A listener's bounds on connections.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Connections open at once, over all peers.
    pub max_connections: usize,
    /// Connections one peer may hold.
    pub per_peer: usize,
    /// Of `max_connections`, those only an authenticated caller keeps (0: none).
    pub reserved: usize,
}

/// Why a connection was refused a place; the label of its count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The listener's cap.
    Full,
    /// Its peer's share.
    Peer,
}

impl Refused {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Refused::Full => "full",
            Refused::Peer => "peer",
        }
    }
}

/// One listener's connections, by peer.
pub(crate) struct Peers {
    limits: Limits,
    state: Mutex<State>,
}

struct State {
    /// Places taken outside the reserve, and in it.
    general: usize,
    reserve: usize,
    peers: HashMap<Peer, Arc<PeerCounts>>,
}

/// What one peer holds.
#[derive(Debug)]
pub(crate) struct PeerCounts {
    /// Its connections; changed only under the table's lock.
    connections: AtomicUsize,
    /// Its open calls (for the listeners that count calls, `super::track`).
    pub(crate) calls: AtomicUsize,
}

impl PeerCounts {
    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Peers {
    pub(crate) fn new(limits: Limits) -> Arc<Peers> {
        Arc::new(Peers {
            limits,
            state: Mutex::new(State {
                general: 0,
                reserve: 0,
                peers: HashMap::new(),
            }),
        })
    }

    /// Connections open now (those entered but not yet assigned included).
    pub(crate) fn open(&self) -> usize {
        let state = self.state.lock().unwrap();
        state.general + state.reserve
    }

    /// Takes a place under the cap, outside the reserve when one is left there.
    pub(crate) fn enter(self: &Arc<Self>) -> Result<Entered, Refused> {
        let mut state = self.state.lock().unwrap();
        let general = self.limits.max_connections - self.limits.reserved;
        let reserve = if state.general < general {
            state.general += 1;
            false
        } else if state.reserve < self.limits.reserved {
            state.reserve += 1;
            true
        } else {
            return Err(Refused::Full);
        };
        Ok(Entered {
            peers: Some(self.clone()),
            reserve,
        })
    }

    /// [`Peers::enter`] and [`Entered::assign`] at once.
    #[cfg(test)]
    fn admit(self: &Arc<Self>, peer: Peer) -> Result<Place, Refused> {
        self.enter()?.assign(peer)
    }

    fn leave(&self, reserve: bool) {
        let mut state = self.state.lock().unwrap();
        if reserve {
            state.reserve -= 1;
        } else {
            state.general -= 1;
        }
    }
}

/// A place under the cap not yet charged to a peer; released when dropped.
pub(crate) struct Entered {
    peers: Option<Arc<Peers>>,
    reserve: bool,
}

impl Entered {
    /// Charges the place to `peer`, unless the peer holds its share already.
    pub(crate) fn assign(mut self, peer: Peer) -> Result<Place, Refused> {
        let peers = self.peers.take().expect("assigned once");
        let mut state = peers.state.lock().unwrap();
        let counts = state
            .peers
            .entry(peer)
            .or_insert_with(|| {
                Arc::new(PeerCounts {
                    connections: AtomicUsize::new(0),
                    calls: AtomicUsize::new(0),
                })
            })
            .clone();
        if counts.connections() >= peers.limits.per_peer {
            drop(state);
            peers.leave(self.reserve);
            return Err(Refused::Peer);
        }
        counts.connections.fetch_add(1, Ordering::Relaxed);
        drop(state);
        Ok(Place {
            peers,
            peer,
            counts,
            reserve: self.reserve,
        })
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        if let Some(peers) = self.peers.take() {
            peers.leave(self.reserve);
        }
    }
}

/// A connection's place: under the cap and in its peer's share, until dropped.
pub(crate) struct Place {
    peers: Arc<Peers>,
    peer: Peer,
    counts: Arc<PeerCounts>,
    reserve: bool,
}

impl Place {
    /// What its peer holds.
    pub(crate) fn counts(&self) -> &Arc<PeerCounts> {
        &self.counts
    }

    /// Whether the place was taken from the reserve, which only an authenticated caller
    /// may keep.
    pub(crate) fn on_probation(&self) -> bool {
        self.reserve
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut state = self.peers.state.lock().unwrap();
        if self.reserve {
            state.reserve -= 1;
        } else {
            state.general -= 1;
        }
        if self.counts.connections.fetch_sub(1, Ordering::Relaxed) == 1 {
            state.peers.remove(&self.peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(text: &str) -> Peer {
        Peer::of(text.parse().unwrap())
    }

    /// An IPv4 address is its own peer; IPv6 addresses of one /64 are one peer; an
    /// IPv4-mapped IPv6 address is its IPv4 peer.
    #[test]
    fn peers_are_addresses_and_ipv6_slash_64s() {
        assert_eq!(peer("127.0.0.1"), peer("127.0.0.1"));
        assert_ne!(peer("127.0.0.1"), peer("127.0.0.2"));
        assert_eq!(peer("2001:db8:1:2::1"), peer("2001:db8:1:2:ffff::9"));
        assert_ne!(peer("2001:db8:1:2::1"), peer("2001:db8:1:3::1"));
        assert_eq!(peer("::ffff:10.0.0.1"), peer("10.0.0.1"));
        assert_eq!(peer("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
    }

    /// A peer holds at most its share; another peer still finds room; the cap binds
    /// everyone; places come back when dropped.
    #[test]
    fn each_peer_holds_at_most_its_share() {
        let peers = Peers::new(Limits {
            max_connections: 6,
            per_peer: 4,
            reserved: 0,
        });
        let a = peer("10.0.0.1");
        let mut held: Vec<Place> = (0..4).map(|_| peers.admit(a).unwrap()).collect();
        assert_eq!(peers.admit(a).err(), Some(Refused::Peer));
        let b = peer("10.0.0.2");
        held.push(peers.admit(b).unwrap());
        held.push(peers.admit(b).unwrap());
        assert_eq!(peers.admit(peer("10.0.0.3")).err(), Some(Refused::Full));
        assert_eq!(held[0].counts().connections(), 4);
        held.truncate(1);
        assert_eq!(peers.open(), 1);
        assert!(peers.admit(a).is_ok());
        drop(held);
        assert_eq!(peers.open(), 0);
        assert!(peers.state.lock().unwrap().peers.is_empty());
    }

    /// Once the general places are taken, connections come from the reserve, on
    /// probation; a place refused for its peer gives back what it entered with.
    #[test]
    fn the_reserve_is_taken_last_and_on_probation() {
        let peers = Peers::new(Limits {
            max_connections: 3,
            per_peer: 2,
            reserved: 1,
        });
        let first = peers.admit(peer("10.0.0.1")).unwrap();
        let second = peers.admit(peer("10.0.0.2")).unwrap();
        assert!(!first.on_probation() && !second.on_probation());
        let third = peers.admit(peer("10.0.0.3")).unwrap();
        assert!(third.on_probation());
        assert_eq!(peers.admit(peer("10.0.0.4")).err(), Some(Refused::Full));
        drop(third);
        let fourth = peers.admit(peer("10.0.0.1")).unwrap();
        assert!(fourth.on_probation());
        drop(second);
        assert_eq!(peers.admit(peer("10.0.0.1")).err(), Some(Refused::Peer));
        assert_eq!(peers.open(), 2);
    }
}
