//! The public API as a new user meets it: builders that compose, an async source
//! function, any error type in a producer, handles that say what keeps things alive,
//! waits that return errors, link events as a stream.

use std::time::Duration;

use bytes::Bytes;
use chanserv::{
    Client, ClientConfig, Error, LinkEvent, Node, NodeConfig, Server, ServerConfig, Source, Timeout,
};
use futures::{stream, StreamExt};
use tokio::time::timeout;

const T: Duration = Duration::from_secs(20);

/// Every test is bounded: a hang is a failure.
async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    timeout(T, f).await.expect("the test hung")
}

async fn pair() -> (Node, Node) {
    let a = Node::with_config(NodeConfig::default().max_streams(64));
    let b = Node::new();
    let addr = a.listen("127.0.0.1:0").await.unwrap();
    b.join(addr).await.unwrap().detach();
    (a, b)
}

async fn frames_of(s: &mut Source) -> (Vec<Bytes>, Option<Error>) {
    let mut frames = Vec::new();
    while let Some(f) = s.next().await {
        match f {
            Ok(f) => frames.push(f),
            Err(e) => return (frames, Some(e)),
        }
    }
    (frames, None)
}

/// The frames of a source that must complete.
async fn completed(s: &mut Source) -> Vec<Bytes> {
    let (frames, err) = frames_of(s).await;
    assert!(err.is_none(), "{err:?}");
    frames
}

#[tokio::test]
async fn configs_are_by_value_builders() {
    bounded(async {
        let (a, b) = pair().await;
        let cfg = ServerConfig::default()
            .serving_timeout(Some(Duration::from_secs(5)))
            .use_compression(true);
        let _svc = Server::with_config(a, cfg)
            .listen_and_serve("echo", |req| {
                stream::iter([Source::new("h", stream::iter([req.body]))])
            })
            .unwrap();
        b.wait_for_name("echo", T).await.unwrap();
        // The shape that did not compile with `&mut self` setters.
        let client = Client::with_config(
            b,
            ClientConfig::default()
                .dial_timeout(Duration::from_secs(5))
                .frame_buffer_size(4),
        )
        .unwrap();
        let mut sources = client.lookup_and_post("echo", "hi", &[]).await.unwrap();
        let mut s = sources.next().await.unwrap().unwrap();
        assert_eq!(completed(&mut s).await, vec![Bytes::from("hi")]);
    })
    .await;
}

#[tokio::test]
async fn an_async_source_function_waits_then_answers_or_fails() {
    bounded(async {
        let (a, b) = pair().await;
        let _svc = Server::new(a)
            .listen_and_serve_async("lookup", |req| async move {
                // Setup that has to wait (a query, a dial), and may fail with `?`.
                tokio::time::sleep(Duration::from_millis(5)).await;
                let n: usize = std::str::from_utf8(&req.body)?.parse()?;
                Ok(stream::iter((0..n).map(|i| {
                    Source::new(format!("s{i}"), stream::iter([Bytes::from(vec![i as u8])]))
                })))
            })
            .unwrap();
        b.wait_for_name("lookup", T).await.unwrap();
        let client = Client::new(b).unwrap();

        let mut sources = client.lookup_and_post("lookup", "3", &[]).await.unwrap();
        let mut n = 0u8;
        while let Some(s) = sources.next().await {
            let mut s = s.unwrap();
            assert_eq!(s.header(), &Bytes::from(format!("s{n}")));
            assert_eq!(completed(&mut s).await, vec![Bytes::from(vec![n])]);
            n += 1;
        }
        assert_eq!(n, 3);

        let mut sources = client
            .lookup_and_post("lookup", "three", &[])
            .await
            .unwrap();
        match sources.next().await {
            Some(Err(Error::RequestFailed(m))) => {
                assert!(m.contains("invalid digit"), "the setup's own message: {m}")
            }
            other => panic!("expected RequestFailed, got {other:?}"),
        }
        assert!(sources.next().await.is_none(), "an error ends the sources");
    })
    .await;
}

