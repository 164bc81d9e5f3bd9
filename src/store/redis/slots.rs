//! Where a Cluster keeps each key: the slot a key hashes to, and the primary that the
//! cluster client's slot map says serves that slot, so that calls ready together can go
//! as one pipeline per primary instead of one call each.
//!
//! The map is the client's own: redis-rs tells a read routing strategy every slot map it
//! learns (at the first dial, and after each MOVED or reconnection), and [`SlotMap`]
//! makes such strategies, which keep the latest and route every read to the primary, as
//! the client does without one. A map that is stale (a slot moved since) only makes some
//! keys of a pipeline meet a redirection; what the store does then is `read`'s and
//! `coalesce`'s matter.
//!
//! Each pipeline of plain reads ends with a write that only a primary fit to serve takes
//! (see [`PRIMARY_CHECK`]); in Cluster that key must live on the pipeline's node, so
//! it takes a hash tag that puts it in the slot of the pipeline's first key
//! ([`check_key`]).

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
};

use arc_swap::ArcSwapOption;
use bb8_redis::redis::cluster::NodeAddress;
use bb8_redis::redis::cluster_read_routing::{
    ClusterTopology, ReadCandidates, ReadRoutingStrategy, ReadRoutingStrategyFactory,
};

/// Slots in a Redis Cluster.
const SLOTS: u16 = 16384;

/// The slot `key` hashes to, as Redis Cluster computes it: CRC16 (XMODEM) of the key, or
/// of its hash tag (the text between the first `{` and the next `}`, when not empty).
pub(super) fn slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(hashed) % SLOTS
}

/// The cluster client's latest slot map, shared by every connection of the pool: each
/// one's strategy (see [`ReadRoutingStrategyFactory`]) writes here.
#[derive(Clone, Default)]
pub(crate) struct SlotMap {
    topology: Arc<ArcSwapOption<ClusterTopology>>,
}

impl SlotMap {
    /// Splits the items of one batch by the primary that serves the slot of each: each
    /// group's primary, the slot of its first item, and its items' indices, in order. An
    /// item whose slot has no known primary is a group of its own, without one.
    pub(super) fn split(&self, slots: impl Iterator<Item = u16>) -> Vec<Group> {
        let topology = self.topology.load();
        let mut groups: Vec<Group> = Vec::new();
        let mut by_primary: HashMap<&NodeAddress, usize> = HashMap::new();
        for (index, slot) in slots.enumerate() {
            let primary = topology
                .as_ref()
                .and_then(|topology| topology.shard_for_slot(slot))
                .map(|shard| shard.primary());
            if let Some(&group) = primary.and_then(|primary| by_primary.get(primary)) {
                groups[group].members.push(index);
                continue;
            }
            if let Some(primary) = primary {
                by_primary.insert(primary, groups.len());
            }
            groups.push(Group {
                primary: primary.cloned(),
                slot,
                members: vec![index],
            });
        }
        groups
    }
}

/// Items of a batch that one primary serves.
pub(super) struct Group {
    /// `None` when the slot map names none (before the first map, or an unserved slot).
    pub primary: Option<NodeAddress>,
    /// The slot of the first item, for the pipeline's primary check.
    pub slot: u16,
    pub members: Vec<usize>,
}

impl ReadRoutingStrategyFactory for SlotMap {
    fn create_strategy(&self) -> Box<dyn ReadRoutingStrategy> {
        Box::new(Learner(self.topology.clone()))
    }
}

/// One connection's strategy: it writes the maps its connection learns into the
/// [`SlotMap`] that made it.
struct Learner(Arc<ArcSwapOption<ClusterTopology>>);

impl ReadRoutingStrategy for Learner {
    fn on_topology_changed(&self, topology: ClusterTopology) {
        self.0.store(Some(Arc::new(topology)));
    }

    /// Reads go to the primary (SPEC §8: lookups never read a replica). Called only for
    /// a read the client may send to a replica, which the store never asks for.
    fn route_read<'a>(&self, candidates: &ReadCandidates<'a>) -> &'a NodeAddress {
        match candidates {
            ReadCandidates::AnyNode(any) => any.primary(),
            ReadCandidates::ReplicasOnly(replicas) => replicas.replicas().first(),
        }
    }
}

/// A write that a replica, or a primary short of `min-replicas-to-write`, refuses, and
/// that changes nothing anywhere else: the key is never written (entry keys end in 32
/// hex digits), and deleting a missing key is neither replicated nor denied for want
/// of memory. It is in the service's key family, so the documented ACL allows it.
pub(super) const PRIMARY_CHECK: &str = "session_cache:primary-check";

/// The primary check's key in `slot`: `session_cache:primary-check{<tag>}`, where the
/// tag is the shortest decimal number that hashes to `slot`. Never written, in the
/// service's key family like the one-Redis check (the documented ACLs allow it).
pub(super) fn check_key(slot: u16) -> String {
    format!("{}{{{}}}", PRIMARY_CHECK, tags()[usize::from(slot % SLOTS)])
}

/// For each slot, a number whose decimal text hashes to it; found once, on first use
/// (about 170,000 hashes).
fn tags() -> &'static [u32] {
    static TAGS: OnceLock<Box<[u32]>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = vec![u32::MAX; usize::from(SLOTS)];
        let mut missing = usize::from(SLOTS);
        let mut text = String::new();
        // Every slot is reached well before this bound (the largest tag needed is under
        // 200,000); the bound only keeps the loop finite.
        for n in 0..u32::MAX {
            use std::fmt::Write;
            text.clear();
            let _ = write!(text, "{n}");
            let slot = usize::from(slot(text.as_bytes()));
            if tags[slot] == u32::MAX {
                tags[slot] = n;
                missing -= 1;
                if missing == 0 {
                    break;
                }
            }
        }
        tags.into_boxed_slice()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slots as Redis documents them (`CLUSTER KEYSLOT`): whole keys, and hash tags.
    #[test]
    fn slots_as_redis_computes_them() {
        assert_eq!(slot(b"123456789"), 0x31C3 % SLOTS);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        let whole = |key: &[u8]| crc16::State::<crc16::XMODEM>::calculate(key) % SLOTS;
        assert_eq!(slot(b"foo{}{bar}"), whole(b"foo{}{bar}"));
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"foo{bar}{zap}"), slot(b"bar"));
    }

    /// Every slot has a check key, and it hashes to that slot.
    #[test]
    fn check_keys_land_in_their_slot() {
        for s in 0..SLOTS {
            let key = check_key(s);
            assert!(key.starts_with("session_cache:primary-check{"), "{key}");
            assert_eq!(slot(key.as_bytes()), s, "{key}");
        }
    }
}
