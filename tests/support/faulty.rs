//! A deterministic, in-process, fault-injecting byte stream for tests.
//!
//! [`faulty_pair`] returns two connected ends, A and B (tokio `AsyncRead + AsyncWrite`,
//! usable with `Node::attach`), and a [`Faults`] handle that breaks the link between
//! them on demand, per direction:
//!
//! | fault | the reader of that direction | the writer of that direction |
//! |---|---|---|
//! | [`Faults::freeze`] | nothing arrives (no error, no EOF) until [`Faults::thaw`] | writes are accepted up to the pipe's capacity, then park |
//! | [`Faults::delay`] | each chunk arrives `d` after it was written | unchanged |
//! | [`Faults::half_close`] | EOF at once (bytes in flight are lost) | writes fail (`BrokenPipe`) |
//! | [`Faults::cut`] (both directions) | `ConnectionReset` | `ConnectionReset` |
//!
//! Every fault wakes the operations it affects, so a parked read or write sees it at
//! once. Nothing here spawns a task or sleeps: the state is one `Mutex` shared by both
//! ends and the handle, plus wakers, and delays use `tokio::time`, so the pair works
//! (and is deterministic) under `tokio::time::pause`.
//!
//! Without faults it behaves like a socket pair: bytes arrive in order, each once;
//! `shutdown` of one end is an EOF at the other after the bytes before it; dropping
//! an end is an EOF at the other and makes the other's writes fail (`BrokenPipe`).

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Default bytes a direction holds written but not yet read (the "socket buffers").
pub const DEFAULT_CAPACITY: usize = 256 * 1024;

/// Which direction(s) of the pair a fault applies to. A is the first end returned by
/// [`faulty_pair`], B the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Bytes written on A, read on B.
    AToB,
    /// Bytes written on B, read on A.
    BToA,
    /// Both directions.
    Both,
}

impl Dir {
    fn pipes(self) -> &'static [usize] {
        match self {
            Dir::AToB => &[0],
            Dir::BToA => &[1],
            Dir::Both => &[0, 1],
        }
    }
}

/// One direction: what was written and not yet read, and its faults.
struct Pipe {
    /// Written chunks with the instant each may be delivered, in write order.
    chunks: VecDeque<(Instant, Bytes)>,
    /// Bytes in `chunks`.
    queued: usize,
    capacity: usize,
    frozen: bool,
    delay: Duration,
    /// The writer shut down (or dropped) its end: EOF after `chunks`.
    fin: bool,
    /// Fault: the reader sees EOF now, the writer's writes fail.
    half_closed: bool,
    /// The reading end was dropped: writes fail.
    reader_gone: bool,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

impl Pipe {
    fn new(capacity: usize) -> Self {
        Pipe {
            chunks: VecDeque::new(),
            queued: 0,
            capacity,
            frozen: false,
            delay: Duration::ZERO,
            fin: false,
            half_closed: false,
            reader_gone: false,
            read_waker: None,
            write_waker: None,
        }
    }

    fn take_wakers(&mut self, out: &mut Vec<Waker>) {
        out.extend(self.read_waker.take());
        out.extend(self.write_waker.take());
    }
}

struct State {
    /// `pipes[0]`: A → B, `pipes[1]`: B → A.
    pipes: [Pipe; 2],
    cut: bool,
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    // A test that panicked while holding the lock must not hide its own message
    // behind a poison error in another task.
    s.lock().unwrap_or_else(|p| p.into_inner())
}

fn wake_all(wakers: Vec<Waker>) {
    for w in wakers {
        w.wake();
    }
}

/// Two connected ends and the handle that injects faults between them, with
/// [`DEFAULT_CAPACITY`] bytes of buffering per direction.
pub fn faulty_pair() -> (FaultyIo, FaultyIo, Faults) {
    faulty_pair_with_capacity(DEFAULT_CAPACITY)
}

/// Like [`faulty_pair`], with `capacity` bytes of buffering per direction: a writer
/// parks once that many bytes are written and not yet read.
///
/// # Panics
/// If `capacity` is 0.
pub fn faulty_pair_with_capacity(capacity: usize) -> (FaultyIo, FaultyIo, Faults) {
    assert!(capacity > 0, "capacity must be positive");
    let shared = Arc::new(Mutex::new(State {
        pipes: [Pipe::new(capacity), Pipe::new(capacity)],
        cut: false,
    }));
    let end = |side| FaultyIo {
        shared: shared.clone(),
        side,
        timer: None,
    };
    (end(0), end(1), Faults { shared })
}

/// The control handle of a pair: cloneable, usable from any task, at any time (also
/// after both ends are gone).
#[derive(Clone)]
pub struct Faults {
    shared: Shared,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = lock(&self.shared);
        f.debug_struct("Faults")
            .field("cut", &st.cut)
            .field("frozen", &[st.pipes[0].frozen, st.pipes[1].frozen])
            .field("queued", &[st.pipes[0].queued, st.pipes[1].queued])
            .finish()
    }
}

impl Faults {
    fn update(&self, dir: Dir, f: impl Fn(&mut Pipe)) {
        let mut wakers = Vec::new();
        {
            let mut st = lock(&self.shared);
            for &i in dir.pipes() {
                f(&mut st.pipes[i]);
                st.pipes[i].take_wakers(&mut wakers);
            }
        }
        wake_all(wakers);
    }

    /// Silence: from now on nothing written in `dir` reaches its reader, not even
    /// bytes written before the freeze and not yet read. Writes are still accepted
    /// until the direction holds its capacity, then they park. No error, no EOF: a
    /// peer stopped with SIGSTOP, or a route that drops packets.
    pub fn freeze(&self, dir: Dir) {
        self.update(dir, |p| p.frozen = true);
    }

