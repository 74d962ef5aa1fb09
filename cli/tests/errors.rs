//! Bad input gives one line on stderr and a non-zero status: never a panic, a
//! backtrace or a usage screen.

mod support;

use support::{node, run, Output};

fn one_line_failure(got: &Output, code: i32, needle: &str) {
    assert_eq!(got.code, Some(code), "{got:?}");
    let lines = got.stderr_lines();
    assert_eq!(
        lines.len(),
        1,
        "exactly one line on stderr: {:?}",
        got.stderr
    );
    assert!(
        lines[0].starts_with("chanserv: ") && lines[0].contains(needle),
        "{}",
        lines[0]
    );
    assert!(!got.stderr.contains("panicked"), "{}", got.stderr);
}

#[test]
fn unknown_flags_and_bad_values() {
    one_line_failure(&run(&["post", "x", "--bogus"], b""), 1, "--bogus");
    one_line_failure(&run(&["frobnicate"], b""), 1, "frobnicate");
    one_line_failure(&run(&[], b""), 1, "subcommand");
    one_line_failure(&run(&["post", "x", "--timeout", "soon"], b""), 1, "soon");
    one_line_failure(&run(&["node", "--id", "xyz"], b""), 1, "xyz");
    one_line_failure(
        &run(&["serve", "x", "--join", "127.0.0.1:1"], b""),
        1,
        "--dir",
    );
    one_line_failure(
        &run(
            &[
                "serve",
                "x",
                "--echo",
                "--chunk",
                "0",
                "--join",
                "127.0.0.1:1",
            ],
            b"",
        ),
        1,
        "--chunk",
    );
    one_line_failure(
        &run(
            &["node", "--keepalive", "5s", "--keepalive-timeout", "1s"],
            b"",
        ),
        1,
        "--keepalive",
    );
    one_line_failure(
        &run(
            &["post", "x", "--join", "127.0.0.1:1", "--out", "/proc/nope"],
            b"",
        ),
        1,
        "/proc/nope",
    );
}

#[test]
fn help_shows_examples_for_every_subcommand() {
    for sub in ["node", "serve", "post", "names", "peers"] {
        let got = run(&[sub, "--help"], b"");
        assert_eq!(got.code, Some(0));
        let text = got.stdout_text();
        assert!(
            text.contains("Examples:") && text.contains(&format!("chanserv {sub}")),
            "{sub}: {text}"
        );
    }
    assert!(run(&["post", "--help"], b"")
        .stdout_text()
        .contains("Exit status"));
}

#[test]
fn an_unreachable_address_is_one_line() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    for cmd in ["post", "names", "serve"] {
        let mut args = vec![cmd];
        if cmd != "names" {
            args.push("x");
        }
        args.extend(["--join", &addr]);
        if cmd == "serve" {
            args.push("--echo");
        }
        one_line_failure(&run(&args, b""), 1, &addr);
    }
    one_line_failure(
        &run(&["post", "x", "--join", "no-such-host.invalid:7000"], b""),
        1,
        "no-such-host",
    );
}

#[test]
fn an_unknown_service_is_one_line_after_the_timeout() {
    let (_node, addr) = node(&[]);
    let got = run(
        &[
            "post",
            "nobody-serves-this",
            "--join",
            &addr,
            "--timeout",
            "300ms",
        ],
        b"",
    );
    one_line_failure(&got, 1, "nobody-serves-this");
}
