//! Running `chanserv` as child processes, bounded in time: every wait has a deadline,
//! and a child is killed when its guard drops (a failed assertion included).

#![allow(dead_code)] // each test file uses its own part of this module

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_chanserv");
/// Longest wait for any one event (a line, an exit): generous for a loaded 2-core CI
/// machine, and still a bound.
pub const BOUND: Duration = Duration::from_secs(30);

/// A long-running child (`node`, `serve`, a `post` in flight): its stdout as lines,
/// its stderr kept. Killed and reaped on drop.
pub struct Proc {
    child: Child,
    lines: Receiver<String>,
    /// Every stdout line taken so far.
    pub seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        let child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn chanserv");
        Proc::adopt(child)
    }

    /// Guards a child spawned elsewhere: its stdout (if still piped) as lines, its
    /// stderr (if piped) kept.
    pub fn adopt(mut child: Child) -> Proc {
        let (tx, lines) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { return };
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(err) = child.stderr.take() {
            let keep = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    let mut s = keep.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        Proc {
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the next stdout line that starts with `prefix`; returns the rest.
    pub fn wait_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + BOUND;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.trim_start().to_owned();
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no line {prefix:?} within {BOUND:?}; saw {:?}; stderr {:?}",
                        self.seen,
                        self.stderr()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "exited before a line {prefix:?}; saw {:?}; stderr {:?}",
                        self.seen,
                        self.stderr()
                    )
                }
            }
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args(["-s", sig, &self.pid().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -s {sig} failed");
    }

    /// Waits for the child to exit, at most `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(Instant::now() < deadline, "still running after {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Exited already is fine.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `chanserv node --listen 127.0.0.1:0` (plus `extra` flags), ready; its address.
pub fn node(extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["node", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let mut p = Proc::spawn(&args);
    let addr = p.wait_line("listen ");
    p.wait_line("ready");
    (p, addr)
}

/// A `chanserv serve <args>`, ready.
pub fn serve(args: &[&str]) -> Proc {
    let mut all = vec!["serve"];
    all.extend_from_slice(args);
    let mut p = Proc::spawn(&all);
    p.wait_line("ready");
    p
}

/// `chanserv serve files --dir <a new directory holding files> --chunk 4KiB --join
/// <addr> <extra>`, ready; the directory lives as long as the returned guard.
pub fn serve_files(addr: &str, files: &[(&str, Vec<u8>)], extra: &[&str]) -> (TempDir, Proc) {
    let dir = TempDir::new("pub");
    for (name, data) in files {
        std::fs::write(dir.path().join(name), data).unwrap();
    }
    let mut args = vec![
        "files",
        "--dir",
        dir.str(),
        "--chunk",
        "4KiB",
        "--join",
        addr,
    ];
    args.extend_from_slice(extra);
    let p = serve(&args);
    (dir, p)
}

/// What a finished `chanserv` run gave.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Output {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr.lines().collect()
    }
}

/// Runs `chanserv <args>` to its end (killed after [`BOUND`]), with `stdin`.
pub fn run(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chanserv");
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    // A command that does not read its stdin closes it: that is fine.
    std::thread::spawn(move || drop(input.write_all(&stdin)));
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + BOUND;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chanserv {args:?} still running after {BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: String::from_utf8_lossy(&err.join().unwrap()).into_owned(),
    }
}

fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("chanserv-cli-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn str(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits until `f` holds, at most [`BOUND`].
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + BOUND;
    while !f() {
        assert!(Instant::now() < deadline, "not within {BOUND:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
