//! Cancellation, producer panics and error mass (issue 9, points 2, 3 and 6; DESIGN.md
//! "Semantics" and "Under faults").
//!
//! Two nodes over an in-memory link (`support/faulty.rs`, no fault injected), time
//! paused: every wait is bounded on the virtual clock, which moves only when every task
//! is idle, so a hang fails at once instead of stalling CI.

#[allow(dead_code)]
#[path = "support/faulty.rs"]
mod faulty;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use chanserv::{
    Client, Error, Multiplexer, Node, Request, ServeHandle, Server, ServerConfig, Source,
    SourceItem, Sources, Timeout,
};
use futures::stream::{self, BoxStream, Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::timeout;

/// Virtual time one awaited event may take.
const BOUND: Duration = Duration::from_secs(10);
/// Virtual time a whole test may take.
const TEST_LIMIT: Duration = Duration::from_secs(600);
/// A busy producer's frame: larger than a stream's 256 KiB window, so a pump whose
/// consumer does not read is stuck writing its first one.
const BIG_LEN: usize = 1 << 20;
static BIG: LazyLock<Bytes> = LazyLock::new(|| Bytes::from(vec![b'b'; BIG_LEN]));

async fn bounded(body: impl Future<Output = ()>) {
    let limit = timeout(TEST_LIMIT, body).await;
    limit.expect("the test hung past its time limit");
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {BOUND:?}"))
}

// The rig (nodes, live producers, helpers) is shared text, kept apart so this file
// holds the scenarios: `include!` keeps it in this module, private items and all.
include!("support/cancel_rig.rs");

// ------------------------------------------------------------------ 1: cancellation

/// Issue 9 point 2: a Client dropped with 30 requests in flight, then their Sources
/// (and the sources taken from half of them after the client left): every producer,
/// busy (stuck writing into a full window) or idle, and every source function is
/// dropped. Before the fix, child streams dialed back after the client's listener was
/// gone were refused, and busy pumps blocked in write on them for good (58 of 60 here).
#[tokio::test(start_paused = true)]
async fn dropping_the_client_then_its_sources_drops_every_producer() {
    bounded(async {
        let live = Live::default();
        let rig = rig(ServerConfig::default(), fan(live.clone(), Arc::default())).await;
        let client = rig.client();
        // Hold what the server sends until the client is gone, so that every source's
        // stream comes back after it (the race the issue lost 25-28 times in 30).
        rig.faults.freeze(faulty::Dir::AToB);
        let mut posted = Vec::new();
        for i in 0..30 {
            posted.push(post(&client, &format!("r{i}")).await);
        }
        drop(client);
        rig.faults.thaw(faulty::Dir::AToB);
        let mut held = Vec::new();
        for (i, sources) in posted.iter_mut().enumerate().step_by(2) {
            held.push(take(sources, &format!("r{i}/busy0")).await);
        }
        live.until("every request reached its source function", |_, made| {
            made == 30 * 5
        })
        .await;
        assert_eq!(rig.handle.active_tasks(), 1 + 30, "one task per request");
        drop(posted);
        drop(held);
        live.exactly("after the client and its sources left", &[])
            .await;
        rig.settled("after the client and its sources left").await;
    })
    .await;
}

/// Dropping `Sources` stops the request, but a source taken from it keeps flowing
/// until it is dropped in turn.
#[tokio::test(start_paused = true)]
async fn a_source_outlives_its_dropped_sources_until_dropped() {
    bounded(async {
        let live = Live::default();
        let rig = rig(ServerConfig::default(), fan(live.clone(), Arc::default())).await;
        let client = rig.client();
        let mut sources = post(&client, "r").await;
        let mut busy = take(&mut sources, "r/busy0").await;
        let mut idle = take(&mut sources, "r/idle0").await;
        assert_eq!(frame(&mut busy).await.len(), BIG_LEN);
        assert_eq!(frame(&mut idle).await, "one");
        drop(sources);
        live.exactly("Sources dropped", &["r/busy0", "r/idle0"])
            .await;
        for _ in 0..5 {
            assert_eq!(frame(&mut busy).await.len(), BIG_LEN, "still flowing");
        }
        assert_eq!(rig.handle.active_tasks(), 2, "the request still runs");
        drop(busy);
        live.exactly("busy source dropped", &["r/idle0"]).await;
        drop(idle);
        live.exactly("idle source dropped", &[]).await;
        rig.settled("every source dropped").await;
        drop(client);
    })
    .await;
}

/// Sources first (the request stays in flight), then `Sources`, then the Client; the
/// client's reply listener goes with the last of them.
#[tokio::test(start_paused = true)]
async fn dropping_sources_then_sources_then_client() {
    bounded(async {
        let live = Live::default();
        let rig = rig(ServerConfig::default(), fan(live.clone(), Arc::default())).await;
        let client = rig.client();
        let reply = reply_addr(&client);
        let mut sources = post(&client, "r").await;
        let mut taken = Vec::new();
        for h in ["r/busy0", "r/idle0", "r/busy1", "r/idle1"] {
            let mut s = take(&mut sources, h).await;
            frame(&mut s).await;
            taken.push(s);
        }
        let [busy0, idle0, busy1, idle1] = <[Source; 4]>::try_from(taken).unwrap();
        drop((idle0, busy1));
        drop((busy0, idle1));
        live.exactly("every Source dropped", &["r/fn"]).await;
        assert_eq!(rig.handle.active_tasks(), 2, "still in flight");
        drop(sources);
        live.exactly("Sources dropped", &[]).await;
        rig.settled("Sources dropped").await;
        let probe = Multiplexer::dial(&rig.client_node, &reply, Duration::from_secs(1));
        assert!(probe.await.is_ok(), "the client's listener lives with it");
        drop(client);
        rig.unbound(&reply, "client dropped last").await;
        assert_eq!(rig.handle.active_tasks(), 1);
    })
    .await;
}

/// Dropping the Client alone cancels nothing whose Sources is alive: sources keep
/// flowing and a source announced afterwards still gets its stream; dropping the
/// Sources and the sources taken from it then ends everything.
#[tokio::test(start_paused = true)]
async fn dropping_only_the_client_lets_its_requests_flow() {
    bounded(async {
        let live = Live::default();
        let late = Arc::new(Notify::new());
        let rig = rig(ServerConfig::default(), fan(live.clone(), late.clone())).await;
        let client = rig.client();
        let reply = reply_addr(&client);
        let mut sources = post(&client, "late").await;
        let mut busy = take(&mut sources, "late/busy0").await;
        assert_eq!(frame(&mut busy).await.len(), BIG_LEN);
        drop(client);
        for _ in 0..3 {
            assert_eq!(frame(&mut busy).await.len(), BIG_LEN, "still flowing");
        }
        let idle = take(&mut sources, "late/idle0").await;
        drop(idle);
        live.exactly("idle dropped", &["late/busy0", "late/fn"])
            .await;
        late.notify_one();
        let mut done = take(&mut sources, "late/done").await;
        let (frames, err) = drain(&mut done).await;
        assert!(err.is_none(), "{err:?}");
        assert_numbered("late/done", &frames, 5, 20 << 10);
        drop(sources);
        live.exactly("Sources dropped", &["late/busy0"]).await;
        assert_eq!(frame(&mut busy).await.len(), BIG_LEN, "still flowing");
        drop(busy);
        live.exactly("everything dropped", &[]).await;
        rig.settled("everything dropped").await;
        rig.unbound(&reply, "client and its requests gone").await;
    })
    .await;
}

// ------------------------------------------------------------------ 2: panics

/// Body `panic`: two producers panic (one on its first poll, one after 3 frames)
/// among three siblings that complete (on a child stream, inline, and behind a
/// pending first poll). Any other body: 3 frames.
fn panicky(req: Request) -> BoxStream<'static, Source> {
    if &req.body[..] != b"panic" {
        return stream::iter([Source::new("plain", numbered(3, 20 << 10))]).boxed();
    }
    let first = stream::poll_fn(|_| -> Poll<Option<Bytes>> { panic!("boom at first poll") });
    let mid = numbered(10, 20 << 10).map(|f| {
        assert!(f[0] != 3, "boom mid-stream");
        f
    });
    let late = stream::once(tokio::task::yield_now()).flat_map(|()| numbered(10, 1024));
    stream::iter([
        Source::new("sibling-stream", numbered(10, 20 << 10)),
        Source::new("panic-first", first),
        Source::new("sibling-inline", numbered(3, 8)),
        Source::new("panic-mid", mid),
        Source::new("sibling-late", late),
    ])
    .boxed()
}

