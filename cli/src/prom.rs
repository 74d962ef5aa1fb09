//! `--metrics HOST:PORT` (`chanserv node`, `chanserv serve`): `GET /metrics` answers
//! the library's metrics (`chanserv::metrics`: the node, its links, the services the
//! process serves or relays) in the Prometheus text format, version 0.0.4.
//!
//! Each scrape takes a fresh snapshot: the library publishes it into a [`TextRecorder`]
//! made for that scrape (installed with `metrics::with_local_recorder`, so nothing is
//! global), which renders it. A peer or service that is gone is simply absent from
//! the next scrape. The recorder is our own, a few lines: the library only sets
//! counters (`absolute`) and gauges (`set`), and `metrics-exporter-prometheus` would
//! bring `metrics-util`, `quanta` and more into CI's build for no gain.
//!
//! HTTP: a minimal HTTP/1.1 responder on a tokio `TcpListener`, one request per
//! connection (`Connection: close`); anything but `GET /metrics` gets 404 or 405.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chanserv::Node;
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString,
    Unit,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::admin::AdminInfo;
use crate::Fail;

/// Longest request head read, and how long a client may take to send it.
const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The `--metrics` flag.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct MetricsArgs {
    /// Serve GET /metrics (Prometheus text format) on this TCP address (port 0 picks a
    /// free port; the bound address is printed as `metrics <addr>`).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,
}

