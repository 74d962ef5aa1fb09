//! The `metrics` feature: a service's, a client's and the two nodes' counters after a
//! known workload, as a recorder sees them. `cargo test --features metrics --test metrics`.
#![cfg(feature = "metrics")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chanserv::{metrics as export, Client, Server, Source};
use futures::{stream, StreamExt};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString,
    Unit,
};
use tokio::time::timeout;

#[path = "support/mesh.rs"]
mod mesh;
use mesh::pair;

const T: Duration = Duration::from_secs(20);

/// What a recorder was given: values by (name, label), and descriptions by name.
#[derive(Default)]
struct Seen {
    values: BTreeMap<(String, String), f64>,
    described: BTreeMap<String, (Option<Unit>, String)>,
}

/// A recorder that keeps the last value of each counter and gauge.
#[derive(Default, Clone)]
struct TestRecorder(Arc<Mutex<Seen>>);

/// One metric's handle: writes through to the recorder's map.
struct Handle {
    key: (String, String),
    seen: Arc<Mutex<Seen>>,
}

impl Handle {
    fn store(&self, v: f64) {
        self.seen.lock().unwrap().values.insert(self.key.clone(), v);
    }
}

impl CounterFn for Handle {
    fn increment(&self, _: u64) {
        panic!("counters are published with `absolute`");
    }
    fn absolute(&self, v: u64) {
        self.store(v as f64);
    }
}

impl GaugeFn for Handle {
    fn increment(&self, _: f64) {
        panic!("gauges are published with `set`");
    }
    fn decrement(&self, _: f64) {
        panic!("gauges are published with `set`");
    }
    fn set(&self, v: f64) {
        self.store(v);
    }
}

impl TestRecorder {
    fn handle(&self, key: &Key) -> Arc<Handle> {
        let labels: Vec<_> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        Arc::new(Handle {
            key: (key.name().to_owned(), labels.join(",")),
            seen: self.0.clone(),
        })
    }
    fn get(&self, name: &str, label: &str) -> f64 {
        let seen = self.0.lock().unwrap();
        let key = (name.to_owned(), label.to_owned());
        *seen
            .values
            .get(&key)
            .unwrap_or_else(|| panic!("{key:?} not published"))
    }
    fn describe(&self, name: KeyName, unit: Option<Unit>, help: SharedString) {
        let mut seen = self.0.lock().unwrap();
        let old = seen
            .described
            .insert(name.as_str().to_owned(), (unit, help.into_owned()));
        assert!(old.is_none(), "{} described twice", name.as_str());
    }
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, name: KeyName, unit: Option<Unit>, help: SharedString) {
        self.describe(name, unit, help);
    }
    fn describe_gauge(&self, name: KeyName, unit: Option<Unit>, help: SharedString) {
        self.describe(name, unit, help);
    }
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {
        panic!("no histograms");
    }
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.handle(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.handle(key))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        panic!("no histograms");
    }
}

