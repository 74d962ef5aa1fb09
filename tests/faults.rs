//! Faults on a link, in process and deterministic (issue 9, DESIGN.md "Under faults").
//!
//! Two nodes linked with `Node::attach` over [`faulty::faulty_pair`], a `Server` on
//! one ("server", end A) and a `Client` on the other ("client", end B), time paused.
//! Each scenario breaks the link mid-request and checks the promises: every `Source`
//! and the `Sources` the client holds end with `Some(Err(e))`, `e.is_closed()`, then
//! `None`, within the keep-alive timeout plus the close deadline of the fault; the
//! server drops every producer within the same bound; a source that completed before
//! the fault still ends with `None` and all its frames.
//!
//! Failures are collected and reported together: HANG (nothing by the deadline),
//! WRONG ERROR, LATE, or COMPLETED (a failure read as a completion).

#[path = "support/faulty.rs"]
mod faulty;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::io::ErrorKind;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chanserv::{Client, Error, Node, NodeConfig, Request, ServeHandle, Server, Source, Sources};
use faulty::{faulty_pair, faulty_pair_with_capacity, Dir, Faults};
use futures::future::join_all;
use futures::stream::{self, BoxStream, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at, Instant};

const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(4);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
const SLACK: Duration = Duration::from_secs(1);
/// A silent link: everything on it has failed this long after the fault.
const DEAD_BY: Duration = KEEPALIVE_TIMEOUT.saturating_add(CLOSE_TIMEOUT.saturating_add(SLACK));
/// A link whose socket fails, or a local shutdown: no keep-alive to wait for, only
/// the close deadline.
const PROMPTLY: Duration = CLOSE_TIMEOUT.saturating_add(Duration::from_millis(500));
/// Virtual-time limit of a whole test, so a hang fails instead of hanging CI.
const TEST_LIMIT: Duration = Duration::from_secs(300);
const DONE_FRAMES: usize = 5;

async fn bounded(body: impl Future<Output = ()>) {
    timeout(TEST_LIMIT, body)
        .await
        .expect("the test hung past its time limit");
}

/// Under paused time the clock only moves when every task is idle: once this returns,
/// everything in flight was delivered and read by the receiving node's driver.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

// ------------------------------------------------------------------ the transport

fn kind<T>(r: std::io::Result<T>) -> ErrorKind {
    r.err().expect("an error").kind()
}

async fn read_n(r: &mut (impl AsyncRead + Unpin), n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    r.read_exact(&mut buf).await.unwrap();
    buf
}

/// True when `f` is still pending after a minute (of paused time: no wait).
async fn parks<F: Future>(f: F) -> bool {
    timeout(Duration::from_secs(60), f).await.is_err()
}

