//! What a node can tell about its links: who they go to ([`Node::peers`] and the
//! accessors beside it) and [`Node::stats`], a snapshot per link of who, where, how
//! old, how fast and how busy. The live counters sit on the [`Link`] and in its
//! socket wrapper ([`LinkIo`](super::budget::LinkIo)): one relaxed atomic add per
//! socket read or write call, none per frame; the snapshot reads them under the
//! node's lock.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;

use super::link::Link;
use super::node::{Inner, Node};
use super::{NodeId, PeerInfo};

/// A snapshot of a node's links ([`Node::stats`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NodeStats {
    /// This node's id.
    pub node: NodeId,
    /// Every link in the routing table (active or draining; a closing link has left
    /// it), sorted by peer, then oldest first.
    pub links: Vec<LinkStats>,
    /// Links established since the node started, replacements after a reconnect or
    /// a rotation included ([`Node::links_established`]).
    pub links_established: u64,
}

impl NodeStats {
    /// The links to `peer`, oldest first (more than one while a rotated link drains).
    pub fn links_to(&self, peer: NodeId) -> impl Iterator<Item = &LinkStats> + '_ {
        self.links.iter().filter(move |l| l.peer == peer)
    }
}

/// Where a link is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkState {
    /// New streams to its peer use it.
    Active,
    /// Rotated out ([`NodeConfig::rotate_after`](super::NodeConfig::rotate_after)):
    /// its streams finish on it, new ones go to a newer link, and it retires once it
    /// carries none and that newer link is up.
    Draining,
}

/// One link of a [`NodeStats`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LinkStats {
    /// The peer's node id.
    pub peer: NodeId,
    /// The peer's TLS identity (its certificate's first DNS name, as
    /// [`Node::peer_identity`] gives it); `None` on a
    /// plaintext or [`attach`](Node::attach)ed link.
    pub identity: Option<String>,
    /// Where the link goes, in the form addresses are printed elsewhere: a TCP
    /// address (`127.0.0.1:7000`: the address joined, or the peer's address when
    /// accepted), `unix:<path>` (the path joined, or, when accepted, the path this
    /// node listens on: a Unix peer has no address of its own), `child:<pid>` for a
    /// link to a child process ([`Node::spawn_child`]), `stdio` for a node served on
    /// its stdio ([`Node::serve_stdio`]), or `attached` for a link over a stream given
    /// to [`Node::attach`].
    pub addr: String,
    /// True when this node opened the link ([`join`](Node::join), or
    /// [`attach`](Node::attach) as the initiator), false when it accepted it.
    pub dialed: bool,
    /// Active or draining.
    pub state: LinkState,
    /// Time since the link came up (its handshake done).
    pub age: Duration,
    /// The last keep-alive round trip: from this node's PING being queued on the
    /// control stream to the peer's PONG being read, so it includes both nodes'
    /// queueing. `None` until the first PONG (a PING goes out every
    /// [`keepalive`](super::NodeConfig::keepalive) interval).
    pub rtt: Option<Duration>,
    /// Bytes read from the link after its handshake: the yamux session (frame
    /// headers, data, window updates, the control stream), before TLS encryption
    /// (TLS records and handshakes are not counted) and without the link handshake.
    pub bytes_in: u64,
    /// Bytes written to the link after its handshake, counted as `bytes_in` is: what
    /// one side counts out, its peer counts in, once the link is quiet.
    pub bytes_out: u64,
    /// Streams this node holds on the link now: dialed from here (dials waiting for
    /// a stream slot or for the open included) or accepted here (queued for a
    /// listener included), until dropped. The control stream is not counted.
    pub streams_open: u64,
    /// Streams opened on the link so far, both ways: opened by a dial from here, or
    /// delivered to a listener here. Refused opens and the control streams are not
    /// counted.
    pub streams_total: u64,
}

/// The byte counters of a link, shared by the link and its socket wrapper.
#[derive(Debug, Default)]
pub(super) struct Traffic {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl Traffic {
    pub(super) fn read(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Relaxed);
    }

