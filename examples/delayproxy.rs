//! A TCP proxy that delays every byte by a fixed time in each direction without
//! limiting throughput: a WAN's latency without its bandwidth cap, for
//! `scripts/wan.sh` on a kernel without netem.
//!
//! ```sh
//! cargo run --release --example delayproxy -- --listen 127.0.0.1:7100 --to 10.0.0.1:7000 --delay-ms 10
//! ```
//!
//! Each accepted connection gets its own connection to `--to`. Per direction, a reader
//! task reads whatever has arrived (up to 256 KiB at a time), stamps the chunk with the
//! time it was read and queues it; a writer task waits until that time plus the delay
//! and writes it. The queue is not bounded in chunks: it holds what arrives within one
//! delay (bandwidth × delay: 20 MiB at 2 GiB/s and 10 ms), so the proxy adds latency
//! and does not cap throughput. Only a receiver slower than the sender makes the queue
//! grow further: the reader then waits once 64 MiB (`--max-queue-mib`) are queued in
//! that direction, so the proxy never holds a whole transfer in memory (64 MiB per
//! 10 ms would cap at 6.4 GiB/s, beyond what the path carries here). A FIN is forwarded
//! after the last byte, delayed like the bytes. The delay is at least `--delay-ms` and
//! at most about 1 ms more (tokio's timer ticks in milliseconds).
//!
//! What it does not model: the proxy ends TCP on both sides, so each TCP connection
//! (client to proxy, proxy to server) sees the short path's round-trip time, not the
//! delay. Window-based flow control above TCP (yamux's, chanserv's) sees the full
//! delay, since its window updates cross the proxy too; plain TCP through the proxy is
//! only bounded by the proxy's buffering, so it is the path's ceiling, not what one
//! TCP connection over a real 20 ms link would do (there, its own windows apply).
//!
//! It prints `ready <listen address>` on stdout once it accepts connections, and on
//! stderr, per connection and direction, the bytes and chunks carried, how late the
//! chunks went out beyond the delay (mean and max) and the most bytes queued at once.

use std::io;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The most one read takes from the socket.
const CHUNK: usize = 256 * 1024;

struct Args {
    listen: String,
    to: String,
    delay: Duration,
    max_queue: usize,
}

const USAGE: &str =
    "usage: delayproxy --listen ADDR --to ADDR --delay-ms N [--max-queue-mib M (64)]";

fn parse_args() -> Result<Args, String> {
    let (mut listen, mut to, mut delay, mut max_queue) = (None, None, None, 64 * 1024 * 1024);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value; {USAGE}"))?;
        match flag.as_str() {
            "--listen" => listen = Some(value),
            "--to" => to = Some(value),
            "--delay-ms" => {
                let ms: u64 = value
                    .parse()
                    .map_err(|_| format!("--delay-ms needs a number; {USAGE}"))?;
                delay = Some(Duration::from_millis(ms));
            }
            "--max-queue-mib" => {
                max_queue = value
                    .parse::<usize>()
                    .ok()
                    .filter(|m| (1..=4096).contains(m))
                    .ok_or_else(|| format!("--max-queue-mib needs 1..=4096; {USAGE}"))?
                    << 20;
            }
            _ => return Err(format!("unknown argument {flag}; {USAGE}")),
        }
    }
    match (listen, to, delay) {
        (Some(listen), Some(to), Some(delay)) => Ok(Args {
            listen,
            to,
            delay,
            max_queue,
        }),
        _ => Err(USAGE.into()),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("delayproxy: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(a) => println!("ready {a}"),
        Err(e) => eprintln!("delayproxy: local address: {e}"),
    }
    loop {
        match listener.accept().await {
            Ok((down, peer)) => {
                let (to, delay, cap) = (args.to.clone(), args.delay, args.max_queue);
                tokio::spawn(async move {
                    if let Err(e) = proxy(down, &to, delay, cap).await {
                        eprintln!("delayproxy: {peer} -> {to}: {e}");
                    }
                });
            }
            // Out of file descriptors and the like: the next accept may succeed.
            Err(e) => eprintln!("delayproxy: accept: {e}"),
        }
    }
}