#[tokio::test]
async fn a_known_workload_is_exported() {
    timeout(T, async {
        let (a, b) = pair().await;
        let (node_a, node_b) = (a.clone(), b.clone());
        let svc = Server::new(a)
            .listen_and_serve("svc", |_| {
                // Two sources of 10 frames of 2 KiB (on child streams), one that
                // fails after a frame.
                let big = |i: u8| {
                    let frames = (0..10).map(move |_| Bytes::from(vec![i; 2048]));
                    Source::new("big", stream::iter(frames))
                };
                let failing = [Ok(Bytes::from("x")), Err("disk on fire")];
                stream::iter([
                    big(1),
                    big(2),
                    Source::try_new("bad", stream::iter(failing)),
                ])
            })
            .unwrap();
        b.wait_for_name("svc", T).await.unwrap();
        let client = Client::new(b).unwrap();
        for _ in 0..2 {
            let mut sources = client.lookup_and_post("svc", "", &[]).await.unwrap();
            while let Some(s) = sources.next().await {
                // Each source to its end, an error included.
                s.unwrap().count().await;
            }
        }
        let client_stats = client.stats();
        let service_stats = svc.shutdown(T).await;
        let (stats_a, stats_b) = (node_a.stats(), node_b.stats());

        let rec = TestRecorder::default();
        metrics::with_local_recorder(&rec, || {
            export::describe();
            export::record_service("svc", &service_stats);
            export::record_client("main", &client_stats);
            export::record_node(&stats_a);
            export::record_node(&stats_b);
        });
        let s = |name: &str| rec.get(&format!("chanserv_service_{name}"), "service=svc");
        assert_eq!(s("requests_total"), 2.0);
        assert_eq!(s("requests_active"), 0.0);
        assert_eq!(s("requests_failed_total"), 0.0);
        assert_eq!(s("sources_total"), 6.0);
        assert_eq!(s("sources_completed_total"), 4.0);
        assert_eq!(s("sources_failed_total"), 2.0);
        assert_eq!(s("sources_cut_total"), 0.0);
        assert_eq!(s("frames_sent_total"), 2.0 * 21.0);
        assert_eq!(s("bytes_sent_total"), 2.0 * (20.0 * 2048.0 + 1.0));
        assert_eq!(s("sources_blocked"), 0.0);
        let wait = service_stats.backpressure_wait.as_secs_f64();
        assert_eq!(s("backpressure_wait_seconds"), wait);

        let c = |name: &str| rec.get(&format!("chanserv_client_{name}"), "client=main");
        assert_eq!(c("requests_total"), 2.0);
        assert_eq!(c("requests_active"), 0.0);
        assert_eq!(c("requests_failed_total"), 0.0);
        assert_eq!(c("sources_announced_total"), 6.0);
        assert_eq!(c("sources_completed_total"), 4.0);
        assert_eq!(c("sources_failed_total"), 2.0);
        assert_eq!(c("sources_dropped_total"), 0.0);
        assert_eq!(c("sources_open"), 0.0);
        assert_eq!(c("frames_received_total"), 2.0 * 21.0);
        assert_eq!(c("bytes_received_total"), 2.0 * (20.0 * 2048.0 + 1.0));

        // Each node sees one link, to the other; what one wrote, the other read.
        let (id_a, id_b) = (node_a.id(), node_b.id());
        check_links(&rec, id_a, id_b, &stats_a);
        check_links(&rec, id_b, id_a, &stats_b);
        // The service's node sent every frame's payload to the client's (uncompressed).
        let payload = 2.0 * (20.0 * 2048.0 + 1.0);
        let a_out = rec.get("chanserv_link_bytes_out_total", &peer_label(id_b));
        let b_in = rec.get("chanserv_link_bytes_in_total", &peer_label(id_a));
        assert!(a_out > payload && b_in > payload, "{a_out} {b_in}");
        // The service's node accepted 2 request streams and dialed a child stream
        // for each of the 4 big sources.
        let streams = stats_a.links[0].streams_total;
        assert!(streams >= 2 + 4, "{streams}");

        // Every metric published is described, with its unit where it has one.
        let seen = rec.0.lock().unwrap();
        let names: BTreeSet<_> = seen.values.keys().map(|(n, _)| n.clone()).collect();
        // The RTT is described, and published only where a round trip was measured.
        let rtts = seen
            .values
            .keys()
            .filter(|(n, _)| n.ends_with("rtt_seconds"))
            .count();
        assert_eq!(names.len(), 13 + 10 + 3 + 5 + rtts.min(1));
        for n in &names {
            assert!(seen.described.contains_key(n), "{n} not described");
        }
        assert_eq!(seen.described.len(), 13 + 10 + 3 + 6);
        let unit = |n: &str| seen.described[n].0;
        assert_eq!(
            unit("chanserv_client_bytes_received_total"),
            Some(Unit::Bytes)
        );
        assert_eq!(
            unit("chanserv_service_backpressure_wait_seconds"),
            Some(Unit::Seconds)
        );
        assert_eq!(unit("chanserv_link_bytes_out_total"), Some(Unit::Bytes));
        assert_eq!(unit("chanserv_link_rtt_seconds"), Some(Unit::Seconds));
    })
    .await
    .expect("hung");
}

fn peer_label(peer: u64) -> String {
    format!("peer={peer:016x}")
}

/// Node `id`'s metrics, and those of its one link (to `peer`), as `stats` says.
fn check_links(rec: &TestRecorder, id: u64, peer: u64, stats: &chanserv::NodeStats) {
    let n = |name: &str| rec.get(&format!("chanserv_node_{name}"), &format!("node={id:016x}"));
    assert_eq!(n("links"), 1.0);
    assert_eq!(n("peers"), 1.0);
    assert_eq!(n("links_established_total"), 1.0);
    let link = &stats.links[0];
    let l = |name: &str| rec.get(&format!("chanserv_link_{name}"), &peer_label(peer));
    assert_eq!(l("links"), 1.0);
    assert_eq!(l("bytes_in_total"), link.bytes_in as f64);
    assert_eq!(l("bytes_out_total"), link.bytes_out as f64);
    assert_eq!(l("streams_open"), link.streams_open as f64);
    assert_eq!(l("streams_total"), link.streams_total as f64);
    // The RTT series exists once a keep-alive round trip was measured (the first
    // PING is 5 s away, so normally not yet).
    let rtt = ("chanserv_link_rtt_seconds".to_owned(), peer_label(peer));
    let published = rec.0.lock().unwrap().values.get(&rtt).copied();
    assert_eq!(published, link.rtt.map(|d| d.as_secs_f64()));
}
