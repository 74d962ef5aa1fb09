//! `chanserv stats` and `--metrics` as processes: the counters after a known post, a
//! stalled consumer seen as a blocked source, and `GET /metrics` over a plain socket.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::{Command, Stdio};

use support::{eventually, node, run, serve, Proc, TempDir, BIN, BOUND};

/// The files served: (name, size); 4 KiB chunks make 1 + 3 + 0 frames.
const FILES: [(&str, usize); 3] = [("a", 100), ("b", 3 * 4096), ("c", 0)];
const FRAMES: u64 = 1 + 3;
const BYTES: u64 = 100 + 3 * 4096;

fn serve_files(addr: &str, extra: &[&str]) -> (TempDir, Proc) {
    let files: Vec<_> = FILES.iter().map(|&(n, len)| (n, vec![b'x'; len])).collect();
    support::serve_files(addr, &files, extra)
}

/// A line's `key=value` words.
fn kv(line: &str) -> HashMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

fn stats(addr: &str) -> String {
    let got = run(&["stats", "--join", addr], b"");
    assert_eq!(got.code, Some(0), "{got:?}");
    got.stdout_text()
}

/// The `service files` line of the node `node`, once none of its requests is active.
fn settled_service_line(addr: &str, node: &str) -> String {
    let prefix = format!("service files node={node}");
    let mut line = String::new();
    eventually("the service's requests ended", || {
        let text = stats(addr);
        line = text
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_default()
            .to_owned();
        kv(&line).get("active") == Some(&"0")
    });
    line
}

fn id_of(p: &Proc) -> String {
    let id = p.seen.iter().find_map(|l| l.strip_prefix("node "));
    id.expect("a node line").to_owned()
}

#[test]
fn stats_shows_the_links_and_exact_counters_after_a_known_post() {
    let (hub, addr) = node(&[]);
    let (_dir, svc) = serve_files(&addr, &[]);
    let (hub_id, svc_id) = (id_of(&hub), id_of(&svc));
    let got = run(&["post", "files", "--join", &addr, "-o", "raw", "-q"], b"");
    assert_eq!(
        (got.code, got.stdout.len() as u64),
        (Some(0), BYTES),
        "{got:?}"
    );

    // The service itself, asked through the hub, and the hub's relay of it.
    for (node, relay) in [(&svc_id, ""), (&hub_id, " relay")] {
        let line = settled_service_line(&addr, node);
        assert!(line.contains(&format!("node={node}{relay} ")), "{line}");
        let c = kv(&line);
        let want = [
            ("requests", 1),
            ("failed", 0),
            ("sources", FILES.len() as u64),
            ("completed", FILES.len() as u64),
            ("source_failed", 0),
            ("cut", 0),
            ("frames", FRAMES),
            ("bytes", BYTES),
        ];
        for (key, n) in want {
            assert_eq!(c[key], n.to_string(), "{key} in {line}");
        }
    }
    let text = stats(&addr);
    assert!(text.starts_with(&format!("node {hub_id}\n")), "{text}");
    let link = text
        .lines()
        .find(|l| l.starts_with(&format!("link {svc_id} ")))
        .unwrap_or_else(|| panic!("no link to the service: {text}"));
    let c = kv(link);
    let bytes_in: u64 = c["in"].parse().unwrap();
    assert!(bytes_in > BYTES, "the files came over this link: {link}");
    assert!(c["out"].parse::<u64>().unwrap() > 0, "{link}");
    assert!(link.contains(" active "), "{link}");
    assert!(!text.contains("blocked"), "{text}");

    // JSON: the same answer, one object.
    let got = run(&["stats", "--join", &addr, "--json"], b"");
    let v: serde_json::Value = serde_json::from_str(&got.stdout_text()).expect("JSON");
    let services = v["services"].as_array().unwrap();
    let own = services
        .iter()
        .find(|s| s["node"] == svc_id.as_str())
        .unwrap();
    assert_eq!(
        (own["relay"].as_bool(), own["bytes_sent"].as_u64()),
        (Some(false), Some(BYTES))
    );
    assert_eq!(v["unanswered"].as_array().unwrap().len(), 0);
}

