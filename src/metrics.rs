//! Exports the stats snapshots through the [`metrics`] facade (cargo
//! feature `metrics`): bring your own recorder or exporter (Prometheus, StatsD, …).
//!
//! Each function publishes one snapshot: counters are set with
//! [`absolute`](::metrics::Counter::absolute) (they only grow), gauges with
//! [`set`](::metrics::Gauge::set). Nothing is exported on its own: call them when you
//! take a snapshot, for example every few seconds from a task of your own, or just
//! before your exporter renders. [`describe`] registers each metric's help text and
//! unit, once.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), chanserv::Error> {
//! use chanserv::{metrics, Client, Node, Server, Source};
//! let node = Node::new();
//! let service = Server::new(node.clone())
//!     .listen_and_serve("svc", |_| futures::stream::empty::<Source>())?;
//! let client = Client::new(node)?;
//! metrics::describe();
//! // …then, now and then:
//! metrics::record_service("svc", &service.stats());
//! metrics::record_client("main", &client.stats());
//! # let node = Node::new();
//! metrics::record_node(&node.stats());
//! # Ok(()) }
//! ```
//!
//! ## Service metrics ([`ServiceStats`]), label `service`
//!
//! | name | kind | meaning |
//! |---|---|---|
//! | `chanserv_service_requests_active` | gauge | requests being served now |
//! | `chanserv_service_requests_total` | counter | requests accepted |
//! | `chanserv_service_requests_failed_total` | counter | requests that ended with an error |
//! | `chanserv_service_sources_active` | gauge | sources whose frames are being sent now |
//! | `chanserv_service_sources_total` | counter | sources announced (inline ones included) |
//! | `chanserv_service_sources_completed_total` | counter | sources completed (END sent) |
//! | `chanserv_service_sources_failed_total` | counter | sources their producer failed (ABORT sent) |
//! | `chanserv_service_sources_cut_total` | counter | sources cut before their end (client left, link lost, write timeout) |
//! | `chanserv_service_frames_sent_total` | counter | frames written to clients |
//! | `chanserv_service_bytes_sent_total` | counter | frame payload bytes written to clients (before compression) |
//! | `chanserv_service_backpressure_wait_seconds` | gauge | total time sources waited for a consumer; only grows (a gauge because the facade's counters are integers) |
//! | `chanserv_service_sources_blocked` | gauge | sources waiting on a slow consumer now |
//! | `chanserv_service_blocked_longest_seconds` | gauge | the longest of those waits now (0 when none) |
//!
//! ## Client metrics ([`ClientStats`]), label `client`
//!
//! The label is a name you give the client: a process may have several.
//!
//! | name | kind | meaning |
//! |---|---|---|
//! | `chanserv_client_requests_active` | gauge | requests in progress (announcing, or with a source open) |
//! | `chanserv_client_requests_total` | counter | requests posted |
//! | `chanserv_client_requests_failed_total` | counter | requests whose post or announcements failed |
//! | `chanserv_client_sources_announced_total` | counter | sources announced to the client |
//! | `chanserv_client_sources_completed_total` | counter | sources whose end arrived |
//! | `chanserv_client_sources_failed_total` | counter | sources that failed or were cut |
//! | `chanserv_client_sources_dropped_total` | counter | sources dropped before their end arrived |
//! | `chanserv_client_sources_open` | gauge | sources announced and not ended |
//! | `chanserv_client_frames_received_total` | counter | frames received |
//! | `chanserv_client_bytes_received_total` | counter | frame payload bytes received (after decompression) |
//!
//! How fresh the client's frames and bytes are: see [`RequestStats`](crate::RequestStats).
//!
//! ## Node metrics ([`NodeStats`]), label `node`
//!
//! The label is the node's id, 16 hex digits.
//!
//! | name | kind | meaning |
//! |---|---|---|
//! | `chanserv_node_links` | gauge | links in the routing table now (draining ones included) |
//! | `chanserv_node_peers` | gauge | peers linked now |
//! | `chanserv_node_links_established_total` | counter | links established since the node started (reconnects and rotations included) |
//!
//! ## Link metrics ([`LinkStats`]), labels `peer` and `identity`
//!
//! One series per linked peer: `peer` is its node id (16 hex digits), `identity` its
//! TLS identity (the label is left out on plaintext links). While a rotated link
//! drains, a peer has two links: their counters and gauges are summed, and when the
//! old one retires the counters drop by its share, which Prometheus reads as a
//! counter reset (as it does after a reconnect, where the new link starts at 0).
//! Bytes are what the links carry (see [`LinkStats::bytes_in`]).
//!
//! | name | kind | meaning |
//! |---|---|---|
//! | `chanserv_link_links` | gauge | links to the peer now (2 while a rotated link drains) |
//! | `chanserv_link_bytes_in_total` | counter | bytes read from the peer's links |
//! | `chanserv_link_bytes_out_total` | counter | bytes written to the peer's links |
//! | `chanserv_link_streams_open` | gauge | streams this node holds on the peer's links now |
//! | `chanserv_link_streams_total` | counter | streams opened on the peer's links, both ways |
//! | `chanserv_link_rtt_seconds` | gauge | the newest link's last keep-alive round trip; absent until its first one |