#[tokio::test(start_paused = true)]
async fn a_panicking_producer_fails_only_its_own_source() {
    bounded(async {
        let rig = rig(ServerConfig::default(), panicky).await;
        let client = rig.client();
        let mut sources = post(&client, "panic").await;
        let mut s = take(&mut sources, "sibling-stream").await;
        assert_numbered("sibling-stream", &drain_ok(&mut s).await, 10, 20 << 10);
        let (frames, err) = drain(&mut take(&mut sources, "panic-first").await).await;
        assert!(frames.is_empty());
        assert_panicked("panic-first", err);
        let mut s = take(&mut sources, "sibling-inline").await;
        assert_numbered("sibling-inline", &drain_ok(&mut s).await, 3, 8);
        let (frames, err) = drain(&mut take(&mut sources, "panic-mid").await).await;
        assert_numbered("panic-mid, before its panic", &frames, 3, 20 << 10);
        assert_panicked("panic-mid", err);
        let mut s = take(&mut sources, "sibling-late").await;
        assert_numbered("sibling-late", &drain_ok(&mut s).await, 10, 1024);
        let end = within("the end of the sources", sources.next()).await;
        assert!(end.is_none(), "the request completes: {end:?}");
        let mut s = take(&mut post(&client, "next").await, "plain").await;
        assert_numbered("the next request", &drain_ok(&mut s).await, 3, 20 << 10);
        rig.settled("after the panics").await;
    })
    .await;
}