#[tokio::test(start_paused = true)]
async fn transport_is_an_ordered_pipe_that_closes_like_a_socket() {
    bounded(async {
        let (mut a, mut b, _faults) = faulty_pair();
        a.write_all(b"hello ").await.unwrap();
        a.write_all(b"world").await.unwrap();
        a.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello world", "in order, then EOF after shutdown");
        assert_eq!(kind(a.write_all(b"x").await), ErrorKind::BrokenPipe);
        b.write_all(b"back").await.unwrap();
        drop(b);
        let mut rest = Vec::new();
        a.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"back", "a dropped end: what it wrote, then EOF");
        let (mut a, b, _faults) = faulty_pair();
        drop(b);
        assert_eq!(kind(a.write_all(b"x").await), ErrorKind::BrokenPipe);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn transport_freeze_holds_bytes_and_parks_writers_until_thaw() {
    bounded(async {
        let (mut a, mut b, faults) = faulty_pair_with_capacity(8);
        a.write_all(b"1234").await.unwrap();
        faults.freeze(Dir::AToB);
        a.write_all(b"5678").await.unwrap();
        // No byte (not even one written before the freeze), no EOF, no error.
        assert!(parks(b.read(&mut [0u8; 16])).await, "frozen: silence");
        b.write_all(b"pong").await.unwrap();
        assert_eq!(read_n(&mut a, 4).await, b"pong", "the other way flows");
        let mut writer = tokio::spawn(async move {
            a.write_all(b"9").await.unwrap();
            Instant::now()
        });
        assert!(
            parks(&mut writer).await,
            "a full direction parks its writer"
        );
        let thawed = Instant::now();
        faults.thaw(Dir::AToB);
        assert_eq!(read_n(&mut b, 9).await, b"123456789");
        assert_eq!(writer.await.unwrap(), thawed, "the writer resumes at once");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn transport_cut_resets_both_ends_and_wakes_parked_operations() {
    bounded(async {
        let (a, mut b, faults) = faulty_pair_with_capacity(4);
        let (mut ar, mut aw) = tokio::io::split(a);
        let mut reader = tokio::spawn(async move { ar.read(&mut [0u8; 8]).await.map(drop) });
        let mut writer = tokio::spawn(async move { aw.write_all(b"more than four").await });
        let either = async {
            tokio::select! { _ = &mut reader => {}, _ = &mut writer => {} }
        };
        assert!(parks(either).await, "both parked");
        let at = Instant::now();
        faults.cut();
        assert_eq!(kind(reader.await.unwrap()), ErrorKind::ConnectionReset);
        assert_eq!(kind(writer.await.unwrap()), ErrorKind::ConnectionReset);
        assert_eq!(
            at.elapsed(),
            Duration::ZERO,
            "parked operations woken at once"
        );
        assert_eq!(
            kind(b.read(&mut [0u8; 8]).await),
            ErrorKind::ConnectionReset
        );
        assert_eq!(kind(b.write_all(b"x").await), ErrorKind::ConnectionReset);
        assert_eq!(kind(b.flush().await), ErrorKind::ConnectionReset);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn transport_half_close_is_eof_for_the_reader_and_an_error_for_the_writer() {
    bounded(async {
        let (mut a, mut b, faults) = faulty_pair();
        faults.freeze(Dir::AToB);
        a.write_all(b"in flight").await.unwrap();
        let mut reader = tokio::spawn(async move { (b.read(&mut [0u8; 16]).await.unwrap(), b) });
        assert!(parks(&mut reader).await);
        faults.half_close(Dir::AToB);
        let (n, mut b) = reader.await.unwrap();
        assert_eq!(n, 0, "a parked reader sees EOF; bytes in flight are lost");
        assert_eq!(kind(a.write_all(b"x").await), ErrorKind::BrokenPipe);
        b.write_all(b"still").await.unwrap();
        assert_eq!(
            read_n(&mut a, 5).await,
            b"still",
            "the other way is untouched"
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn transport_delay_delivers_each_chunk_late_and_in_order() {
    bounded(async {
        let (mut a, mut b, faults) = faulty_pair();
        let t0 = Instant::now();
        faults.delay(Dir::AToB, Duration::from_secs(3));
        a.write_all(b"one").await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        a.write_all(b"two").await.unwrap();
        faults.delay(Dir::AToB, Duration::ZERO);
        a.write_all(b"three").await.unwrap();
        b.write_all(b"fast").await.unwrap();
        assert_eq!(read_n(&mut a, 4).await, b"fast");
        assert_eq!(
            t0.elapsed(),
            Duration::from_secs(1),
            "the other way: no delay"
        );
        assert_eq!(read_n(&mut b, 3).await, b"one");
        assert_eq!(t0.elapsed(), Duration::from_secs(3));
        assert_eq!(read_n(&mut b, 8).await, b"twothree", "nothing overtakes");
        assert_eq!(t0.elapsed(), Duration::from_secs(4));
    })
    .await;
}

// The rig (nodes, live producers, helpers) is shared text, kept apart so this file
// holds the scenarios: `include!` keeps it in this module, private items and all.
include!("support/fault_rig.rs");

// ------------------------------------------------------------------ scenarios

/// The rig itself: a healthy link completes a whole answer.
#[tokio::test(start_paused = true)]
async fn healthy_link_completes_every_source() {
    bounded(async {
        let rig = rig().await;
        let (mut sources, mut got) = post(&rig, "completed", None).await;
        assert!(sources.next().await.is_none());
        drop(got.remove("idle"));
        let done = drain(got.remove("done").unwrap(), None).await;
        assert!(completed(&done, &done_frames()), "{done:?}");
        rig.live.all_dropped().await; // "idle" dropped with its Source
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn frozen_link_fails_every_stream_and_drops_every_producer() {
    fault_mid_stream("frozen both ways", |f| f.freeze(Dir::Both), DEAD_BY).await;
}

#[tokio::test(start_paused = true)]
async fn frozen_server_to_client_fails_every_stream_and_drops_every_producer() {
    fault_mid_stream("frozen server->client", |f| f.freeze(Dir::AToB), DEAD_BY).await;
}

#[tokio::test(start_paused = true)]
async fn frozen_client_to_server_fails_every_stream_and_drops_every_producer() {
    fault_mid_stream("frozen client->server", |f| f.freeze(Dir::BToA), DEAD_BY).await;
}

#[tokio::test(start_paused = true)]
async fn cut_link_fails_every_stream_promptly() {
    fault_mid_stream("cut", Faults::cut, PROMPTLY).await;
}

#[tokio::test(start_paused = true)]
async fn half_closed_server_to_client_fails_every_stream() {
    let half_close = |f: &Faults| f.half_close(Dir::AToB);
    fault_mid_stream("half-closed server->client", half_close, DEAD_BY).await;
}

#[tokio::test(start_paused = true)]
async fn half_closed_client_to_server_fails_every_stream() {
    let half_close = |f: &Faults| f.half_close(Dir::BToA);
    fault_mid_stream("half-closed client->server", half_close, DEAD_BY).await;
}

/// `Node::shutdown` on the client's node with consumers parked in `Source::next` and
/// `Sources::next`: they fail (not pending forever), and shutdown itself returns.
#[tokio::test(start_paused = true)]
async fn client_node_shutdown_fails_parked_consumers() {
    bounded(async {
        let rig = rig().await;
        let in_flight = start(&rig).await;
        let t0 = Instant::now();
        let shutdown = async {
            let r = timeout_at(t0 + PROMPTLY, rig.client_node.shutdown()).await;
            r.is_err()
                .then(|| format!("Node::shutdown: HANG, not returned by +{PROMPTLY:?}"))
        };
        let (hung, mut problems) = tokio::join!(shutdown, failures(&rig, in_flight, t0, PROMPTLY));
        problems.push(hung);
        assert_none("client node shutdown", problems);
    })
    .await;
}

/// A source that completed before the link died (its frames and its end delivered,
/// not yet read) is still a completion: all its frames, then `None`. So is an inline
/// source, and the `Sources` that ended before.
async fn completion_survives(scenario: &str, fault: impl FnOnce(&Faults), bound: Duration) {
    bounded(async {
        let rig = rig().await;
        let (mut sources, mut got) = post(&rig, "completed", None).await;
        let mut idle = got.remove("idle").unwrap();
        assert_eq!(idle.next().await.unwrap().unwrap(), "one");
        let idle = spawn_parked(drain(idle, None)).await;
        settle().await;
        let t0 = Instant::now();
        fault(&rig.faults);
        // The idle source failing says the link was found dead.
        let deadline = t0 + bound;
        let idle = outcome(idle, deadline).await;
        let mut problems = vec![check_failed("idle", idle, t0, deadline)];
        for (name, want) in [("done", done_frames()), ("inline", vec![TINY])] {
            let h = tokio::spawn(drain(got.remove(name).unwrap(), None));
            let o = outcome(h, Instant::now() + PROMPTLY).await;
            if !o.as_ref().is_some_and(|o| completed(o, &want)) {
                let o = o.map(|o| (o.frames.len(), o.error));
                problems.push(Some(format!(
                    "{name}: completed before the fault, yet (frames, error) = {o:?} (None: HANG)"
                )));
            }
        }
        if sources.next().await.is_some() {
            problems.push(Some("Sources: an item after its end".into()));
        }
        assert_none(scenario, problems);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn completion_before_a_cut_stays_completion() {
    completion_survives("completed, then cut", Faults::cut, PROMPTLY).await;
}

#[tokio::test(start_paused = true)]
async fn completion_before_a_freeze_stays_completion() {
    let freeze = |f: &Faults| f.freeze(Dir::Both);
    completion_survives("completed, then frozen", freeze, DEAD_BY).await;
}
