//! What a node knows: its binds, its links per peer, the names each peer announced,
//! the routes beyond its peers (`routing`), and where a dial goes (local listener,
//! the nearest providers in turn, rendezvous buckets, the next hop). Pure bookkeeping
//! under the node's lock: no I/O, no tasks.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Weak};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::join::{JoinEntry, Rejoin};
use super::link::{control_frame, Active, Link};
use super::routing::{Routing, HOP_LIMIT};
use super::stream::MuxStream;
use super::{Addr, DialOptions, NodeId, VAddr};
use crate::error::{Error, Result};
use crate::proto::link::{Control, Open, RouteAd};

/// Everything behind the node's one lock.
#[derive(Default)]
pub(super) struct State {
    pub(super) binds: HashMap<String, Binding>,
    pub(super) next_port: u32,
    /// Links per peer, oldest first; dials use the newest that is not draining.
    pub(super) links: HashMap<NodeId, Vec<Arc<Link>>>,
    /// Names each peer binds, as it last told us.
    pub(super) peer_names: HashMap<NodeId, BTreeSet<String>>,
    /// The reconnect loop of each joined address, owned by its [`Joined`](super::Joined)
    /// handles: one loop per address.
    pub(super) joins: HashMap<Rejoin, Weak<JoinEntry>>,
    /// Joins handed to the node by [`Joined::detach`](super::Joined::detach).
    pub(super) detached: Vec<Arc<JoinEntry>>,
    /// Set by shutdown: no bind, link or join is taken any more.
    pub(super) closed: bool,
    /// Routes to the nodes beyond the linked peers (and the peers themselves).
    pub(super) routing: Routing,
    /// This node's environment ([`NodeConfig::environment`](super::NodeConfig)).
    pub(super) env: String,
    /// The names of every node as the last `Names` events told them (this node's
    /// own apart): what the next events are told against.
    pub(super) seen: BTreeMap<NodeId, BTreeSet<String>>,
}

/// A change of the names a node provides, for a `Names` event.
pub(super) type NamesChange = (NodeId, Vec<String>, Vec<String>);

/// A bound address: where its streams are queued.
pub(super) struct Binding {
    pub(super) id: u64,
    pub(super) tx: mpsc::Sender<(MuxStream, Addr)>,
}

/// Where a dial goes.
pub(super) enum Route {
    /// A listener of this node, under this key.
    Local(mpsc::Sender<(MuxStream, Addr)>, String),
    /// A link (counted active for the dial), and the open header for the peer: a
    /// DIAL for its own address, or a RELAY for a node beyond it.
    Remote(Active, Open),
}

impl State {
    /// The NAMES control message (a whole frame) announcing this node's service names.
    pub(super) fn names_message(&self) -> Bytes {
        let names = self.binds.keys().filter(|k| !k.starts_with(':'));
        let names = Control::Names(names.cloned().collect());
        let mut m = BytesMut::new();
        // Binding admits names of at most 255 bytes (`VAddr::parse`), which is what
        // NAMES carries; a message over the control limit would take some 65,000
        // names of that length.
        if let Err(e) = names.encode(&mut m) {
            tracing::error!("names not announced: {e}");
        }
        m.freeze()
    }

    /// Every routable name with its providers and their distance in hops (0 for
    /// this node), sorted by node id (see `Node::services`).
    pub(super) fn services(&self, here: NodeId) -> BTreeMap<String, Vec<(NodeId, usize)>> {
        let mut all: BTreeMap<String, Vec<(NodeId, usize)>> = BTreeMap::new();
        for name in self.own_names() {
            all.entry(name).or_default().push((here, 0));
        }
        for (node, r) in self.routing.best() {
            if r.env == self.env {
                for name in &r.names {
                    all.entry(name.clone()).or_default().push((*node, r.hops()));
                }
            }
        }
        for providers in all.values_mut() {
            providers.sort_unstable();
        }
        all
    }

    /// This node's service names.
    pub(super) fn own_names(&self) -> BTreeSet<String> {
        self.binds
            .keys()
            .filter(|k| !k.starts_with(':'))
            .cloned()
            .collect()
    }

    /// Records the names `peer` announced; returns what that added and removed
    /// (sorted), against what it announced before.
    pub(super) fn set_peer_names(
        &mut self,
        peer: NodeId,
        names: BTreeSet<String>,
    ) -> (Vec<String>, Vec<String>) {
        let old = self.peer_names.insert(peer, names).unwrap_or_default();
        let new = &self.peer_names[&peer];
        (
            new.difference(&old).cloned().collect(),
            old.difference(new).cloned().collect(),
        )
    }