async fn drain_ok(s: &mut Source) -> Vec<Bytes> {
    let (frames, err) = drain(s).await;
    assert!(err.is_none(), "{:?}: {err:?}", s.header());
    frames
}

/// A `SourceSender` dropped by a panic with its buffer full fails its source; one
/// dropped normally completes it; `abort` fails it with its reason.
#[tokio::test(start_paused = true)]
async fn a_sender_dropped_by_a_panic_with_a_full_buffer_fails_its_source() {
    bounded(async {
        let (full_tx, full_rx) = oneshot::channel::<()>();
        let full_tx = Mutex::new(Some(full_tx));
        let rig = rig(ServerConfig::default(), move |_| {
            let (crash, crashed) = Source::channel("crashed", 4);
            let full = full_tx.lock().unwrap().take().expect("one request");
            tokio::spawn(async move {
                // Frame 0 alone is more than the stream's window and nobody reads: the
                // pump is stuck writing it, so frames 1 to 4 fill the buffer (the 5th
                // send returns once frame 0 was taken).
                for i in 0..5u8 {
                    crash.send(vec![i; BIG_LEN]).await.unwrap();
                }
                full.send(()).unwrap();
                panic!("producer crashed with a full buffer");
            });
            let (tx, completed) = Source::channel("completed", 2);
            tokio::spawn(async move {
                for i in 0..3u8 {
                    tx.send(vec![i; 100]).await.unwrap();
                }
            });
            let (tx, aborted) = Source::channel("aborted", 2);
            tokio::spawn(async move {
                tx.send(vec![0u8; 100]).await.unwrap();
                tx.abort("disk full").await;
            });
            stream::iter([crashed, completed, aborted])
        })
        .await;
        let client = rig.client();
        let mut sources = post(&client, "").await;
        let mut crashed = take(&mut sources, "crashed").await;
        within("the buffer filled", full_rx).await.unwrap();
        let (frames, err) = drain(&mut crashed).await;
        assert_numbered("crashed, before its panic", &frames, 5, BIG_LEN);
        assert_panicked("crashed", err);
        let mut s = take(&mut sources, "completed").await;
        assert_numbered("completed", &drain_ok(&mut s).await, 3, 100);
        let (frames, err) = drain(&mut take(&mut sources, "aborted").await).await;
        assert_numbered("aborted", &frames, 1, 100);
        let reason = matches!(&err, Some(Error::SourceFailed(m)) if m == "disk full");
        assert!(reason, "{err:?}");
        assert!(within("the end", sources.next()).await.is_none());
    })
    .await;
}

