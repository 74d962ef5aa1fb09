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

// ------------------------------------------------------------------ the rig

fn node_config() -> NodeConfig {
    NodeConfig::default()
        .keepalive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
        .close_timeout(CLOSE_TIMEOUT)
}

/// The server's producers that are alive, by name: each holds an [`Alive`] guard.
#[derive(Clone)]
struct Live(Arc<watch::Sender<BTreeSet<&'static str>>>);

struct Alive(Live, &'static str);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0 .0.send_modify(|s| {
            s.remove(self.1);
        });
    }
}

impl Live {
    fn guard(&self, name: &'static str) -> Alive {
        self.0
            .send_modify(|s| assert!(s.insert(name), "one {name} at a time"));
        Alive(self.clone(), name)
    }
    async fn all_dropped(&self) {
        let mut rx = self.0.subscribe();
        rx.wait_for(|s| s.is_empty()).await.expect("sender kept");
    }
}

/// `stream` with `alive` dropped when the stream is.
fn owning<T>(alive: Alive, s: impl Stream<Item = T>) -> impl Stream<Item = T> {
    s.map(move |x| {
        let _ = &alive;
        x
    })
}

static KIB: [u8; 1024] = [b'b'; 1024];

/// Writes 1 KiB frames forever, as fast as it may.
fn busy(live: &Live, name: &'static str) -> Source {
    let frames = stream::repeat(Bytes::from_static(&KIB));
    Source::new(name, owning(live.guard(name), frames))
}

/// Sends one frame, then never yields again.
fn idle(live: &Live, name: &'static str) -> Source {
    let frames = stream::once(async { Bytes::from_static(b"one") }).chain(stream::pending());
    Source::new(name, owning(live.guard(name), frames))
}

fn done_frames() -> Vec<Bytes> {
    (0..DONE_FRAMES)
        .map(|i| vec![i as u8; 1000].into())
        .collect()
}

/// Completes after `DONE_FRAMES` frames. Not ready when announced, so it is not sent
/// inline: its frames and its end travel on a child stream.
fn done() -> Source {
    let later = stream::once(tokio::task::yield_now());
    Source::new("done", later.flat_map(|()| stream::iter(done_frames())))
}

const TINY: Bytes = Bytes::from_static(b"tiny");

/// Small and complete when announced: inline on the master stream.
fn inline() -> Source {
    Source::new("inline", stream::iter([TINY]))
}

/// Body `"mixed"`: completed, busy and idle sources, then more to come (never: the
/// `Sources` stays in flight). Otherwise a completed answer plus one idle source.
fn service(live: Live) -> impl Fn(Request) -> BoxStream<'static, Source> + Send + Sync + 'static {
    move |req| match &req.body[..] {
        b"mixed" => {
            let sources = vec![
                done(),
                inline(),
                busy(&live, "busy-read"),
                busy(&live, "busy-held"),
                idle(&live, "idle"),
            ];
            let more = stream::iter(sources).chain(stream::pending());
            owning(live.guard("source function"), more).boxed()
        }
        _ => stream::iter([done(), inline(), idle(&live, "idle")]).boxed(),
    }
}

/// A server node (end A of the pair) serving "svc", a client node (end B).
struct Rig {
    client_node: Node,
    faults: Faults,
    live: Live,
    client: Client<Node>,
    _service: ServeHandle,
    _server_node: Node,
}

async fn rig() -> Rig {
    let (io_a, io_b, faults) = faulty_pair();
    let server_node = Node::with_config(node_config());
    let client_node = Node::with_config(node_config());
    let (s, c) = tokio::join!(
        server_node.attach(io_a, true),
        client_node.attach(io_b, false)
    );
    assert_eq!(s.unwrap(), client_node.id());
    assert_eq!(c.unwrap(), server_node.id());
    let live = Live(Arc::new(watch::Sender::new(BTreeSet::new())));
    let service = Server::new(server_node.clone())
        .listen_and_serve("svc", service(live.clone()))
        .unwrap();
    client_node
        .wait_for_name("svc", std::time::Duration::from_secs(10))
        .await
        .unwrap();
    Rig {
        client: Client::new(client_node.clone()).unwrap(),
        client_node,
        faults,
        live,
        _service: service,
        _server_node: server_node,
    }
}

/// Posts `body` and takes `n` sources (all of them when `None`), by header.
async fn post(
    rig: &Rig,
    body: &'static str,
    n: Option<usize>,
) -> (Sources, HashMap<String, Source>) {
    let mut sources = rig.client.lookup_and_post("svc", body, &[]).await.unwrap();
    let mut got = HashMap::new();
    while n.is_none_or(|n| got.len() < n) {
        let Some(s) = sources.next().await else { break };
        let s = s.expect("a source");
        got.insert(String::from_utf8(s.header().to_vec()).unwrap(), s);
    }
    (sources, got)
}

/// How a stream ended for its consumer.
#[derive(Debug)]
struct Outcome {
    frames: Vec<Bytes>,
    /// `None`: it completed.
    error: Option<Error>,
    /// An error was followed by `None`.
    then_none: bool,
    at: Instant,
}