#[tokio::test]
async fn a_producer_fails_with_any_error_type() {
    bounded(async {
        // Read locally: foreign errors become SourceFailed, a crate error stays itself.
        let io = std::io::Error::other("disk on fire");
        let mut s = Source::try_new("io", stream::iter([Ok(Bytes::from("a")), Err(io)]));
        let (frames, err) = frames_of(&mut s).await;
        assert_eq!(frames, vec![Bytes::from("a")]);
        assert!(
            matches!(&err, Some(Error::SourceFailed(m)) if m == "disk on fire"),
            "{err:?}"
        );
        let mut s = Source::try_new("str", stream::iter([Err::<Bytes, _>("no luck")]));
        assert!(
            matches!(frames_of(&mut s).await.1, Some(Error::SourceFailed(m)) if m == "no luck")
        );
        let own = Error::Timeout(Timeout::FrameRead);
        let mut s = Source::try_new("own", stream::iter([Err::<Bytes, _>(own)]));
        assert!(matches!(
            frames_of(&mut s).await.1,
            Some(Error::Timeout(Timeout::FrameRead))
        ));

        // Across the wire: the message arrives, as SourceFailed, siblings untouched.
        let (a, b) = pair().await;
        let _svc = Server::new(a)
            .listen_and_serve("mixed", |_| {
                let bad = std::io::Error::other("sector 7");
                stream::iter([
                    Source::try_new("bad", stream::iter([Ok(Bytes::from("x")), Err(bad)])),
                    Source::new("good", stream::iter([Bytes::from("y")])),
                ])
            })
            .unwrap();
        b.wait_for_name("mixed", T).await.unwrap();
        let client = Client::new(b).unwrap();
        let mut sources = client.lookup_and_post("mixed", "", &[]).await.unwrap();
        let mut bad = sources.next().await.unwrap().unwrap();
        let mut good = sources.next().await.unwrap().unwrap();
        let (frames, err) = frames_of(&mut bad).await;
        assert_eq!(frames, vec![Bytes::from("x")]);
        assert!(
            matches!(&err, Some(e @ Error::SourceFailed(m)) if m == "sector 7" && e.is_remote()),
            "{err:?}"
        );
        assert_eq!(completed(&mut good).await, vec![Bytes::from("y")]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn waiting_for_a_name_that_never_comes_is_an_error() {
    let node = Node::new();
    let r = node.wait_for_name("nobody", Duration::from_secs(3)).await;
    assert!(
        matches!(&r, Err(Error::NoSuchAddress(n)) if n == "nobody"),
        "{r:?}"
    );
    let r = node
        .wait_for_providers("nobody", 1, Duration::from_secs(3))
        .await;
    assert!(matches!(r, Err(Error::NoSuchAddress(_))), "{r:?}");
    let r = node
        .wait_for_name("no spaces/slashes", Duration::from_secs(3))
        .await;
    assert!(matches!(r, Err(Error::InvalidAddress(..))), "{r:?}");
    // A name bound here is known at once.
    let _l = chanserv::Multiplexer::bind(&node, "here").unwrap();
    node.wait_for_name("here", Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn a_detached_service_outlives_its_handle_and_a_dropped_one_does_not() {
    bounded(async {
        let (a, b) = pair().await;
        let server = Server::new(a.clone());
        let echo =
            |req: chanserv::Request| stream::iter([Source::new("h", stream::iter([req.body]))]);
        server.listen_and_serve("kept", echo).unwrap().detach();
        drop(server.listen_and_serve("dropped", echo).unwrap());
        b.wait_for_name("kept", T).await.unwrap();
        let client = Client::new(b.clone()).unwrap();
        let mut sources = client
            .lookup_and_post("kept", "still here", &[])
            .await
            .unwrap();
        let mut s = sources.next().await.unwrap().unwrap();
        assert_eq!(frames_of(&mut s).await.0, vec![Bytes::from("still here")]);
        // The dropped one unbound its name at once.
        assert!(a.providers("dropped").is_empty());
        let r = client.lookup_and_post("dropped", "", &[]).await;
        assert!(matches!(r, Err(Error::NoSuchAddress(_))), "{r:?}");
        // A detached service ends with its node.
        a.shutdown().await;
        assert!(a.providers("kept").is_empty());
    })
    .await;
}

#[test]
fn outside_a_runtime_clients_and_services_are_misuse_not_panics() {
    let node = Node::new();
    let r = Client::new(node.clone());
    assert!(matches!(r, Err(Error::Misuse(_))), "{r:?}");
    let r = Server::new(node).listen_and_serve("x", |_| stream::empty::<Source>());
    assert!(matches!(r, Err(Error::Misuse(_))), "{r:?}");
}

#[tokio::test]
async fn link_events_are_a_stream_that_ends_with_the_node() {
    bounded(async {
        let a = Node::new();
        let addr = a.listen("127.0.0.1:0").await.unwrap();
        let b = Node::new();
        let mut events = b.subscribe();
        let joined = b.join(addr).await.unwrap();
        let up = events.next().await;
        assert!(
            matches!(&up, Some(LinkEvent::Up(p)) if p.node == a.id()),
            "{up:?}"
        );
        drop(joined);
        let down = events.recv().await;
        assert!(
            matches!(&down, Some(LinkEvent::Down(p)) if p.node == a.id()),
            "{down:?}"
        );
        b.shutdown().await;
        drop(b);
        assert_eq!(events.next().await, None, "the node is gone");
        assert_eq!(events.next().await, None, "and stays gone");
    })
    .await;
}