// ------------------------------------------------------------------ 3: error mass

/// Only the service's own faults count toward the error mass: 10 clients that leave
/// mid-request and malformed requests are reported but never run the action (which
/// pauses accepting for 30 s, as the default does); 3 source function errors in a row
/// run it exactly once.
#[tokio::test(start_paused = true)]
async fn only_the_services_own_faults_count_toward_the_error_mass() {
    bounded(async {
        let (mass_tx, mut mass_rx) = mpsc::unbounded_channel();
        let (err_tx, mut err_rx) = mpsc::unbounded_channel();
        let cfg = ServerConfig::default()
            .max_error_mass(3)
            .on_max_error_mass(move |n| {
                mass_tx.send(n).unwrap();
                tokio::time::sleep(Duration::from_secs(30))
            })
            .on_error(move |e| {
                let own = matches!(
                    e,
                    Error::SourceFunc(_) | Error::Timeout(Timeout::Serving | Timeout::Sourcing)
                );
                err_tx.send((e.to_string(), own, e.is_protocol())).unwrap();
            });
        let live = Live::default();
        let l2 = live.clone();
        let n = AtomicUsize::new(0);
        let rig = rig(cfg, move |req: Request| match &req.body[..] {
            b"cancel" => {
                let name = format!("busy {}", n.fetch_add(1, Ordering::Relaxed));
                let more = stream::pending();
                stream::iter([Ok::<_, &str>(busy(&l2, name))])
                    .chain(more)
                    .boxed()
            }
            b"error" => stream::iter([Err("broken")]).boxed(),
            _ => stream::iter([Ok(Source::empty("ok"))]).boxed(),
        })
        .await;
        let promptly = Duration::from_secs(2);

        for _ in 0..10 {
            let client = rig.client();
            let mut sources = post(&client, "cancel").await;
            let mut s = sources.next().await.unwrap().unwrap();
            assert_eq!(frame(&mut s).await.len(), BIG_LEN);
            drop((s, sources, client));
            let (e, own, _) = next_error(&mut err_rx, "a cancelled request is reported").await;
            assert!(!own, "a client's leaving is not the service's fault: {e}");
        }
        live.exactly("cancelled producers", &[]).await;
        let r = timeout(promptly, fine(&rig)).await;
        assert!(r.is_ok(), "cancellations paused the service");
        assert!(mass_rx.try_recv().is_err(), "cancellations ran the action");

        let garbage: [&[u8]; 4] = [
            &[2, 0, 0, 0, 0xde, 0xad], // a frame too short for a request
            &[12, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 200, 1, 2, 3], // reply length 200
            &[0xff, 0xff, 0xff, 0x7f], // a frame over the size limit
            &[100, 0, 0, 0, 1, 2, 3],  // a frame cut short
        ];
        for bytes in garbage {
            let mut s = Multiplexer::dial(&rig.client_node, "svc", Duration::from_secs(5))
                .await
                .unwrap();
            s.write_all(bytes).await.unwrap();
            s.shutdown().await.unwrap();
            let mut answer = Vec::new();
            // The server closes or resets the stream; either way the read ends.
            let _ = within("the server lets go", s.read_to_end(&mut answer)).await;
            let (e, own, protocol) =
                next_error(&mut err_rx, "a malformed request is reported").await;
            assert!(!own && protocol, "{e}");
        }
        let r = timeout(promptly, fine(&rig)).await;
        assert!(r.is_ok(), "malformed requests paused the service");
        assert!(mass_rx.try_recv().is_err(), "garbage ran the action");

        let client = rig.client();
        for _ in 0..3 {
            let mut sources = post(&client, "error").await;
            let r = within("the request's failure", sources.next()).await;
            let failed = matches!(&r, Some(Err(Error::RequestFailed(m))) if m.contains("broken"));
            assert!(failed, "{r:?}");
            let (e, own, _) = next_error(&mut err_rx, "a source function error is reported").await;
            assert!(own, "{e}");
        }
        assert_eq!(within("the action", mass_rx.recv()).await, Some(3));
        let r = timeout(Duration::from_secs(60), fine(&rig)).await;
        assert!(r.is_ok(), "serving again after the pause");
        assert!(mass_rx.try_recv().is_err(), "the action ran once");
        rig.settled("at the end").await;
    })
    .await;
}

