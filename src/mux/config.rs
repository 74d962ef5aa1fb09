//! [`NodeConfig`]: every setting of a node, its default and its invariant, in one
//! place. No behaviour.

use std::sync::Arc;
use std::time::Duration;

use super::tls::{TlsConfig, TlsLinks};
use super::NodeId;

/// The id [`NodeConfig::node_name`] derives: FNV-1a over the name's bytes, then the
/// SplitMix64 finaliser so that similar names give unrelated ids.
pub(super) fn id_from_name(name: &str) -> NodeId {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// [`Node`](super::Node) settings. `Default`:
///
/// | setting | default |
/// |---|---|
/// | `node_id` | random per process |
/// | `max_streams` | 4096 outbound streams per link |
/// | `keepalive_interval` | 5 s |
/// | `keepalive_timeout` | 20 s |
/// | `handshake_timeout` | 10 s |
/// | `accept_backlog` | 1024 streams per listener |
/// | `rotate_after` | 2^31 − 2^20 streams opened per link |
/// | `reconnect_backoff` | 100 ms doubling to 5 s |
/// | `split_send_size` | 60 KiB |
/// | `close_timeout` | 2 s |
/// | `send_queue` | 4 MiB per link |
/// | `tls` | none: plaintext links |
/// | `environment` | `""` |
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub(super) node_id: Option<NodeId>,
    pub(super) max_streams: usize,
    pub(super) keepalive_interval: Duration,
    pub(super) keepalive_timeout: Duration,
    pub(super) handshake_timeout: Duration,
    pub(super) accept_backlog: usize,
    pub(super) rotate_after: u64,
    pub(super) reconnect_min: Duration,
    pub(super) reconnect_max: Duration,
    pub(super) split_send_size: usize,
    pub(super) close_timeout: Duration,
    pub(super) send_queue: usize,
    /// Built once here, shared by the node's listeners and joins.
    pub(super) tls: Option<Arc<TlsLinks>>,
    pub(super) environment: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: None,
            max_streams: 4096,
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(10),
            accept_backlog: 1024,
            rotate_after: (1 << 31) - (1 << 20),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            split_send_size: 60 * 1024,
            close_timeout: Duration::from_secs(2),
            send_queue: 4 * 1024 * 1024,
            tls: None,
            environment: String::new(),
        }
    }
}

impl NodeConfig {
    /// This node's id, stable across restarts (the default is random per process).
    /// Bucket ownership ([`DialOptions::bucket`](super::DialOptions::bucket)) follows
    /// node ids, so a node that restarts with the same id gets its buckets back, and
    /// logs of different hosts name a node the same way. Two nodes of one mesh must
    /// not share an id: a link between them is refused ("link to self").
    #[must_use]
    pub fn node_id(mut self, id: NodeId) -> Self {
        self.node_id = Some(id);
        self
    }

    /// A stable id derived from a name (a host name, a role such as `"kv-2"`): the
    /// same name gives the same id on every host and in every version of this crate
    /// (64-bit FNV-1a, then a SplitMix64 finaliser).
    #[must_use]
    pub fn node_name(self, name: &str) -> Self {
        self.node_id(id_from_name(name))
    }

