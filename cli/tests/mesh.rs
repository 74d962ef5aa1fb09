//! `chanserv routes` and `chanserv ping` as processes, on a mesh of two nodes that do
//! not relay at the CLI level (`--no-relay`): a request crosses them by the library's
//! routing alone.

mod support;

use support::{eventually, node, run, serve, Proc};

/// The id a `chanserv node` or `serve` printed on its `node <id>` line.
fn id_of(p: &Proc) -> String {
    let id = p.seen.iter().find_map(|l| l.strip_prefix("node "));
    id.expect("a node line").to_owned()
}

/// Node A, node B joined to A, a service `svc` (an echo) joined to B: A reaches the
/// service through B. Returns them with A's address.
fn chain() -> (Proc, Proc, Proc, String) {
    let (a, a_addr) = node(&["--no-relay"]);
    let (b, b_addr) = node(&["--no-relay", "--join", &a_addr]);
    let svc = serve(&["svc", "--echo", "--join", &b_addr]);
    (a, b, svc, a_addr)
}

#[test]
fn routes_show_the_path_to_each_node_through_the_mesh() {
    let (a, b, svc, a_addr) = chain();
    let (b_id, svc_id) = (id_of(&b), id_of(&svc));
    let want = format!("route {svc_id} hops 2 path {b_id},{svc_id} names svc");
    let mut text = String::new();
    eventually("A routes to the service through B", || {
        let got = run(&["routes", "--join", &a_addr], b"");
        assert_eq!(got.code, Some(0), "{got:?}");
        text = got.stdout_text();
        text.lines().any(|l| l == want)
    });
    assert!(text.starts_with(&format!("node {}\n", id_of(&a))), "{text}");
    assert!(
        text.contains(&format!("route {b_id} hops 1 path {b_id}\n")),
        "{text}"
    );
    let json = run(&["routes", "--join", &a_addr, "--json"], b"").stdout_text();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let to_svc = v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == svc_id.as_str())
        .expect(&json);
    assert_eq!(to_svc["path"], serde_json::json!([b_id, svc_id]));
}

#[test]
fn ping_times_each_request_across_the_mesh_and_counts_failures() {
    let (_a, _b, _svc, a_addr) = chain();
    let args = ["ping", "svc", "hello", "--join", &a_addr];
    let got = run(
        &[&args[..], &["--count", "3", "--interval", "0"]].concat(),
        b"",
    );
    assert_eq!(got.code, Some(0), "{got:?}");
    let text = got.stdout_text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    for (i, line) in lines[..3].iter().enumerate() {
        assert!(
            line.starts_with(&format!("ping seq={i} time_ms=")),
            "{line}"
        );
        assert!(line.ends_with(" sources=1 bytes=5"), "{line}");
    }
    assert!(
        lines[3].starts_with("done sent=3 ok=3 failed=0 min_ms="),
        "{text}"
    );
    assert!(!lines[3].contains("=-"), "{text}");

    // A service that fails every request: each is counted, none stops the run.
    let _fail = serve(&["fail", "--join", &a_addr, "--exec", "sh", "-c", "exit 3"]);
    let got = run(
        &["ping", "fail", "--join", &a_addr, "-c", "2", "-i", "0"],
        b"",
    );
    assert_eq!(got.code, Some(2), "{got:?}");
    let text = got.stdout_text();
    assert_eq!(text.matches(" error=").count(), 2, "{text}");
    assert!(
        text.ends_with("done sent=2 ok=0 failed=2 min_ms=- median_ms=- max_ms=-\n"),
        "{text}"
    );

    let missing = run(
        &["ping", "nobody", "--join", &a_addr, "--timeout", "300ms"],
        b"",
    );
    assert_eq!(missing.code, Some(1), "{missing:?}");
    assert_eq!(missing.stderr_lines().len(), 1, "{}", missing.stderr);
}
