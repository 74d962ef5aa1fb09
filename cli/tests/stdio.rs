//! `--spawn` and `--stdio` as processes: `chanserv post` runs `chanserv serve
//! --stdio` as its child node and posts to it over the child's stdin and stdout.

mod support;

use support::{run, BIN};

#[test]
fn post_reaches_a_service_served_on_the_stdio_of_a_spawned_child() {
    let child = format!("'{BIN}' serve ping --echo --stdio");
    let args = ["post", "ping", "hello over stdio", "--spawn", &child];
    let got = run(&[&args[..], &["--output", "raw", "-q"]].concat(), b"");
    assert_eq!(got.code, Some(0), "{got:?}");
    // The child printed no event line: on its stdout, one would have broken the link.
    assert_eq!(got.stdout_text(), "hello over stdio");
    // Its stderr is ours: it said nothing either.
    assert!(!got.stderr.contains("chanserv:"), "{}", got.stderr);
    // The child's node answers the admin service as any node the CLI runs.
    let child = format!("'{BIN}' node --stdio");
    let got = run(&["peers", "--spawn", &child], b"");
    assert_eq!(got.code, Some(0), "{got:?}");
    assert!(got.stdout_text().starts_with("node "), "{got:?}");
}

#[test]
fn a_spawned_command_that_is_no_node_fails_with_one_line() {
    // It stays (reading what we send) until killed: it does not exit before our
    // handshake is written, so the error is what it wrote.
    let cmd = "echo this is not a chanserv node; exec cat > /dev/null";
    let got = run(&["post", "ping", "--spawn", cmd], b"");
    assert_eq!(got.code, Some(1), "{got:?}");
    let lines = got.stderr_lines();
    assert_eq!(lines.len(), 1, "{:?}", got.stderr);
    assert!(
        lines[0].starts_with("chanserv: cannot spawn"),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains("bad magic"), "{}", lines[0]);
}
