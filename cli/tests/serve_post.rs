//! `chanserv serve` and `chanserv post` end to end, as processes: a node, a service
//! joined to it, a client joined to it (so every request crosses the node's relay).

mod support;

use std::path::Path;

use support::{eventually, node, run, serve, Proc, TempDir};

/// Bytes that differ from file to file and from chunk to chunk.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

const CHUNK: usize = 4096;

/// (file name, contents): empty, small, exactly one chunk, many chunks and a tail.
fn files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("a-small.txt", b"hello, files\n".to_vec()),
        ("b-empty", Vec::new()),
        ("c-one-chunk", pattern(CHUNK, 1)),
        ("d-big.bin", pattern(25 * CHUNK + 3, 2)),
    ]
}

fn serve_files(addr: &str) -> (TempDir, Proc) {
    let (dir, p) = support::serve_files(addr, &files(), &[]);
    // Listed per request: not served.
    std::fs::create_dir(dir.path().join("subdir-not-served")).unwrap();
    (dir, p)
}

#[test]
fn every_byte_of_every_file_arrives() {
    let (_node, addr) = node(&[]);
    let (_dir, _svc) = serve_files(&addr);
    let out = TempDir::new("got");
    let got = run(&["post", "files", "--join", &addr, "--out", out.str()], b"");
    assert_eq!(got.code, Some(0), "{got:?}");
    let mut names: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, files().iter().map(|f| f.0).collect::<Vec<_>>());
    for (name, data) in files() {
        let saved = std::fs::read(out.path().join(name)).unwrap();
        assert!(
            saved == data,
            "{name}: {} bytes saved, {} sent",
            saved.len(),
            data.len()
        );
    }
    // Raw output: the files one after the other, in the order the service lists them.
    let raw = run(&["post", "files", "--join", &addr, "-o", "raw", "-q"], b"");
    assert_eq!(raw.code, Some(0), "{}", raw.stderr);
    assert!(raw.stdout == files().concat_data(), "raw output differs");
}

trait Concat {
    fn concat_data(&self) -> Vec<u8>;
}

impl Concat for Vec<(&'static str, Vec<u8>)> {
    fn concat_data(&self) -> Vec<u8> {
        self.iter().flat_map(|f| f.1.clone()).collect()
    }
}

