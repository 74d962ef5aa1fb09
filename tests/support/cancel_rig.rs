// The rig of tests/cancel.rs, included there with `include!` (not a module of its
// own: its items stay private to that test).

// ------------------------------------------------------------------ live producers

/// The server's producers (and source functions) that are alive, by name, and how
/// many were ever made.
#[derive(Clone, Default)]
struct Live(Arc<watch::Sender<(BTreeSet<String>, usize)>>);

struct Alive(Live, String);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0 .0.send_modify(|(s, _)| {
            s.remove(&self.1);
        });
    }
}

impl Live {
    fn guard(&self, name: String) -> Alive {
        self.0.send_modify(|(s, made)| {
            assert!(s.insert(name.clone()), "{name} made twice");
            *made += 1;
        });
        Alive(self.clone(), name)
    }
    async fn until(&self, what: &str, mut f: impl FnMut(&BTreeSet<String>, usize) -> bool) {
        let mut rx = self.0.subscribe();
        if timeout(BOUND, rx.wait_for(|(s, made)| f(s, *made)))
            .await
            .is_err()
        {
            let (alive, made) = &*self.0.borrow();
            panic!("{what}: after {BOUND:?}, {made} made, alive: {alive:?}");
        }
    }
    /// Waits until exactly `names` are alive.
    async fn exactly(&self, what: &str, names: &[&str]) {
        let want: BTreeSet<String> = names.iter().map(|s| s.to_string()).collect();
        self.until(what, |s, _| *s == want).await;
    }
}

fn owning<T>(alive: Alive, s: impl Stream<Item = T>) -> impl Stream<Item = T> {
    s.map(move |x| {
        let _ = &alive;
        x
    })
}

/// Writes 1 MiB frames forever, as fast as it may.
fn busy(live: &Live, name: String) -> Source {
    let frames = owning(live.guard(name.clone()), stream::repeat(BIG.clone()));
    Source::new(name, frames)
}

/// Sends one frame, then idles forever.
fn idle(live: &Live, name: String) -> Source {
    let frames = stream::once(async { Bytes::from_static(b"one") }).chain(stream::pending());
    Source::new(name.clone(), owning(live.guard(name), frames))
}

/// `n` frames of `size` bytes, frame `i` filled with byte `i`.
fn numbered(n: u8, size: usize) -> impl Stream<Item = Bytes> + Send {
    stream::iter(0..n).map(move |i| Bytes::from(vec![i; size]))
}

/// Body `<tag>`: sources `<tag>/busy0`, `<tag>/idle0`, `<tag>/busy1`, `<tag>/idle1`,
/// then nothing more: the request stays in flight (its source function `<tag>/fn`
/// alive). Body `late`: `late/busy0`, `late/idle0`, then `late/done` (5 frames of
/// 20 KiB) once `late` is notified, then nothing more.
fn fan(
    live: Live,
    late: Arc<Notify>,
) -> impl Fn(Request) -> BoxStream<'static, Source> + Send + Sync + 'static {
    move |req| {
        let tag = String::from_utf8_lossy(&req.body).into_owned();
        let name = |what: &str| format!("{tag}/{what}");
        let guard = live.guard(name("fn"));
        let mut sources = vec![busy(&live, name("busy0")), idle(&live, name("idle0"))];
        if tag != "late" {
            sources.extend([busy(&live, name("busy1")), idle(&live, name("idle1"))]);
            let more = stream::iter(sources).chain(stream::pending());
            return owning(guard, more).boxed();
        }
        let (late, live) = (late.clone(), live.clone());
        let done = stream::once(async move {
            late.notified().await;
            let alive = live.guard("late/done".into());
            Source::new("late/done", owning(alive, numbered(5, 20 << 10)))
        });
        owning(
            guard,
            stream::iter(sources).chain(done).chain(stream::pending()),
        )
        .boxed()
    }
}

// ------------------------------------------------------------------ the rig