use std::collections::BTreeMap;

use ::metrics::{Label, SharedString, Unit};

use crate::{ClientStats, LinkStats, NodeId, NodeStats, ServiceStats};

/// One metric of a snapshot: its name, value, unit and help text.
struct Metric {
    name: &'static str,
    value: Value,
    unit: Option<Unit>,
    help: &'static str,
}

enum Value {
    Counter(u64),
    Gauge(f64),
}

const fn counter(name: &'static str, v: u64, unit: Option<Unit>, help: &'static str) -> Metric {
    Metric {
        name,
        value: Value::Counter(v),
        unit,
        help,
    }
}

const fn gauge(name: &'static str, v: f64, unit: Option<Unit>, help: &'static str) -> Metric {
    Metric {
        name,
        value: Value::Gauge(v),
        unit,
        help,
    }
}

fn service_metrics(st: &ServiceStats) -> [Metric; 13] {
    let longest = st.blocked.first().map_or(0.0, |b| b.waiting.as_secs_f64());
    [
        gauge(
            "chanserv_service_requests_active",
            st.requests_active as f64,
            None,
            "Requests being served now.",
        ),
        counter(
            "chanserv_service_requests_total",
            st.requests_total,
            None,
            "Requests accepted.",
        ),
        counter(
            "chanserv_service_requests_failed_total",
            st.requests_failed,
            None,
            "Requests that ended with an error.",
        ),
        gauge(
            "chanserv_service_sources_active",
            st.sources_active as f64,
            None,
            "Sources whose frames are being sent now.",
        ),
        counter(
            "chanserv_service_sources_total",
            st.sources_total,
            None,
            "Sources announced (inline ones included).",
        ),
        counter(
            "chanserv_service_sources_completed_total",
            st.sources_completed,
            None,
            "Sources completed (END sent).",
        ),
        counter(
            "chanserv_service_sources_failed_total",
            st.sources_failed,
            None,
            "Sources their producer failed (ABORT sent).",
        ),
        counter(
            "chanserv_service_sources_cut_total",
            st.sources_cut,
            None,
            "Sources cut before their end: client left, link lost, write timeout.",
        ),
        counter(
            "chanserv_service_frames_sent_total",
            st.frames_sent,
            None,
            "Frames written to clients.",
        ),
        counter(
            "chanserv_service_bytes_sent_total",
            st.bytes_sent,
            Some(Unit::Bytes),
            "Frame payload bytes written to clients (before compression).",
        ),
        gauge(
            "chanserv_service_backpressure_wait_seconds",
            st.backpressure_wait.as_secs_f64(),
            Some(Unit::Seconds),
            "Total time sources waited for a consumer to make room; only grows.",
        ),
        gauge(
            "chanserv_service_sources_blocked",
            st.blocked.len() as f64,
            None,
            "Sources waiting on a slow consumer now.",
        ),
        gauge(
            "chanserv_service_blocked_longest_seconds",
            longest,
            Some(Unit::Seconds),
            "The longest wait of a source on its consumer now (0 when none).",
        ),
    ]
}

fn client_metrics(st: &ClientStats) -> [Metric; 10] {
    [
        gauge(
            "chanserv_client_requests_active",
            st.requests_active as f64,
            None,
            "Requests in progress: announcing, or with a source open.",
        ),
        counter(
            "chanserv_client_requests_total",
            st.requests_total,
            None,
            "Requests posted.",
        ),
        counter(
            "chanserv_client_requests_failed_total",
            st.requests_failed,
            None,
            "Requests whose post or announcements failed.",
        ),
        counter(
            "chanserv_client_sources_announced_total",
            st.sources_announced,
            None,
            "Sources announced to the client.",
        ),
        counter(
            "chanserv_client_sources_completed_total",
            st.sources_completed,
            None,
            "Sources whose end arrived.",
        ),
        counter(
            "chanserv_client_sources_failed_total",
            st.sources_failed,
            None,
            "Sources that failed or were cut.",
        ),
        counter(
            "chanserv_client_sources_dropped_total",
            st.sources_dropped,
            None,
            "Sources dropped before their end arrived.",
        ),
        gauge(
            "chanserv_client_sources_open",
            st.sources_open as f64,
            None,
            "Sources announced and not ended.",
        ),
        counter(
            "chanserv_client_frames_received_total",
            st.frames_received,
            None,
            "Frames received.",
        ),
        counter(
            "chanserv_client_bytes_received_total",
            st.bytes_received,
            Some(Unit::Bytes),
            "Frame payload bytes received (after decompression).",
        ),
    ]
}

fn node_metrics(st: &NodeStats) -> [Metric; 3] {
    let mut peers: Vec<NodeId> = st.links.iter().map(|l| l.peer).collect();
    peers.dedup(); // sorted by peer
    [
        gauge(
            "chanserv_node_links",
            st.links.len() as f64,
            None,
            "Links in the routing table now (draining ones included).",
        ),
        gauge(
            "chanserv_node_peers",
            peers.len() as f64,
            None,
            "Peers linked now.",
        ),
        counter(
            "chanserv_node_links_established_total",
            st.links_established,
            None,
            "Links established since the node started (reconnects and rotations included).",
        ),
    ]
}