/// What one direction of one connection carried, and how late its chunks went out.
#[derive(Debug, Default)]
struct Tally {
    bytes: u64,
    chunks: u64,
    /// Sum and maximum of how long after its due time each chunk began to be written.
    late_sum: Duration,
    late_max: Duration,
    /// The most bytes queued at once.
    queued_max: usize,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        write!(
            f,
            "bytes={} chunks={} late_mean_ms={:.3} late_max_ms={:.3} queued_max_mib={:.1}",
            self.bytes,
            self.chunks,
            ms(self.late_sum) / self.chunks.max(1) as f64,
            ms(self.late_max),
            self.queued_max as f64 / (1 << 20) as f64
        )
    }
}

/// Joins `down` to a fresh connection to `to`, each direction delayed by `delay` and
/// queueing at most `cap` bytes. Prints a line per direction on stderr at the end.
async fn proxy(down: TcpStream, to: &str, delay: Duration, cap: usize) -> io::Result<()> {
    let up = TcpStream::connect(to).await?;
    // The proxy writes each chunk when it is due: Nagle would hold small ones back.
    down.set_nodelay(true)?;
    up.set_nodelay(true)?;
    let peer = down.peer_addr()?;
    let (down_r, down_w) = down.into_split();
    let (up_r, up_w) = up.into_split();
    let there = tokio::spawn(pipe(down_r, up_w, delay, cap));
    let back = tokio::spawn(pipe(up_r, down_w, delay, cap));
    let (there, back) = tokio::join!(there, back);
    let (there, back) = (
        there.map_err(io::Error::other)??,
        back.map_err(io::Error::other)??,
    );
    eprintln!("conn {peer} to_server {there}");
    eprintln!("conn {peer} to_client {back}");
    Ok(())
}

/// One direction: a reader task stamps and queues chunks, this task writes each when
/// it is due. The reader's end (EOF or error) ends the queue; the writer then writes
/// what is queued and shuts its side. A failed writer drops the queue, which stops the
/// reader at its next chunk. Each queued chunk holds permits for its bytes out of
/// `cap` until it is written.
async fn pipe(
    mut r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    delay: Duration,
    cap: usize,
) -> io::Result<Tally> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Bytes, OwnedSemaphorePermit)>();
    let room = Arc::new(Semaphore::new(cap));
    let queued = Arc::clone(&room);
    let reader = tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(CHUNK);
        loop {
            buf.reserve(CHUNK);
            let n = r.read_buf(&mut (&mut buf).limit(CHUNK)).await?;
            if n == 0 {
                return Ok::<_, io::Error>(());
            }
            let read_at = Instant::now();
            // n <= CHUNK <= cap: fits a u32 and can always be granted.
            let permit = Arc::clone(&room)
                .acquire_many_owned(n as u32)
                .await
                .map_err(io::Error::other)?;
            if tx.send((read_at, buf.split().freeze(), permit)).is_err() {
                return Ok(()); // the writer failed and reports it
            }
            // The send woke the writer into this worker's LIFO slot, which no other
            // worker may steal: without a yield it would wait for this loop to use up
            // its cooperative budget (128 reads, megabytes), and go out late.
            tokio::task::yield_now().await;
        }
    });
    let mut t = Tally::default();
    while let Some((read_at, chunk, permit)) = rx.recv().await {
        t.queued_max = t.queued_max.max(cap - queued.available_permits());
        let due = read_at + delay;
        // A chunk already due goes out at once, not at the timer's next tick.
        if Instant::now() < due {
            tokio::time::sleep_until(due).await;
        }
        let late = Instant::now().saturating_duration_since(due);
        t.late_sum += late;
        t.late_max = t.late_max.max(late);
        t.chunks += 1;
        t.bytes += chunk.len() as u64;
        w.write_all(&chunk).await?;
        drop(permit);
    }
    w.shutdown().await?;
    reader.await.map_err(io::Error::other)??;
    Ok(t)
}