    /// Most streams this node opens on one link at once; more opens wait (up to their
    /// dial timeout). The two ends of a link use the smaller of their values, and yamux
    /// is configured for twice that plus slack, so its hard limit (which kills the whole
    /// connection) is never reached.
    ///
    /// # Panics
    /// If `n` is 0 or above 1,000,000.
    #[must_use]
    pub fn max_streams(mut self, n: usize) -> Self {
        assert!((1..=1_000_000).contains(&n), "max_streams must be 1..=1e6");
        self.max_streams = n;
        self
    }
    /// How often an idle link is pinged, and how long it may stay silent before it is
    /// declared dead (its streams fail, its names are withdrawn).
    ///
    /// # Panics
    /// If `interval` is zero or not shorter than `timeout`.
    #[must_use]
    pub fn keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        assert!(
            !interval.is_zero() && interval < timeout,
            "need 0 < interval < timeout"
        );
        self.keepalive_interval = interval;
        self.keepalive_timeout = timeout;
        self
    }
    /// How long a link handshake may take.
    #[must_use]
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }
    /// Streams queued per listener before the acceptor waits (backpressure).
    ///
    /// # Panics
    /// If `n` is 0.
    #[must_use]
    pub fn accept_backlog(mut self, n: usize) -> Self {
        assert!(n > 0, "accept_backlog must be positive");
        self.accept_backlog = n;
        self
    }
    /// After this many streams opened on one link, this node moves new streams to a
    /// fresh link (yamux never reuses a stream id; there are about 2^31 per side).
    /// Streams in flight on the old link finish there.
    ///
    /// # Panics
    /// If `n` is 0 or above 2^31 − 2^16.
    #[must_use]
    pub fn rotate_after(mut self, n: u64) -> Self {
        assert!(
            (1..=(1 << 31) - (1 << 16)).contains(&n),
            "rotate_after out of range"
        );
        self.rotate_after = n;
        self
    }
    /// Backoff of `join`'s reconnection: doubles from `min` to `max`.
    #[must_use]
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        assert!(!min.is_zero() && min <= max, "need 0 < min <= max");
        self.reconnect_min = min;
        self.reconnect_max = max;
        self
    }
    /// Largest yamux data frame. Larger writes are split (yamux's own default is
    /// 16 KiB). yamux copies each frame's body into a buffer of its own on both sides,
    /// so this is also the size of those buffers: at 60 KiB they stay under glibc's
    /// 64 KiB threshold above which a `free` may give memory back to the kernel, only
    /// for the next frame to fault it in again. `bench heavy` (1 MiB frames) spent
    /// about a third more CPU at 256 KiB, in page faults.
    #[must_use]
    pub fn split_send_size(mut self, n: usize) -> Self {
        assert!(n >= 1024, "split_send_size must be at least 1 KiB");
        self.split_send_size = n;
        self
    }

    /// How long closing a link (node shutdown or drop, rotation, a dead peer) may spend
    /// delivering what streams already wrote, their end-of-stream included, before the
    /// socket is dropped.
    #[must_use]
    pub fn close_timeout(mut self, t: Duration) -> Self {
        self.close_timeout = t;
        self
    }

    /// Most bytes a link's streams may have handed to yamux that it has not written to
    /// the socket yet; writers wait beyond it. yamux itself would queue up to each
    /// stream's 256 KiB window, which for thousands of streams is hundreds of MiB.
    ///
    /// # Panics
    /// If `n` is below 64 KiB.
    #[must_use]
    pub fn send_queue(mut self, n: usize) -> Self {
        assert!(n >= 64 * 1024, "send_queue must be at least 64 KiB");
        self.send_queue = n;
        self
    }

    /// Runs every link of [`listen`](super::Node::listen),
    /// [`listen_unix`](super::Node::listen_unix), [`join`](super::Node::join) and
    /// [`join_unix`](super::Node::join_unix) over mutually authenticated TLS 1.3 (see
    /// [`TlsConfig`]). Without it links are plaintext: for loopback, tests and
    /// networks where every host that can reach a listener is trusted.
    /// [`Node::attach`](super::Node::attach) runs over whatever stream it is given
    /// either way. The TLS handshake, like the link handshake after it, is bounded
    /// by [`handshake_timeout`](Self::handshake_timeout).
    #[must_use]
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        // `TlsConfig::from_pem` built the same configuration once already: only the
        // policy changed since, and it cannot make a build fail.
        let built = tls.build().expect("checked by TlsConfig::from_pem");
        self.tls = Some(Arc::new(built));
        self
    }

    /// The environment this node belongs to (`"prod"`, `"staging"`; default `""`).
    /// Nodes of every environment link, route and relay for each other on one mesh,
    /// but a node sees only the service names of nodes of its own environment: names
    /// bound in another are not its providers, its services or its name events, and
    /// a dial to one fails with [`Error::NoSuchAddress`](crate::Error::NoSuchAddress).
    /// `"<node>:<port>"` addresses reach every node. At most 255 bytes (panics
    /// otherwise).
    #[must_use]
    pub fn environment(mut self, env: impl Into<String>) -> Self {
        let env = env.into();
        assert!(env.len() <= 255, "an environment is at most 255 bytes");
        self.environment = env;
        self
    }

    pub(super) fn yamux(&self, max_streams: usize) -> yamux::Config {
        let mut c = yamux::Config::default();
        // Memory is bounded by what peers actually send within their windows; the
        // connection-wide cap must allow every stream its initial 256 KiB.
        c.set_max_connection_receive_window(None);
        c.set_max_num_streams(2 * max_streams + 512);
        c.set_split_send_size(self.split_send_size);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_from_names_are_stable_and_distinct() {
        // Pinned: the derivation is part of the contract (ids must survive upgrades).
        assert_eq!(id_from_name(""), 0xf52a_15e9_a9b5_e89b, "empty name");
        let ids: std::collections::HashSet<_> = (0..1000)
            .map(|i| id_from_name(&format!("kv-{i}")))
            .collect();
        assert_eq!(ids.len(), 1000);
        assert_eq!(
            NodeConfig::default().node_name("a").node_id,
            Some(id_from_name("a"))
        );
    }
}