/// The links to one peer, summed (see the module docs).
#[derive(Default)]
struct PeerLinks {
    identity: Option<String>,
    links: u64,
    bytes_in: u64,
    bytes_out: u64,
    streams_open: u64,
    streams_total: u64,
    /// The newest link's round trip, as it is `None` until its first PONG.
    rtt: Option<f64>,
}

impl PeerLinks {
    /// Adds `l`; links come oldest first, so the last one added is the newest.
    fn add(&mut self, l: &LinkStats) {
        self.identity = l.identity.clone().or(self.identity.take());
        self.links += 1;
        self.bytes_in += l.bytes_in;
        self.bytes_out += l.bytes_out;
        self.streams_open += l.streams_open;
        self.streams_total += l.streams_total;
        self.rtt = l.rtt.map(|d| d.as_secs_f64());
    }
}

/// The link metrics of one peer; the round trip only once one is known.
fn link_metrics(p: &PeerLinks) -> Vec<Metric> {
    let mut m = vec![
        gauge(
            "chanserv_link_links",
            p.links as f64,
            None,
            "Links to the peer now (2 while a rotated link drains).",
        ),
        counter(
            "chanserv_link_bytes_in_total",
            p.bytes_in,
            Some(Unit::Bytes),
            "Bytes read from the peer's links (yamux session, before TLS).",
        ),
        counter(
            "chanserv_link_bytes_out_total",
            p.bytes_out,
            Some(Unit::Bytes),
            "Bytes written to the peer's links (yamux session, before TLS).",
        ),
        gauge(
            "chanserv_link_streams_open",
            p.streams_open as f64,
            None,
            "Streams this node holds on the peer's links now.",
        ),
        counter(
            "chanserv_link_streams_total",
            p.streams_total,
            None,
            "Streams opened on the peer's links, both ways.",
        ),
    ];
    if let Some(rtt) = p.rtt {
        m.push(gauge(
            "chanserv_link_rtt_seconds",
            rtt,
            Some(Unit::Seconds),
            "The newest link's last keep-alive round trip.",
        ));
    }
    m
}

/// Publishes a snapshot of a node's links ([`Node::stats`](crate::Node::stats)): the
/// node's metrics labelled `node`, and per linked peer its link metrics labelled
/// `peer` (and `identity` over TLS). A peer no longer linked is not published again:
/// a recorder that keeps old series shows its last values.
pub fn record_node(stats: &NodeStats) {
    let node = Label::new("node", format!("{:016x}", stats.node));
    publish(&[node], &node_metrics(stats));
    let mut peers: BTreeMap<NodeId, PeerLinks> = BTreeMap::new();
    for l in &stats.links {
        peers.entry(l.peer).or_default().add(l);
    }
    for (peer, links) in &peers {
        let mut labels = vec![Label::new("peer", format!("{peer:016x}"))];
        if let Some(id) = &links.identity {
            labels.push(Label::new("identity", id.clone()));
        }
        publish(&labels, &link_metrics(links));
    }
}

/// Publishes a snapshot of the service `service`'s counters
/// ([`ServeHandle::stats`](crate::ServeHandle::stats)), labelled `service`.
pub fn record_service(service: &str, stats: &ServiceStats) {
    let labels = [Label::new("service", service.to_owned())];
    publish(&labels, &service_metrics(stats));
}

/// Publishes a snapshot of a client's counters ([`Client::stats`](crate::Client::stats)),
/// labelled `client` with the name you give it.
pub fn record_client(client: &str, stats: &ClientStats) {
    let labels = [Label::new("client", client.to_owned())];
    publish(&labels, &client_metrics(stats));
}

/// Registers every metric's help text and unit with the installed recorder (for
/// exporters that show them, such as Prometheus's `# HELP`). Call it once, after the
/// recorder is installed; publishing works without it.
pub fn describe() {
    let service = service_metrics(&ServiceStats::default());
    let client = client_metrics(&ClientStats::default());
    let node = node_metrics(&NodeStats {
        node: 0,
        links: Vec::new(),
        links_established: 0,
    });
    let link = link_metrics(&PeerLinks {
        rtt: Some(0.0),
        ..PeerLinks::default()
    });
    ::metrics::with_recorder(|r| {
        for m in service.iter().chain(&client).chain(&node).chain(&link) {
            let help = SharedString::const_str(m.help);
            match m.value {
                Value::Counter(_) => r.describe_counter(m.name.into(), m.unit, help),
                Value::Gauge(_) => r.describe_gauge(m.name.into(), m.unit, help),
            }
        }
    });
}

fn publish(labels: &[Label], metrics: &[Metric]) {
    for m in metrics {
        match m.value {
            Value::Counter(v) => ::metrics::counter!(m.name, labels.iter()).absolute(v),
            Value::Gauge(v) => ::metrics::gauge!(m.name, labels.iter()).set(v),
        }
    }
}