/// A running metrics endpoint; dropping it stops it.
pub struct Endpoint {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the endpoint of `args`, if any: each scrape renders `node`'s stats and
/// those of the services in `info`.
pub async fn start(
    args: &MetricsArgs,
    node: &Node,
    info: &AdminInfo,
) -> Result<Option<Endpoint>, Fail> {
    let Some(addr) = &args.metrics else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr.as_str())
        .await
        .map_err(|e| Fail::usage(format!("cannot listen on {addr} (--metrics): {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Fail::usage(format!("--metrics {addr}: {e}")))?;
    let (node, info) = (node.clone(), info.clone());
    let snapshot = Arc::new(move || render(|| publish(&node, &info)));
    let task = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    let snapshot = snapshot.clone();
                    tokio::spawn(async move {
                        if let Err(e) = respond(conn, &*snapshot).await {
                            tracing::debug!("metrics client: {e}");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors, say: try again shortly.
                    tracing::warn!("metrics endpoint: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(Some(Endpoint { addr: bound, task }))
}

/// Publishes one snapshot of `node` and the services of `info`.
fn publish(node: &Node, info: &AdminInfo) {
    chanserv::metrics::record_node(&node.stats());
    for (name, st) in info.served.stats().iter().chain(&info.relayed.stats()) {
        chanserv::metrics::record_service(name, st);
    }
}

/// Renders what `publish` records, with every metric's help text.
pub fn render(publish: impl FnOnce()) -> String {
    let rec = TextRecorder::default();
    metrics::with_local_recorder(&rec, || {
        chanserv::metrics::describe();
        publish();
    });
    rec.render()
}

/// Answers one request on `conn`.
async fn respond(
    mut conn: TcpStream,
    snapshot: &(dyn Fn() -> String + Sync),
) -> std::io::Result<()> {
    let head = tokio::time::timeout(READ_TIMEOUT, read_head(&mut conn))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "slow request"))??;
    let line = head.lines().next().unwrap_or_default();
    let mut words = line.split_whitespace();
    let (method, target) = (words.next(), words.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    let (status, body) = match (method, path) {
        (Some("GET"), "/metrics") => ("200 OK", snapshot()),
        (Some("GET"), _) => ("404 Not Found", "not found: try /metrics\n".to_owned()),
        _ => ("405 Method Not Allowed", "GET /metrics only\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes()).await?;
    conn.shutdown().await
}

/// The request line and headers, up to the blank line (the body, if any, is ignored).
async fn read_head(conn: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_HEAD {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Counter or gauge, as registered.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Counter,
    Gauge,
}

/// What one scrape recorded: per metric name its kind, help and series.
#[derive(Default)]
struct Family {
    kind: Option<Kind>,
    help: Option<String>,
    /// Rendered labels (`{a="b"}` or empty) → value.
    series: BTreeMap<String, f64>,
}

/// A `metrics` recorder that keeps each counter's and gauge's last value and renders
/// them in the Prometheus text format. Histograms are not kept (the library has none).
#[derive(Default, Clone)]
pub struct TextRecorder(Arc<Mutex<BTreeMap<String, Family>>>);

/// One series' handle, writing through to the recorder.
struct Series {
    rec: TextRecorder,
    name: String,
    labels: String,
}

impl Series {
    fn update(&self, f: impl FnOnce(&mut f64)) {
        let mut families = self.rec.0.lock().unwrap();
        let family = families.entry(self.name.clone()).or_default();
        f(family.series.entry(self.labels.clone()).or_insert(0.0));
    }
}

impl CounterFn for Series {
    fn increment(&self, v: u64) {
        self.update(|x| *x += v as f64);
    }
    fn absolute(&self, v: u64) {
        self.update(|x| *x = x.max(v as f64));
    }
}

impl GaugeFn for Series {
    fn increment(&self, v: f64) {
        self.update(|x| *x += v);
    }
    fn decrement(&self, v: f64) {
        self.update(|x| *x -= v);
    }
    fn set(&self, v: f64) {
        self.update(|x| *x = v);
    }
}

impl TextRecorder {
    fn series(&self, key: &Key, kind: Kind) -> Arc<Series> {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}=\"{}\"", l.key(), escape(l.value(), true)))
            .collect();
        let labels = match labels.is_empty() {
            true => String::new(),
            false => format!("{{{}}}", labels.join(",")),
        };
        let name = key.name().to_owned();
        let mut families = self.0.lock().unwrap();
        let family = families.entry(name.clone()).or_default();
        family.kind = Some(kind);
        family.series.entry(labels.clone()).or_insert(0.0);
        Arc::new(Series {
            rec: self.clone(),
            name,
            labels,
        })
    }

    fn describe(&self, name: KeyName, kind: Kind, help: SharedString) {
        let mut families = self.0.lock().unwrap();
        let family = families.entry(name.as_str().to_owned()).or_default();
        family.kind.get_or_insert(kind);
        family.help = Some(help.into_owned());
    }

    /// The text format: per metric with at least one series, `# HELP`, `# TYPE` and
    /// its series, sorted by name and labels.
    pub fn render(&self) -> String {
        let families = self.0.lock().unwrap();
        let mut out = String::new();
        for (name, f) in families.iter().filter(|(_, f)| !f.series.is_empty()) {
            if let Some(help) = &f.help {
                out += &format!("# HELP {name} {}\n", escape(help, false));
            }
            let kind = match f.kind {
                Some(Kind::Counter) => "counter",
                Some(Kind::Gauge) => "gauge",
                None => "untyped",
            };
            out += &format!("# TYPE {name} {kind}\n");
            for (labels, v) in &f.series {
                out += &format!("{name}{labels} {}\n", number(*v));
            }
        }
        out
    }
}

impl Recorder for TextRecorder {
    fn describe_counter(&self, name: KeyName, _: Option<Unit>, help: SharedString) {
        self.describe(name, Kind::Counter, help);
    }
    fn describe_gauge(&self, name: KeyName, _: Option<Unit>, help: SharedString) {
        self.describe(name, Kind::Gauge, help);
    }
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.series(key, Kind::Counter))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.series(key, Kind::Gauge))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// Escapes a label value (`\`, `"`, newline) or help text (`\`, newline).
fn escape(s: &str, quote: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out
}

/// A sample value: integers without a fraction, `NaN`, `+Inf`, `-Inf`.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_has_help_type_and_escaped_labels() {
        let text = render(|| {
            metrics::counter!("x_total", "peer" => "a\"b\\c\nd").absolute(7);
            metrics::gauge!("y_seconds").set(0.25);
            metrics::gauge!("y_seconds").set(1.5);
        });
        let help = "# HELP chanserv_link_bytes_out_total ";
        assert!(!text.contains(help), "no series, no family: {text}");
        assert!(text.contains("# TYPE x_total counter\nx_total{peer=\"a\\\"b\\\\c\\nd\"} 7\n"));
        assert!(
            text.contains("# TYPE y_seconds gauge\ny_seconds 1.5\n"),
            "{text}"
        );
        let node = chanserv::Node::new();
        let text = render(|| chanserv::metrics::record_node(&node.stats()));
        let id = format!("{:016x}", node.id());
        assert!(text.contains("# HELP chanserv_node_links Links"), "{text}");
        assert!(text.contains(&format!("chanserv_node_links{{node=\"{id}\"}} 0\n")));
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(3.0), "3");
    }
}