    pub(super) fn wrote(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Relaxed);
    }
}

/// The last round trip time of a link, in nanoseconds; 0 until one is known.
#[derive(Debug, Default)]
pub(super) struct Rtt(AtomicU64);

impl Rtt {
    pub(super) fn set(&self, rtt: Duration) {
        // At least 1 ns, so that a measured round trip never reads as "none"; a
        // round trip of 584 years saturates.
        let nanos = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.0.store(nanos, Relaxed);
    }

    pub(super) fn get(&self) -> Option<Duration> {
        match self.0.load(Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n)),
        }
    }
}

impl Link {
    /// Who is at the other end, for a [`LinkEvent`](super::LinkEvent).
    pub(super) fn info(&self) -> PeerInfo {
        PeerInfo {
            node: self.peer,
            addr: self.addr.clone(),
            identity: self.identity.clone(),
        }
    }

    fn stats(&self, now: Instant) -> LinkStats {
        LinkStats {
            peer: self.peer,
            identity: self.identity.clone(),
            addr: self.addr.clone(),
            dialed: self.dialed,
            state: match self.is_draining() {
                true => LinkState::Draining,
                false => LinkState::Active,
            },
            age: now.saturating_duration_since(self.since),
            rtt: self.rtt.get(),
            bytes_in: self.traffic.bytes_in.load(Relaxed),
            bytes_out: self.traffic.bytes_out.load(Relaxed),
            streams_open: self.active.load(Relaxed) as u64,
            streams_total: self.opened() + self.accepted.load(Relaxed),
        }
    }
}

impl Node {
    /// Ids of the peers this node has a link to.
    pub fn peers(&self) -> Vec<NodeId> {
        let st = self.inner.state.lock().unwrap();
        st.links.keys().copied().collect()
    }

    /// The identity of `peer` (its certificate's first DNS name, see [`TlsConfig`](crate::TlsConfig))
    /// while this node has a TLS link to it; `None` without a link, or over a
    /// plaintext or [`attach`](Node::attach)ed one.
    pub fn peer_identity(&self, peer: NodeId) -> Option<String> {
        let st = self.inner.state.lock().unwrap();
        st.links.get(&peer)?.last()?.identity.clone()
    }

    /// A snapshot of this node's links: per link its peer, address, state, round trip
    /// time, bytes and streams (see [`NodeStats`]). Takes the node's lock once,
    /// briefly.
    pub fn stats(&self) -> NodeStats {
        self.inner.stats()
    }

    /// How many links (including draining ones) this node has to `peer`.
    pub fn link_count(&self, peer: NodeId) -> usize {
        let st = self.inner.state.lock().unwrap();
        st.links.get(&peer).map_or(0, Vec::len)
    }

    /// How many links this node has established since it started, replacements after
    /// a reconnect or a rotation included.
    pub fn links_established(&self) -> u64 {
        self.inner.links_up.load(Relaxed)
    }
}

impl Inner {
    /// See [`Node::stats`].
    pub(super) fn stats(&self) -> NodeStats {
        let now = Instant::now();
        let mut links: Vec<LinkStats> = {
            let st = self.state.lock().unwrap();
            st.links.values().flatten().map(|l| l.stats(now)).collect()
        };
        // Oldest first within a peer: the longest age first.
        links.sort_by(|a, b| a.peer.cmp(&b.peer).then(b.age.cmp(&a.age)));
        NodeStats {
            node: self.id,
            links,
            links_established: self.links_up.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_rtt_reads_back_and_none_until_set() {
        let rtt = Rtt::default();
        assert_eq!(rtt.get(), None);
        rtt.set(Duration::from_millis(3));
        assert_eq!(rtt.get(), Some(Duration::from_millis(3)));
        rtt.set(Duration::ZERO);
        assert_eq!(
            rtt.get(),
            Some(Duration::from_nanos(1)),
            "measured, not none"
        );
    }
}