/// A server node serving "svc" and a client node, linked in memory.
struct Rig {
    client_node: Node,
    handle: ServeHandle,
    _server_node: Node,
    faults: faulty::Faults,
}

async fn rig<F, S>(cfg: ServerConfig, service: F) -> Rig
where
    F: Fn(Request) -> S + Send + Sync + 'static,
    S: Stream + Send + 'static,
    S::Item: SourceItem,
{
    let (io_a, io_b, faults) = faulty::faulty_pair();
    let (server_node, client_node) = (Node::new(), Node::new());
    let s = server_node.attach(io_a, true);
    let (s, c) = tokio::join!(s, client_node.attach(io_b, false));
    assert!(s.is_ok() && c.is_ok(), "linked");
    let handle = Server::with_config(server_node.clone(), cfg)
        .listen_and_serve("svc", service)
        .unwrap();
    client_node
        .wait_for_name("svc", std::time::Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(handle.active_tasks(), 1, "only the accept loop at rest");
    let _server_node = server_node;
    Rig {
        client_node,
        handle,
        _server_node,
        faults,
    }
}

impl Rig {
    fn client(&self) -> Client<Node> {
        Client::new(self.client_node.clone()).unwrap()
    }

    /// Waits (a bounded number of turns of the runtime) until the service is back to
    /// its accept loop alone.
    async fn settled(&self, what: &str) {
        for _ in 0..10_000 {
            if self.handle.active_tasks() == 1 {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("{what}: {} tasks left", self.handle.active_tasks());
    }

    /// Waits until nothing listens at `addr` on the client node any more.
    async fn unbound(&self, addr: &str, what: &str) {
        for _ in 0..10_000 {
            match Multiplexer::dial(&self.client_node, addr, Duration::from_secs(1)).await {
                Err(Error::NoSuchAddress(_)) => return,
                Err(e) => panic!("{what}: dialing {addr}: {e}"),
                Ok(_) => tokio::task::yield_now().await,
            }
        }
        panic!("{what}: {addr} is still bound");
    }
}

/// The client's reply address; its `Debug` is the only place it shows.
fn reply_addr(c: &Client<Node>) -> String {
    format!("{c:?}").split('"').nth(1).unwrap().to_owned()
}

async fn post(client: &Client<Node>, body: &str) -> Sources {
    client
        .lookup_and_post("svc", body.to_owned(), &[])
        .await
        .unwrap()
}

async fn take(sources: &mut Sources, header: &str) -> Source {
    let s = within(header, sources.next())
        .await
        .unwrap_or_else(|| panic!("{header}: the sources ended"))
        .unwrap_or_else(|e| panic!("{header}: {e}"));
    assert_eq!(s.header(), header);
    s
}

async fn frame(s: &mut Source) -> Bytes {
    within("a frame", s.next())
        .await
        .expect("a frame, not the end")
        .expect("a frame, not an error")
}

/// Reads a source to its end: its frames, and its error if it failed (then `None`).
async fn drain(s: &mut Source) -> (Vec<Bytes>, Option<Error>) {
    let mut frames = Vec::new();
    loop {
        match within("the next frame", s.next()).await {
            Some(Ok(f)) => frames.push(f),
            Some(Err(e)) => {
                let after = within("the end after an error", s.next()).await;
                assert!(after.is_none(), "an error is the last item");
                return (frames, Some(e));
            }
            None => return (frames, None),
        }
    }
}

fn assert_numbered(what: &str, frames: &[Bytes], n: usize, size: usize) {
    assert_eq!(frames.len(), n, "{what}: every frame");
    for (i, f) in frames.iter().enumerate() {
        let right = f.len() == size && f.iter().all(|&b| b == i as u8);
        assert!(right, "{what}: frame {i}");
    }
}

fn assert_panicked(what: &str, err: Option<Error>) {
    match err {
        Some(Error::SourceFailed(m)) if m.contains("panicked") => {}
        other => panic!("{what}: want Remote(\"..panicked..\"), got {other:?}"),
    }
}