#[test]
fn a_consumer_that_does_not_read_shows_as_blocked() {
    let (hub, addr) = node(&[]);
    let svc = serve(&["endless", "--join", &addr, "--exec", "yes"]);
    let (hub_id, svc_id) = (id_of(&hub), id_of(&svc));
    // A post whose output nobody reads: its pipe fills, then its node's window.
    let client_id = "00000000000000c1";
    let mut child = Command::new(BIN)
        .args([
            "post", "endless", "--join", &addr, "-o", "raw", "-q", "--id", client_id,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _unread = child.stdout.take();
    let _post = Proc::adopt(child);
    // The relay waits for the post's node; the service waits for the relay's.
    let relay_blocked = format!("blocked endless node={hub_id} ");
    let svc_blocked = format!("blocked endless node={svc_id} ");
    let mut text = String::new();
    eventually("both blocked sources", || {
        text = stats(&addr);
        text.contains(&relay_blocked) && text.contains(&svc_blocked)
    });
    let line = |prefix: &str| text.lines().find(|l| l.starts_with(prefix)).unwrap();
    let (relay, origin) = (kv(line(&relay_blocked)), kv(line(&svc_blocked)));
    assert_eq!(relay["client"], client_id, "{text}");
    assert_eq!(origin["client"], hub_id, "{text}");
    assert_eq!((relay["source"], origin["source"]), ("0", "0"), "{text}");
    assert!(!relay["waiting"].is_empty() && !origin["waiting"].is_empty());
}

/// `GET <path>` on `addr`: the status line and the body.
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(BOUND)).unwrap();
    write!(conn, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// The value of the sample `series` (name and labels) in a scrape.
fn sample(body: &str, series: &str) -> f64 {
    let line = body.lines().find(|l| l.starts_with(&format!("{series} ")));
    let line = line.unwrap_or_else(|| panic!("no {series} in {body}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn metrics_are_served_in_the_prometheus_text_format() {
    let (hub, addr) = node(&["--metrics", "127.0.0.1:0"]);
    let (_dir, svc) = serve_files(&addr, &["--metrics", "127.0.0.1:0"]);
    let metrics_of = |p: &Proc| {
        let m = p.seen.iter().find_map(|l| l.strip_prefix("metrics "));
        m.expect("a metrics line").to_owned()
    };
    let (hub_metrics, svc_metrics) = (metrics_of(&hub), metrics_of(&svc));
    let got = run(&["post", "files", "--join", &addr, "-o", "raw", "-q"], b"");
    assert_eq!(got.code, Some(0), "{got:?}");
    settled_service_line(&addr, &id_of(&svc));

    let (status, body) = http_get(&svc_metrics, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        body.contains("# TYPE chanserv_service_requests_total counter\n"),
        "{body}"
    );
    let svc_series = |name: &str| sample(&body, &format!("{name}{{service=\"files\"}}"));
    assert_eq!(svc_series("chanserv_service_requests_total"), 1.0);
    assert_eq!(
        svc_series("chanserv_service_bytes_sent_total"),
        BYTES as f64
    );
    let hub_link = format!("{{peer=\"{}\"}}", id_of(&hub));
    assert!(sample(&body, &format!("chanserv_link_bytes_out_total{hub_link}")) > BYTES as f64);

    // The hub: its link to the service, and the relay's counters.
    let (status, body) = http_get(&hub_metrics, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let svc_link = format!("{{peer=\"{}\"}}", id_of(&svc));
    assert!(sample(&body, &format!("chanserv_link_bytes_in_total{svc_link}")) > BYTES as f64);
    assert!(sample(&body, &format!("chanserv_link_bytes_out_total{svc_link}")) > 0.0);
    assert_eq!(
        sample(&body, "chanserv_service_requests_total{service=\"files\"}"),
        1.0
    );
    // The service's node, and maybe a `stats` client whose link is still going down.
    let node = format!("chanserv_node_peers{{node=\"{}\"}}", id_of(&hub));
    assert!(sample(&body, &node) >= 1.0, "{body}");
    assert_eq!(http_get(&hub_metrics, "/other").0, "HTTP/1.1 404 Not Found");
}