    /// Tells every linked peer this node's names.
    pub(super) fn announce_names(&self) {
        let msg = self.names_message();
        for l in self.links.values().flatten() {
            l.send_control(msg.clone());
        }
    }

    /// The link dials to `peer` use: the newest that is not draining.
    fn newest_link(&self, peer: NodeId) -> Option<Arc<Link>> {
        let links = self.links.get(&peer)?;
        links
            .iter()
            .rev()
            .find(|l| !l.is_draining())
            .or_else(|| links.last())
            .cloned()
    }

    /// The other nodes of this node's environment that provide `name`, with their
    /// distance in hops.
    pub(super) fn providers_of(&self, name: &str) -> Vec<(NodeId, usize)> {
        let best = self.routing.best().iter();
        best.filter(|(_, r)| r.env == self.env && r.names.contains(name))
            .map(|(n, r)| (*n, r.hops()))
            .collect()
    }

    /// The route of a stream for `target` on the node `node` (not this one): a DIAL on
    /// the link to it, or a RELAY with `ttl` hops left on the link to the next hop.
    pub(super) fn hop(&self, node: NodeId, target: &str, ttl: u8) -> Option<Route> {
        if let Some(l) = self.newest_link(node) {
            return Some(Route::Remote(Active::new(l), Open::Dial(target.to_owned())));
        }
        let next = self.routing.to(node).filter(|_| ttl > 0)?.next();
        let open = Open::Relay {
            ttl,
            node,
            target: target.to_owned(),
        };
        Some(Route::Remote(Active::new(self.newest_link(next)?), open))
    }

    /// Computes the routes again after a change (a peer's NAMES or ROUTES, a link up
    /// or down); when they changed, tells every linked peer. Returns the changes of
    /// names to announce as events, against what the last events told.
    pub(super) fn refresh(&mut self, here: NodeId) -> Vec<NamesChange> {
        let linked = self
            .links
            .keys()
            .map(|p| (*p, self.peer_names.get(p).cloned().unwrap_or_default()))
            .collect();
        if self.routing.recompute(here, &linked) {
            self.advertise(here, None);
        }
        let now = self.routing.names_in(&self.env);
        let mut changes = Vec::new();
        for node in now.keys().chain(self.seen.keys()).collect::<BTreeSet<_>>() {
            let (old, new) = (self.seen.get(node), now.get(node));
            let empty = BTreeSet::new();
            let (old, new) = (old.unwrap_or(&empty), new.unwrap_or(&empty));
            let added: Vec<String> = new.difference(old).cloned().collect();
            let removed: Vec<String> = old.difference(new).cloned().collect();
            if !added.is_empty() || !removed.is_empty() {
                changes.push((*node, added, removed));
            }
        }
        self.seen = now;
        changes
    }

    /// The ROUTES message a new link starts with: this node alone, with its
    /// environment.
    pub(super) fn hello_message(&self, here: NodeId) -> Bytes {
        let me = RouteAd {
            path: vec![here],
            env: self.env.clone(),
            names: BTreeSet::new(),
        };
        control_frame(&Control::Routes(vec![me]))
    }

    /// Sends ROUTES to every linked peer, or to `only` that one.
    pub(super) fn advertise(&self, here: NodeId, only: Option<NodeId>) {
        for (peer, links) in &self.links {
            if only.is_some_and(|o| o != *peer) {
                continue;
            }
            let ads = self.routing.ads_for(here, &self.env, *peer);
            let msg = control_frame(&Control::Routes(ads));
            for l in links {
                l.send_control(msg.clone());
            }
        }
    }

    /// The key a local address is bound under, if `v` names this node.
    pub(super) fn local_key(v: &VAddr, here: NodeId) -> Option<String> {
        match v {
            VAddr::Name(n) => Some(n.clone()),
            VAddr::Port(p) => Some(format!(":{p}")),
            VAddr::Node(id, p) if *id == here => Some(format!(":{p}")),
            VAddr::Node(..) => None,
        }
    }

    /// The listener bound to `target`, if any.
    pub(super) fn listener_for(
        &self,
        target: &str,
        here: NodeId,
    ) -> Option<mpsc::Sender<(MuxStream, Addr)>> {
        let key = Self::local_key(&VAddr::parse(target).ok()?, here)?;
        self.binds.get(&key).map(|b| b.tx.clone())
    }

