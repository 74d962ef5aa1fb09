//! `chanserv node`, `names` and `peers` as processes: identity lines, the admin
//! service, the config file, graceful shutdown.

mod support;

use std::time::Duration;

use support::{node, run, serve, Proc, TempDir};

#[test]
fn names_and_peers_show_what_the_node_sees() {
    let (_node, addr) = node(&[]);
    let mut svc = serve(&["greeter", "--join", &addr, "--echo"]);
    let svc_id = svc
        .seen
        .iter()
        .find_map(|l| l.strip_prefix("node "))
        .unwrap()
        .to_owned();
    let got = run(&["names", "--join", &addr], b"");
    assert_eq!(got.code, Some(0), "{got:?}");
    let text = got.stdout_text();
    let line = text
        .lines()
        .find(|l| l.starts_with("greeter "))
        .expect(&text);
    assert!(line.contains(&svc_id), "{line}");
    assert!(
        !text.contains("chanserv.admin"),
        "reserved names are hidden: {text}"
    );
    assert!(run(&["names", "--join", &addr, "--all"], b"")
        .stdout_text()
        .contains("chanserv.admin"));
    let peers = run(&["peers", "--join", &addr], b"").stdout_text();
    assert!(peers.contains(&format!("peer {svc_id} links 1")), "{peers}");
    assert!(peers.contains(&format!("listen {addr}")), "{peers}");
    let json = run(&["peers", "--join", &addr, "--json"], b"").stdout_text();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["id"] == svc_id.as_str()));
    // The service's own node answers too.
    svc.signal("TERM");
    svc.wait_line("stopped");
}

#[test]
fn sigterm_stops_a_node_gracefully_within_its_grace() {
    let (mut node, addr) = node(&["--grace", "1s"]);
    let mut svc = serve(&["s", "--join", &addr, "--echo", "--grace", "1s"]);
    node.wait_line("link up");
    node.signal("TERM");
    node.wait_line("shutdown SIGTERM");
    node.wait_line("stopped");
    assert!(node.wait_exit(Duration::from_secs(5)).success());
    svc.wait_line("link down");
    svc.signal("INT");
    svc.wait_line("stopped");
    assert!(svc.wait_exit(Duration::from_secs(5)).success());
}

#[test]
fn a_config_file_sets_what_flags_do() {
    let dir = TempDir::new("config");
    let file = dir.path().join("node.toml");
    let toml = "name = \"hub-1\"\nlisten = [\"127.0.0.1:0\"]\nkeepalive = \"1s\"\ngrace = \"1s\"\n";
    std::fs::write(&file, toml).unwrap();
    let mut from_file = Proc::spawn(&["node", "--config", file.to_str().unwrap()]);
    let id = from_file.wait_line("node ");
    from_file.wait_line("listen 127.0.0.1:");
    let mut from_flags = Proc::spawn(&["node", "--name", "hub-1", "--listen", "127.0.0.1:0"]);
    assert_eq!(from_flags.wait_line("node "), id);
    assert_eq!(id.len(), 16);
    // A flag wins over the file.
    let mut over = Proc::spawn(&["node", "--config", file.to_str().unwrap(), "--id", "ab"]);
    assert_eq!(over.wait_line("node "), "00000000000000ab");
    std::fs::write(&file, "lisen = []\n").unwrap();
    let bad = run(&["node", "--config", file.to_str().unwrap()], b"");
    assert_eq!(bad.code, Some(1));
    assert_eq!(bad.stderr_lines().len(), 1, "{}", bad.stderr);
}

#[test]
fn the_node_relays_to_every_provider_and_forgets_those_that_leave() {
    let (mut node, addr) = node(&[]);
    let a = serve(&["who", "--join", &addr, "--exec", "echo", "A"]);
    node.wait_line("relay add who");
    let mut b = serve(&["who", "--join", &addr, "--exec", "echo", "B"]);
    b.wait_line("link up");
    // Requests take turns among the providers the relay sees.
    let mut seen = String::new();
    for _ in 0..8 {
        let got = run(&["post", "who", "--join", &addr, "-o", "raw", "-q"], b"");
        assert_eq!(got.code, Some(0), "{got:?}");
        seen.push_str(&got.stdout_text());
        if seen.contains('A') && seen.contains('B') {
            break;
        }
    }
    assert!(seen.contains('A') && seen.contains('B'), "{seen}");
    drop(a);
    b.signal("TERM");
    b.wait_line("stopped");
    node.wait_line("relay remove who");
    let names = run(&["names", "--join", &addr], b"").stdout_text();
    assert!(!names.contains("who"), "{names}");
}

#[test]
fn log_shows_the_library_at_the_level_asked() {
    let (mut node, addr) = node(&["--log", "chanserv=debug"]);
    let _svc = serve(&["s", "--join", &addr, "--echo"]);
    node.wait_line("link up");
    // A library line at DEBUG; it may sit in a span (`DEBUG link{peer=..}: chanserv::..`).
    support::eventually("a debug line on stderr", || {
        let err = node.stderr();
        err.lines()
            .any(|l| l.contains(" DEBUG ") && l.contains("chanserv::"))
    });
    let bad = run(&["node", "--log", "chanserv=loud"], b"");
    assert_eq!(
        (bad.code, bad.stderr_lines().len()),
        (Some(1), 1),
        "{}",
        bad.stderr
    );
}

#[test]
fn a_unix_socket_left_by_a_killed_node_is_taken_over() {
    let dir = TempDir::new("stale");
    let sock = dir.path().join("node.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap()); // the file stays
    let sock = sock.to_str().unwrap();
    let mut first = Proc::spawn(&["node", "--listen-unix", sock]);
    first.wait_line("ready");
    // A live one is not: the second node says it is in use.
    let second = run(&["node", "--listen-unix", sock], b"");
    assert_eq!(second.code, Some(1), "{second:?}");
    assert!(second.stderr.contains(sock), "{}", second.stderr);
}
