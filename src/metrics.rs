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

use ::metrics::{Label, SharedString, Unit};

use crate::{ClientStats, ServiceStats};

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

// Node and link metrics go here: `node_metrics(&NodeStats)` (per node) and
// `link_metrics(&LinkStats)` (label `peer`, the peer's node id) as tables like the
// two above, a `record_node` that publishes them, their rows in `describe` and in
// the module docs' tables. `Node::stats()` is added separately; wire it once it lands.

/// Publishes a snapshot of the service `service`'s counters
/// ([`ServeHandle::stats`](crate::ServeHandle::stats)), labelled `service`.
pub fn record_service(service: &str, stats: &ServiceStats) {
    publish("service", service, &service_metrics(stats));
}

/// Publishes a snapshot of a client's counters ([`Client::stats`](crate::Client::stats)),
/// labelled `client` with the name you give it.
pub fn record_client(client: &str, stats: &ClientStats) {
    publish("client", client, &client_metrics(stats));
}

/// Registers every metric's help text and unit with the installed recorder (for
/// exporters that show them, such as Prometheus's `# HELP`). Call it once, after the
/// recorder is installed; publishing works without it.
pub fn describe() {
    let service = service_metrics(&ServiceStats::default());
    let client = client_metrics(&ClientStats::default());
    ::metrics::with_recorder(|r| {
        for m in service.iter().chain(&client) {
            let help = SharedString::const_str(m.help);
            match m.value {
                Value::Counter(_) => r.describe_counter(m.name.into(), m.unit, help),
                Value::Gauge(_) => r.describe_gauge(m.name.into(), m.unit, help),
            }
        }
    });
}

fn publish(label: &'static str, value: &str, metrics: &[Metric]) {
    let labels = [Label::new(label, value.to_owned())];
    for m in metrics {
        match m.value {
            Value::Counter(v) => ::metrics::counter!(m.name, labels.iter()).absolute(v),
            Value::Gauge(v) => ::metrics::gauge!(m.name, labels.iter()).set(v),
        }
    }
}