    /// Picks where a dial goes. `rr` is the round-robin counter for names.
    pub(super) fn route(
        &self,
        here: NodeId,
        v: &VAddr,
        opts: &DialOptions,
        rr: usize,
    ) -> Result<Route> {
        let local = |key: &str| {
            self.binds
                .get(key)
                .map(|b| Route::Local(b.tx.clone(), key.to_owned()))
        };
        let none = |s: String| Error::NoSuchAddress(s);
        match v {
            VAddr::Port(p) => local(&format!(":{p}")).ok_or_else(|| none(format!(":{p}"))),
            VAddr::Node(id, p) if *id == here => {
                local(&format!(":{p}")).ok_or_else(|| none(format!(":{p}")))
            }
            VAddr::Node(id, p) => self
                .hop(*id, &format!(":{p}"), HOP_TTL)
                .ok_or_else(|| none(format!("{id:016x}:{p} (no route to that node)"))),
            VAddr::Name(name) if opts.node.is_some() => {
                let n = opts.node.expect("guarded");
                let there = || format!("{name} on {n:016x}");
                if n == here {
                    return local(name).ok_or_else(|| none(there()));
                }
                let provides = self.providers_of(name).iter().any(|(p, _)| *p == n);
                provides
                    .then(|| self.hop(n, name, HOP_TTL))
                    .flatten()
                    .ok_or_else(|| none(there()))
            }
            VAddr::Name(name) => {
                let bucket = opts.bucket.as_deref();
                let mut candidates = self.providers_of(name);
                let is_here = self.binds.contains_key(name);
                if is_here && bucket.is_none() {
                    return Ok(local(name).expect("checked"));
                }
                if is_here {
                    candidates.push((here, 0));
                }
                let pick = match bucket {
                    Some(b) => candidates.iter().map(|c| c.0).max_by_key(|n| hrw(*n, b)),
                    None => {
                        // The nearest providers, in turn.
                        let near = candidates.iter().map(|c| c.1).min().unwrap_or(0);
                        let mut near: Vec<NodeId> = candidates
                            .iter()
                            .filter(|c| c.1 == near)
                            .map(|c| c.0)
                            .collect();
                        near.sort_unstable();
                        (!near.is_empty()).then(|| near[rr % near.len()])
                    }
                };
                match pick {
                    None => Err(none(name.clone())),
                    Some(n) if n == here => Ok(local(name).expect("checked")),
                    Some(n) => self.hop(n, name, HOP_TTL).ok_or_else(|| none(name.clone())),
                }
            }
        }
    }
}

/// The hops a stream dialed here may take.
const HOP_TTL: u8 = HOP_LIMIT as u8;

/// Highest-random-weight (rendezvous) score: the node with the highest score for a
/// bucket serves it, so when a node leaves only its buckets move.
pub(super) fn hrw(node: NodeId, bucket: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.to_le_bytes().iter().chain(bucket.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    splitmix(h)
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub(super) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_usize(&h as *const _ as usize);
    splitmix(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_move_only_with_their_node() {
        let nodes = [1u64, 2, 3];
        let owner = |set: &[u64], b: &str| *set.iter().max_by_key(|n| hrw(**n, b)).unwrap();
        let mut moved = 0;
        for i in 0..200 {
            let b = format!("bucket-{i}");
            let before = owner(&nodes, &b);
            let after = owner(&[1, 3], &b);
            if before != 2 {
                assert_eq!(before, after, "a bucket of a staying node moved");
            } else {
                moved += 1;
            }
        }
        assert!((30..=110).contains(&moved), "node 2 owned {moved} of 200");
    }

    #[test]
    fn a_peers_new_names_are_told_as_what_they_add_and_remove() {
        let mut st = State::default();
        let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
        let strings = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(
            st.set_peer_names(1, set(&["b", "a"])),
            (strings(&["a", "b"]), vec![])
        );
        assert_eq!(st.set_peer_names(1, set(&["b", "a"])), (vec![], vec![]));
        assert_eq!(
            st.set_peer_names(1, set(&["c", "a"])),
            (strings(&["c"]), strings(&["b"]))
        );
        assert_eq!(st.set_peer_names(2, set(&["a"])), (strings(&["a"]), vec![]));
    }

    #[test]
    fn names_message_names_the_bound_services_not_ports() {
        let mut st = State::default();
        for n in ["a", "search:7"] {
            let (tx, _rx) = mpsc::channel(1);
            st.binds.insert(n.into(), Binding { id: 0, tx });
        }
        let (tx, _rx) = mpsc::channel(1);
        st.binds.insert(":9".into(), Binding { id: 0, tx });
        let mut m = BytesMut::from(st.names_message());
        let body = crate::frame::FrameCodec::new()
            .decode(&mut m)
            .unwrap()
            .unwrap();
        let Ok(Control::Names(names)) = Control::decode(body) else {
            panic!("not a NAMES message");
        };
        assert_eq!(names.into_iter().collect::<Vec<_>>(), ["a", "search:7"]);
    }
}
