// The rig of tests/faults.rs, included there with `include!` (not a module of its
// own: its items stay private to that test).

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