type Reported = (String, bool, bool);

/// The next error the service reported: its text, whether it is the service's own
/// fault, whether it is a protocol error.
async fn next_error(rx: &mut mpsc::UnboundedReceiver<Reported>, what: &str) -> Reported {
    within(what, rx.recv()).await.unwrap()
}

/// A normal request, answered in full (bounded by the caller).
async fn fine(rig: &Rig) {
    let client = rig.client();
    let mut sources = post(&client, "fine").await;
    let mut s = sources.next().await.unwrap().unwrap();
    assert_eq!(s.header(), "ok");
    assert!(s.next().await.is_none());
    assert!(sources.next().await.is_none());
}
/// A producer whose drop says so, then panics (unless already unwinding).
struct PanicOnDrop(Option<oneshot::Sender<()>>);

impl Drop for PanicOnDrop {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.0.take().unwrap().send(()).unwrap();
            panic!("producer panics in drop");
        }
    }
}

/// The client drops a source whose producer panics while the server drops it; its
/// sibling, which sends the rest of its frames only after that, must still complete.
#[tokio::test(start_paused = true)]
async fn a_producer_that_panics_when_dropped_spares_its_siblings() {
    bounded(async {
        let (dropped_tx, dropped_rx) = oneshot::channel();
        let dropped_tx = Mutex::new(Some(dropped_tx));
        let go = Arc::new(Notify::new());
        let go2 = go.clone();
        let rig = rig(ServerConfig::default(), move |_| {
            let bomb = PanicOnDrop(dropped_tx.lock().unwrap().take());
            let frames = stream::once(async { Bytes::from_static(b"one") })
                .chain(stream::pending())
                .map(move |f| {
                    let _ = &bomb;
                    f
                });
            let (tx, sibling) = Source::channel("sibling", 1);
            let go = go2.clone();
            tokio::spawn(async move {
                tx.send(vec![0u8; 20 << 10]).await.unwrap();
                go.notified().await;
                for i in 1..10u8 {
                    tx.send(vec![i; 20 << 10]).await.unwrap();
                }
            });
            stream::iter([Source::new("bomb", frames), sibling])
        })
        .await;
        let client = rig.client();
        let mut sources = post(&client, "").await;
        let mut bomb = take(&mut sources, "bomb").await;
        let mut sibling = take(&mut sources, "sibling").await;
        assert_eq!(frame(&mut bomb).await, "one");
        let first = frame(&mut sibling).await;
        drop(bomb);
        within("the bomb's drop", dropped_rx).await.unwrap();
        go.notify_one();
        let (frames, err) = drain(&mut sibling).await;
        assert!(
            err.is_none(),
            "sibling cut after {} more frames: {err:?}",
            frames.len()
        );
        assert_numbered("sibling", &[vec![first], frames].concat(), 10, 20 << 10);
    })
    .await;
}