/// Reads `s` (a `Source`, or a `Sources` as a stream of empty frames) to its end;
/// after `notify.0` frames, tells `notify.1` (traffic flows).
async fn drain<S>(mut s: S, mut notify: Option<(usize, oneshot::Sender<()>)>) -> Outcome
where
    S: Stream<Item = chanserv::Result<Bytes>> + Unpin,
{
    let mut frames = Vec::new();
    loop {
        if notify.as_ref().is_some_and(|(n, _)| frames.len() >= *n) {
            let _ = notify.take().expect("checked").1.send(());
        }
        match s.next().await {
            Some(Ok(f)) => frames.push(f),
            end => {
                let at = Instant::now();
                let error = end.map(|e| e.expect_err("not a frame"));
                let then_none = error.is_none() || s.next().await.is_none();
                return Outcome {
                    frames,
                    error,
                    then_none,
                    at,
                };
            }
        }
    }
}

/// Runs `f` in a task and returns once that task has been polled: on this
/// current-thread runtime it has then reached its first wait (parked). Consumers run
/// in tasks so that only a real wake-up counts: a poll at a test's deadline would
/// find the end of a stream that nobody announced.
async fn spawn_parked(f: impl Future<Output = Outcome> + Send + 'static) -> JoinHandle<Outcome> {
    let (started, polled) = oneshot::channel();
    let h = tokio::spawn(async move {
        let _ = started.send(());
        f.await
    });
    polled.await.expect("task started");
    h
}

/// A request in flight: consumers parked or reading, one busy source held unread.
struct InFlight {
    consumers: Vec<(&'static str, JoinHandle<Outcome>)>,
    held: Source,
}

/// Posts `"mixed"` and checks its completed sources completed; leaves "busy-read"
/// read by a task, "idle" and the `Sources` parked, "busy-held" full and unread.
async fn start(rig: &Rig) -> InFlight {
    let (sources, mut got) = post(rig, "mixed", Some(5)).await;
    let mut take = |name: &str| got.remove(name).expect(name);
    let done = drain(take("done"), None).await;
    assert!(completed(&done, &done_frames()), "{done:?}");
    let inline = drain(take("inline"), None).await;
    assert!(completed(&inline, &[TINY]), "{inline:?}");
    let mut idle = take("idle");
    assert_eq!(idle.next().await.unwrap().unwrap(), "one");
    let mut held = take("busy-held");
    assert_eq!(held.next().await.unwrap().unwrap().len(), 1024);
    let (flowing, started) = oneshot::channel();
    let busy = tokio::spawn(drain(take("busy-read"), Some((256, flowing))));
    started.await.expect("busy-read flows");
    let consumers = vec![
        ("busy-read", busy),
        ("idle", spawn_parked(drain(idle, None)).await),
        (
            "Sources",
            spawn_parked(drain(sources.map(|s| s.map(|_| Bytes::new())), None)).await,
        ),
    ];
    InFlight { consumers, held }
}

fn completed(o: &Outcome, frames: &[Bytes]) -> bool {
    o.error.is_none() && o.frames == frames
}

/// The consumer's outcome, `None` if it is still pending at `deadline`.
async fn outcome(h: JoinHandle<Outcome>, deadline: Instant) -> Option<Outcome> {
    let r = timeout_at(deadline, h).await.ok();
    r.map(|r| r.expect("consumer task"))
}

/// What is wrong with how a consumer ended, if anything (`None`: it hung).
fn check_failed(what: &str, o: Option<Outcome>, t0: Instant, deadline: Instant) -> Option<String> {
    let Some(o) = o else {
        let waited = deadline - t0;
        return Some(format!(
            "{what}: HANG, still pending +{waited:?} after the fault"
        ));
    };
    let (after, n) = (o.at - t0, o.frames.len());
    match &o.error {
        None => Some(format!(
            "{what}: COMPLETED (None) after {n} frames at +{after:?}"
        )),
        Some(e) if !e.is_closed() => Some(format!("{what}: WRONG ERROR {e:?} at +{after:?}")),
        Some(_) if !o.then_none => Some(format!("{what}: an item after its error")),
        Some(e) if o.at > deadline => Some(format!("{what}: LATE, {e:?} at +{after:?}")),
        Some(e) => {
            eprintln!("    ok: {what}: {e:?} at +{after:?} after {n} frames");
            None
        }
    }
}

/// Waits (up to `bound` after `t0`) for every consumer of `f` to fail and every
/// producer to be dropped; returns what did not happen.
async fn failures(rig: &Rig, f: InFlight, t0: Instant, bound: Duration) -> Vec<Option<String>> {
    let deadline = t0 + bound;
    let mut consumers = f.consumers;
    consumers.push((
        "busy-held (read after the fault)",
        tokio::spawn(drain(f.held, None)),
    ));
    let consumers = consumers.into_iter().map(|(name, h)| async move {
        check_failed(name, outcome(h, deadline).await, t0, deadline)
    });
    let producers = async {
        let r = timeout_at(deadline, rig.live.all_dropped()).await;
        let alive = rig.live.0.borrow().clone();
        r.is_err()
            .then(|| format!("server: producers {alive:?} not dropped by +{bound:?}"))
    };
    let (mut problems, producers) = tokio::join!(join_all(consumers), producers);
    problems.push(producers);
    problems
}

fn assert_none(scenario: &str, problems: Vec<Option<String>>) {
    let problems: Vec<String> = problems.into_iter().flatten().collect();
    assert!(
        problems.is_empty(),
        "{scenario}:\n  {}",
        problems.join("\n  ")
    );
}

async fn fault_mid_stream(scenario: &str, fault: impl FnOnce(&Faults), bound: Duration) {
    bounded(async {
        let rig = rig().await;
        let in_flight = start(&rig).await;
        let t0 = Instant::now();
        fault(&rig.faults);
        assert_none(scenario, failures(&rig, in_flight, t0, bound).await);
    })
    .await;
}

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