#[test]
fn files_are_cut_into_chunks_and_json_says_so() {
    let (_node, addr) = node(&[]);
    let (_dir, _svc) = serve_files(&addr);
    let got = run(&["post", "files", "--join", &addr, "--output", "json"], b"");
    assert_eq!(got.code, Some(0), "{got:?}");
    let events: Vec<serde_json::Value> = got
        .stdout_text()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    for (i, (name, data)) in files().into_iter().enumerate() {
        let of = |kind: &str| {
            events
                .iter()
                .filter(|e| e["event"] == kind && e["source"] == i)
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(of("source")[0]["header"], name);
        let frames = of("frame");
        assert_eq!(frames.len(), data.len().div_ceil(CHUNK), "{name}");
        assert!(frames
            .iter()
            .all(|f| f["len"].as_u64().unwrap() as usize <= CHUNK));
        assert_eq!(of("end")[0]["bytes"], data.len(), "{name}");
    }
    let done = events.last().unwrap();
    assert_eq!(
        (done["event"].as_str(), done["failed"].as_u64()),
        (Some("done"), Some(0))
    );
}

#[test]
fn a_failing_command_fails_its_source_with_its_stderr() {
    let (_node, addr) = node(&[]);
    let script = "echo partial; echo oops >&2; exit 3";
    let _svc = serve(&["fail", "--join", &addr, "--exec", "sh", "-c", script]);
    let got = run(&["post", "fail", "--join", &addr], b"");
    assert_eq!(got.code, Some(3), "{got:?}");
    let text = got.stdout_text();
    assert!(text.contains("partial"), "{text}");
    let error = text
        .lines()
        .find(|l| l.starts_with("error 0"))
        .expect(&text);
    assert!(
        error.contains("oops") && error.contains("status 3"),
        "{error}"
    );
    let json = run(&["post", "fail", "--join", &addr, "-o", "json"], b"");
    assert_eq!(json.code, Some(3));
    assert!(json.stdout_text().contains(r#""event":"error""#));
}

#[test]
fn a_command_gets_the_body_and_its_output_is_the_answer() {
    let (_node, addr) = node(&[]);
    let _svc = serve(&["upper", "--join", &addr, "--exec", "tr", "a-z", "A-Z"]);
    let got = run(
        &["post", "upper", "hello", "--join", &addr, "-o", "raw"],
        b"",
    );
    assert_eq!(
        (got.code, got.stdout.as_slice()),
        (Some(0), &b"HELLO"[..]),
        "{}",
        got.stderr
    );
    let stdin = run(
        &["post", "upper", "-", "--join", &addr, "-o", "raw"],
        b"from stdin",
    );
    assert_eq!(stdin.stdout, b"FROM STDIN");
    let dir = TempDir::new("body");
    let body = dir.path().join("body");
    std::fs::write(&body, "from a file").unwrap();
    let args = [
        "post",
        "upper",
        "--body-file",
        body.to_str().unwrap(),
        "--join",
        &addr,
        "-o",
        "raw",
    ];
    assert_eq!(run(&args, b"").stdout, b"FROM A FILE");
}

#[test]
fn a_command_that_cannot_start_fails_the_request() {
    let (_node, addr) = node(&[]);
    let _svc = serve(&["nocmd", "--join", &addr, "--exec", "/nonexistent/command"]);
    let got = run(&["post", "nocmd", "--join", &addr], b"");
    assert_eq!(got.code, Some(2), "{got:?}");
    assert_eq!(got.stderr_lines().len(), 1, "{}", got.stderr);
    assert!(
        got.stderr.contains("cannot run /nonexistent/command"),
        "{}",
        got.stderr
    );
}

#[test]
fn echo_answers_with_the_body_over_unix_sockets_too() {
    let socks = TempDir::new("sock");
    let sock = socks.path().join("node.sock");
    let sock = sock.to_str().unwrap();
    let (_node, addr) = node(&["--listen-unix", sock]);
    let _svc = serve(&["ping", "--join-unix", sock, "--echo"]);
    let got = run(
        &["post", "ping", "pong", "--join-unix", sock, "-o", "raw"],
        b"",
    );
    assert_eq!(
        (got.code, got.stdout.as_slice()),
        (Some(0), &b"pong"[..]),
        "{}",
        got.stderr
    );
    // An empty body is one empty frame.
    let got = run(&["post", "ping", "--join", &addr, "-o", "hex"], b"");
    let text = got.stdout_text();
    assert!(
        text.contains("frame 0 0\n") && text.contains("frames=1 bytes=0"),
        "{text}"
    );
}

/// Whether the process `pid` is gone (or a zombie nobody reaped yet).
fn gone(pid: &str) -> bool {
    match std::fs::read_to_string(Path::new("/proc").join(pid).join("stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z')),
    }
}

/// Serves `script` (which prints a pid, then waits), posts to it, and checks that
/// the process with that pid is killed when the client leaves.
fn leaving_kills(script: &str) {
    let (_node, addr) = node(&[]);
    let _svc = serve(&["slow", "--join", &addr, "--exec", "sh", "-c", script]);
    let mut post = Proc::spawn(&["post", "slow", "--join", &addr, "-q"]);
    post.wait_line("source 0");
    let pid = post.wait_line("");
    assert!(pid.parse::<u32>().is_ok(), "{pid}");
    assert!(!gone(&pid), "{pid} runs while the client waits");
    // The client leaves: its request is cancelled, the command's group killed.
    post.signal("KILL");
    eventually("the process is killed", || gone(&pid));
}

#[test]
fn a_client_that_leaves_kills_the_command() {
    leaving_kills("echo $$; exec sleep 300");
}

#[test]
fn a_client_that_leaves_kills_what_the_command_started_too() {
    // The shell starts a grandchild, says its pid, and waits for it.
    leaving_kills("sleep 300 & echo $!; wait");
}

#[test]
fn a_reader_that_leaves_early_is_no_error() {
    use std::io::Read;
    let (_node, addr) = node(&[]);
    let (_dir, _svc) = serve_files(&addr);
    let mut post = std::process::Command::new(support::BIN)
        .args(["post", "files", "--join", &addr, "-o", "raw"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 10];
    post.stdout.take().unwrap().read_exact(&mut first).unwrap(); // then the pipe closes
    let mut guard = Proc::adopt(post);
    let status = guard.wait_exit(support::BOUND);
    assert_eq!(status.code(), Some(0), "stderr: {}", guard.stderr());
    assert!(
        !guard.stderr().contains("cannot write"),
        "{}",
        guard.stderr()
    );
}