    /// Ends a [`freeze`](Self::freeze): what was held is delivered, in order.
    pub fn thaw(&self, dir: Dir) {
        self.update(dir, |p| p.frozen = false);
    }

    /// Both ends see `ConnectionReset` on every read, write, flush and shutdown from
    /// now on, parked ones included; bytes in flight are lost. A reset connection.
    pub fn cut(&self) {
        let mut wakers = Vec::new();
        {
            let mut st = lock(&self.shared);
            st.cut = true;
            for p in &mut st.pipes {
                p.chunks.clear();
                p.queued = 0;
                p.take_wakers(&mut wakers);
            }
        }
        wake_all(wakers);
    }

    /// The reader of `dir` sees EOF at once (bytes in flight are lost), and its
    /// writer's writes fail with `BrokenPipe`. The other direction is untouched.
    pub fn half_close(&self, dir: Dir) {
        self.update(dir, |p| {
            p.half_closed = true;
            p.chunks.clear();
            p.queued = 0;
        });
    }

    /// Each chunk written in `dir` from now on is delivered `d` after it was written
    /// (in order: a chunk never overtakes an earlier one). `Duration::ZERO` ends the
    /// delay for later writes. Measured with `tokio::time`, so paused time applies.
    pub fn delay(&self, dir: Dir, d: Duration) {
        self.update(dir, |p| p.delay = d);
    }
}

/// One end of a [`faulty_pair`]. Dropping it closes that end: the peer reads EOF
/// after what was already written, and the peer's writes fail.
pub struct FaultyIo {
    shared: Shared,
    /// 0 for A (writes pipe 0, reads pipe 1), 1 for B.
    side: usize,
    /// Wakes a reader whose next chunk is delayed.
    timer: Option<Pin<Box<Sleep>>>,
}

impl std::fmt::Debug for FaultyIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.side == 0 {
            "FaultyIo(A)"
        } else {
            "FaultyIo(B)"
        })
    }
}

fn reset() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "faulty link: cut")
}

fn broken_pipe(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, format!("faulty link: {why}"))
}

impl FaultyIo {
    fn out_pipe(&self) -> usize {
        self.side
    }
    fn in_pipe(&self) -> usize {
        1 - self.side
    }
}

impl AsyncRead for FaultyIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let deadline = {
                let mut st = lock(&this.shared);
                if st.cut {
                    return Poll::Ready(Err(reset()));
                }
                let p = &mut st.pipes[this.in_pipe()];
                if p.half_closed || buf.remaining() == 0 {
                    return Poll::Ready(Ok(()));
                }
                p.read_waker = Some(cx.waker().clone());
                if p.frozen {
                    return Poll::Pending;
                }
                match p.chunks.front_mut() {
                    None if p.fin => return Poll::Ready(Ok(())),
                    None => return Poll::Pending,
                    Some((at, _)) if *at > Instant::now() => *at,
                    Some((_, chunk)) => {
                        let n = chunk.len().min(buf.remaining());
                        buf.put_slice(&chunk[..n]);
                        chunk.advance(n);
                        if chunk.is_empty() {
                            p.chunks.pop_front();
                        }
                        p.queued -= n;
                        p.read_waker = None;
                        let writer = p.write_waker.take();
                        drop(st);
                        this.timer = None;
                        if let Some(w) = writer {
                            w.wake();
                        }
                        return Poll::Ready(Ok(()));
                    }
                }
            };
            // The next chunk is delayed: wait for its time (or for a fault, which
            // wakes the waker registered above).
            match &mut this.timer {
                Some(t) if t.deadline() == deadline => {}
                Some(t) => t.as_mut().reset(deadline),
                None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            let timer = this.timer.as_mut().expect("set above");
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.timer = None;
        }
    }
}

impl AsyncWrite for FaultyIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let out = self.out_pipe();
        let mut st = lock(&self.shared);
        if st.cut {
            return Poll::Ready(Err(reset()));
        }
        let p = &mut st.pipes[out];
        if p.half_closed {
            return Poll::Ready(Err(broken_pipe("half-closed")));
        }
        if p.reader_gone {
            return Poll::Ready(Err(broken_pipe("peer closed")));
        }
        if p.fin {
            return Poll::Ready(Err(broken_pipe("write after shutdown")));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let room = p.capacity - p.queued;
        if room == 0 {
            p.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = room.min(buf.len());
        let at = Instant::now() + p.delay;
        p.chunks.push_back((at, Bytes::copy_from_slice(&buf[..n])));
        p.queued += n;
        let reader = if p.frozen { None } else { p.read_waker.take() };
        drop(st);
        if let Some(w) = reader {
            w.wake();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if lock(&self.shared).cut {
            return Poll::Ready(Err(reset()));
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let out = self.out_pipe();
        let mut st = lock(&self.shared);
        if st.cut {
            return Poll::Ready(Err(reset()));
        }
        let p = &mut st.pipes[out];
        p.fin = true;
        let reader = p.read_waker.take();
        drop(st);
        if let Some(w) = reader {
            w.wake();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for FaultyIo {
    fn drop(&mut self) {
        let mut wakers = Vec::new();
        {
            let (out, inp) = (self.out_pipe(), self.in_pipe());
            let mut st = lock(&self.shared);
            st.pipes[out].fin = true;
            st.pipes[out].take_wakers(&mut wakers);
            st.pipes[inp].reader_gone = true;
            st.pipes[inp].chunks.clear();
            st.pipes[inp].queued = 0;
            st.pipes[inp].take_wakers(&mut wakers);
        }
        wake_all(wakers);
    }
}
