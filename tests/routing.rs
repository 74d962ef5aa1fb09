//! Routing through the mesh (issue 14): names and nodes beyond the linked peers,
//! streams relayed by intermediate nodes with backpressure, cancellation and
//! failure end to end, and routes that reconverge when links go down.
//!
//! Nodes are linked in process over [`faulty::faulty_pair`] (so a link can be cut or
//! silenced), with short keep-alives so a silent relay is declared dead quickly.

#[path = "support/faulty.rs"]
#[allow(dead_code)] // what this file needs of it
mod faulty;

#[path = "support/counted.rs"]
mod counted;
use counted::{stalled_and_flowing, Counted};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chanserv::{
    Client, DialOptions, Error, LinkEvent, Listener, Multiplexer, Node, NodeConfig, NodeId, Server,
    Source,
};
use faulty::{faulty_pair, Dir, Faults};
use futures::{stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{timeout, Instant};

const T: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

fn node() -> Node {
    node_in("")
}

fn node_in(env: &str) -> Node {
    let cfg = NodeConfig::default()
        .keepalive(Duration::from_millis(500), KEEPALIVE_TIMEOUT)
        .close_timeout(Duration::from_millis(300))
        .environment(env);
    Node::with_config(cfg)
}

/// Links two nodes over a fault-injecting pipe; the handle breaks it.
async fn link(a: &Node, b: &Node) -> Faults {
    let (x, y, faults) = faulty_pair();
    let b2 = b.clone();
    let accept = tokio::spawn(async move { b2.attach(y, false).await });
    assert_eq!(a.attach(x, true).await.unwrap(), b.id());
    accept.await.unwrap().unwrap();
    faults
}

/// A–B–C, no link between A and C.
async fn chain() -> (Node, Node, Node, Faults, Faults) {
    let (a, b, c) = (node(), node(), node());
    let ab = link(&a, &b).await;
    let bc = link(&b, &c).await;
    (a, b, c, ab, bc)
}

fn numbered(n: u32, size: usize) -> impl futures::Stream<Item = Bytes> + Send {
    stream::iter(0..n).map(move |i| {
        let v: Vec<u8> = (0..size.max(4))
            .map(|k| (i as usize * 31 + k) as u8)
            .collect();
        Bytes::from(v)
    })
}

#[tokio::test]
async fn a_client_is_served_through_a_relay_every_byte_checked() {
    let (a, b, c, _ab, _bc) = chain().await;
    let sizes = [0usize, 1, 100, 16 * 1024, 100_000, 1 << 20];
    let _svc = Server::new(c.clone())
        .listen_and_serve("svc", move |_| {
            let sources = sizes.map(|size| Source::new(format!("{size}"), numbered(40, size)));
            stream::iter(sources)
        })
        .unwrap();
    a.wait_for_name("svc", T).await.unwrap();
    // The registry: C's name two hops away, through B.
    assert_eq!(a.providers("svc"), [c.id()]);
    assert_eq!(a.services()["svc"][0].hops, 2);
    let to_c = a.routes().into_iter().find(|r| r.node == c.id()).unwrap();
    assert_eq!(to_c.path, [b.id(), c.id()]);
    assert_eq!(to_c.names, ["svc"]);
    let client = Client::new(a.clone()).unwrap();
    for _ in 0..2 {
        let mut sources = client.lookup_and_post("svc", "", &[]).await.unwrap();
        let mut seen = BTreeSet::new();
        while let Some(s) = sources.next().await {
            let mut s = s.unwrap();
            let size: usize = std::str::from_utf8(s.header()).unwrap().parse().unwrap();
            assert_eq!(s.meta().remote_addr().map(|a| a.node()), Some(c.id()));
            let want: Vec<Bytes> = numbered(40, size).collect().await;
            let mut got = Vec::new();
            while let Some(f) = s.next().await {
                got.push(f.expect("a relayed source completes"));
            }
            assert!(got == want, "source {size}: frames differ");
            seen.insert(size);
        }
        assert_eq!(seen.len(), sizes.len());
    }
}

#[tokio::test]
async fn completion_stays_distinct_from_failure_across_three_relays() {
    // A - B - C - D - E: the client at A, the service at E, four hops.
    let nodes: Vec<Node> = (0..5).map(|_| node()).collect();
    for w in nodes.windows(2) {
        // The links live on without their fault handles.
        link(&w[0], &w[1]).await;
    }
    let (a, e) = (&nodes[0], &nodes[4]);
    let _svc = Server::new(e.clone())
        .listen_and_serve("far", |_| {
            let bad = std::io::Error::other("disk on fire");
            let failing = stream::iter([Ok(Bytes::from_static(b"x")), Err(bad)]);
            stream::iter([
                Source::try_new("bad", failing),
                Source::new("good", numbered(200, 64 * 1024)),
            ])
        })
        .unwrap();
    a.wait_for_name("far", T).await.unwrap();
    assert_eq!(a.services()["far"][0].hops, 4);
    let client = Client::new(a.clone()).unwrap();
    let mut sources = client.lookup_and_post("far", "", &[]).await.unwrap();
    let mut bad = sources.next().await.unwrap().unwrap();
    let mut good = sources.next().await.unwrap().unwrap();
    assert!(sources.next().await.is_none(), "the request completes");
    assert_eq!(bad.next().await.unwrap().unwrap(), "x");
    let err = bad.next().await.unwrap().unwrap_err();
    assert!(
        matches!(&err, Error::SourceFailed(m) if m == "disk on fire"),
        "{err:?}"
    );
    assert!(bad.next().await.is_none());
    let want: Vec<Bytes> = numbered(200, 64 * 1024).collect().await;
    let mut got = Vec::new();
    while let Some(f) = good.next().await {
        got.push(f.expect("completes, not cut"));
    }
    assert!(got == want, "{} frames, not as sent", got.len());
}

#[tokio::test]
async fn dial_by_node_port_and_on_node_crosses_the_relay_with_fin_both_ways() {
    let (a, _b, c, _ab, _bc) = chain().await;
    let mut port = c.bind(":0").unwrap();
    let mut named = c.bind("echo").unwrap();
    let echo = |mut l: chanserv::NodeListener| async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        s.write_all(&all).await.unwrap();
        s.shutdown().await.unwrap();
        // Keep the stream until the dialer is done with it.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        l
    };
    // Once C's name is here, so is the route to C.
    a.wait_for_name("echo", T).await.unwrap();
    let there = format!("{:016x}:{}", c.id(), &port.local_addr().vaddr()[1..]);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let server = tokio::spawn(echo(port));
    let mut s = a.dial(&there, T).await.unwrap();
    s.write_all(&data).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    timeout(T, s.read_to_end(&mut back)).await.unwrap().unwrap();
    assert!(back == data, "{} bytes came back", back.len());
    drop(s);
    port = server.await.unwrap();
    drop(port);
    // By name on a chosen node.
    let server = tokio::spawn(echo(named));
    let mut s = a
        .dial("echo", DialOptions::new(T).on_node(c.id()))
        .await
        .unwrap();
    s.write_all(b"hello").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    timeout(T, s.read_to_end(&mut back)).await.unwrap().unwrap();
    assert_eq!(back, b"hello");
    drop(s);
    named = server.await.unwrap();
    drop(named);
    // An address nobody binds is refused by the far end, through the relay.
    let nobody = format!("{:016x}:9", c.id());
    let mut s = a.dial(&nobody, T).await.unwrap();
    let err = s.accepted().await.unwrap_err();
    assert!(matches!(err, Error::NoSuchAddress(_)), "{err}");
}

#[tokio::test]
async fn a_dial_told_to_wait_for_a_route_waits_for_it_and_no_longer() {
    // chanserv's server dials a client's reply address as soon as the request arrives,
    // and the request can outrun the ROUTES naming the client's node (seen across
    // hosts, scripts/hosts.sh): that dial waits for the route; a plain one fails.
    let (a, b, c) = (node(), node(), node());
    let _ab = link(&a, &b).await;
    let mut port = c.bind(":0").unwrap();
    let there = format!("{:016x}:{}", c.id(), &port.local_addr().vaddr()[1..]);
    let err = a.dial(&there, T).await.unwrap_err();
    assert!(matches!(err, Error::NoSuchAddress(_)), "{err}");
    let quick = DialOptions::new(Duration::from_millis(200)).wait_for_route(true);
    let err = a.dial(&there, quick).await.unwrap_err();
    assert!(matches!(err, Error::NoSuchAddress(_)), "{err}");

    let waiting = a.dial(&there, DialOptions::new(T).wait_for_route(true));
    tokio::pin!(waiting);
    // Still waiting, not failed (without the option it fails at once, as above).
    assert!(timeout(Duration::from_millis(100), &mut waiting)
        .await
        .is_err());
    let (_bc, s) = tokio::join!(link(&b, &c), waiting);
    let mut s = s.expect("routed once C joined");
    s.write_all(b"late").await.unwrap();
    s.shutdown().await.unwrap();
    let (mut far, _) = timeout(T, port.accept()).await.unwrap().unwrap();
    let mut got = Vec::new();
    timeout(T, far.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"late");
}

#[tokio::test]
async fn a_stalled_consumer_at_a_bounds_what_c_produces_and_b_holds() {
    let (a, b, c, _ab, _bc) = chain().await;
    let polled = Arc::new(AtomicU64::new(0));
    let p2 = polled.clone();
    let _svc = Server::new(c.clone())
        .listen_and_serve("svc", move |_| {
            stalled_and_flowing(&p2, numbered(20_000, 1024))
        })
        .unwrap();
    a.wait_for_name("svc", T).await.unwrap();
    let client = Client::new(a.clone()).unwrap();
    let mut sources = client.lookup_and_post("svc", "", &[]).await.unwrap();
    let mut stalled = sources.next().await.unwrap().unwrap();
    let mut flowing = sources.next().await.unwrap().unwrap();
    assert_eq!(stalled.next().await.unwrap().unwrap().len(), 1024);
    let mut n = 0;
    while let Some(f) = flowing.next().await {
        f.unwrap();
        n += 1;
    }
    assert_eq!(
        n, 20_000,
        "the other source flowed through the relay to its end"
    );
    // 20 MiB went by; the stalled producer was polled only for what credit allows
    // (the client's window and read-ahead) and what the streams on both links hold.
    let bound = 2048;
    let before = polled.load(Ordering::Relaxed);
    assert!(before < bound, "stalled producer polled {before} times");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = polled.load(Ordering::Relaxed);
    assert!(after < bound, "{after}");
    // What B holds: the bytes it took from C and has not passed on to A.
    let st = b.stats();
    let on = |peer: NodeId| st.links.iter().find(|l| l.peer == peer).unwrap().clone();
    let (from_c, to_a) = (on(c.id()).bytes_in, on(a.id()).bytes_out);
    assert!(
        from_c > 20_000_000,
        "B relayed the flowing source ({from_c} bytes)"
    );
    let held = from_c.saturating_sub(to_a);
    assert!(held < 1 << 20, "B holds {held} bytes of a stalled source");
}

#[tokio::test]
async fn dropping_the_sources_at_a_drops_the_producer_at_c() {
    let (a, _b, c, _ab, _bc) = chain().await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    let _svc = Server::new(c.clone())
        .listen_and_serve("svc", move |_| {
            let endless = Counted {
                polled: Arc::default(),
                dropped: tx.lock().unwrap().take(),
                size: 1024,
            };
            stream::iter([Source::new("endless", endless)])
        })
        .unwrap();
    a.wait_for_name("svc", T).await.unwrap();
    let client = Client::new(a.clone()).unwrap();
    let mut sources = client.lookup_and_post("svc", "", &[]).await.unwrap();
    let mut s = sources.next().await.unwrap().unwrap();
    for _ in 0..10 {
        s.next().await.unwrap().unwrap();
    }
    drop(s);
    drop(sources);
    timeout(T, rx)
        .await
        .expect("the producer at C was dropped")
        .unwrap();
}

#[tokio::test]
async fn a_dead_relay_fails_streams_in_the_keepalive_window_and_routes_go_round() {
    let (a, b, c, ab, bc) = chain().await;
    let d = node();
    let ad = link(&a, &d).await;
    let dc = link(&d, &c).await;
    let _svc = Server::new(c.clone())
        .listen_and_serve("svc", |_| {
            let endless = Counted {
                polled: Arc::default(),
                dropped: None,
                size: 1024,
            };
            stream::iter([Source::new("endless", endless)])
        })
        .unwrap();
    a.wait_for_name("svc", T).await.unwrap();
    // Both paths are two hops; ties go to the lower id.
    let via = a
        .routes()
        .into_iter()
        .find(|r| r.node == c.id())
        .unwrap()
        .path[0];
    let (other, frozen) = if via == b.id() {
        (d.clone(), [ab, bc])
    } else {
        (b.clone(), [ad, dc])
    };
    let client = Client::new(a.clone()).unwrap();
    let mut sources = client.lookup_and_post("svc", "", &[]).await.unwrap();
    let mut s = sources.next().await.unwrap().unwrap();
    s.next().await.unwrap().unwrap();
    // The relay goes silent (a frozen host): only keep-alive can tell.
    for f in &frozen {
        f.freeze(Dir::Both);
    }
    let t0 = Instant::now();
    let end = async {
        loop {
            match s.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    };
    let err = timeout(KEEPALIVE_TIMEOUT + Duration::from_secs(2), end)
        .await
        .expect("the source failed within the keep-alive window");
    assert!(
        err.is_some_and(|e| e.is_closed()),
        "a cut, not a completion"
    );
    let took = t0.elapsed();
    assert!(
        took >= KEEPALIVE_TIMEOUT / 2,
        "failed after {took:?}: not by keep-alive?"
    );
    // A new request goes round, through the other node.
    let until = Instant::now() + T;
    loop {
        let r = a.routes().into_iter().find(|r| r.node == c.id());
        if r.is_some_and(|r| r.path == [other.id(), c.id()]) {
            break;
        }
        assert!(Instant::now() < until, "no route through the other node");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut sources = client.lookup_and_post("svc", "", &[]).await.unwrap();
    let mut s = sources.next().await.unwrap().unwrap();
    assert_eq!(s.next().await.unwrap().unwrap().len(), 1024);
}

/// Waits until every node's routes match the graph of live links: each reaches
/// exactly the nodes connected to it, by a shortest path whose every step is a
/// live link.
async fn converged(nodes: &[Node], live: &BTreeSet<(usize, usize)>) {
    let ids: Vec<NodeId> = nodes.iter().map(Node::id).collect();
    let idx = |id: NodeId| ids.iter().position(|i| *i == id).unwrap();
    let linked = |x: usize, y: usize| live.contains(&(x.min(y), x.max(y)));
    let until = Instant::now() + T;
    'again: loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(Instant::now() < until, "routes did not converge");
        for (i, n) in nodes.iter().enumerate() {
            let mut dist = BTreeMap::from([(i, 0usize)]);
            let mut frontier = vec![i];
            while let Some(x) = frontier.pop() {
                for y in 0..nodes.len() {
                    if linked(x, y) && dist.get(&y).is_none_or(|d| *d > dist[&x] + 1) {
                        dist.insert(y, dist[&x] + 1);
                        frontier.push(y);
                    }
                }
            }
            let routes = n.routes();
            if routes.len() != dist.len() - 1 {
                continue 'again;
            }
            for r in routes {
                let to = idx(r.node);
                if dist.get(&to) != Some(&r.path.len()) {
                    continue 'again;
                }
                let mut at = i;
                for hop in &r.path {
                    if !linked(at, idx(*hop)) {
                        continue 'again;
                    }
                    at = idx(*hop);
                }
                let name = format!("n{to}");
                assert_eq!(r.names, [name], "names of node {to}");
            }
        }
        return;
    }
}

#[tokio::test]
async fn a_five_node_mesh_reaches_every_name_and_survives_cuts_without_loops() {
    let nodes: Vec<Node> = (0..5).map(|_| node()).collect();
    let mut listeners = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let mut l = n.bind(&format!("n{i}")).unwrap();
        listeners.push(tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 1];
                    if s.read_exact(&mut b).await.is_ok() {
                        // Answers with its own number; a dialer gone is fine.
                        let _ = s.write_all(&[i as u8]).await;
                        let _ = s.shutdown().await;
                    }
                });
            }
        }));
    }
    // A ring with two chords.
    let edges = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 4), (0, 2), (1, 3)];
    let mut faults = BTreeMap::new();
    for (x, y) in edges {
        faults.insert((x, y), link(&nodes[x], &nodes[y]).await);
    }
    let mut live: BTreeSet<(usize, usize)> = edges.into_iter().collect();
    converged(&nodes, &live).await;
    let reach_all = |nodes: Vec<Node>| async move {
        for (i, n) in nodes.iter().enumerate() {
            for (j, m) in nodes.iter().enumerate() {
                // Only names of nodes still connected to this one.
                let connected = n.routes().iter().any(|r| r.node == m.id()) || i == j;
                if !connected {
                    continue;
                }
                let mut s = n.dial(&format!("n{j}"), T).await.unwrap();
                s.write_all(&[1]).await.unwrap();
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await.unwrap();
                assert_eq!(usize::from(b[0]), j, "n{j} dialed from {i}");
            }
        }
    };
    reach_all(nodes.clone()).await;
    // Cut links in a fixed pseudo-random order; routes reconverge each time.
    for (x, y) in [(0, 2), (3, 4), (1, 2), (0, 1)] {
        faults[&(x, y)].cut();
        live.remove(&(x, y));
        converged(&nodes, &live).await;
        reach_all(nodes.clone()).await;
    }
    for l in listeners {
        l.abort();
    }
}

/// The next `Names` event, skipping link events.
async fn next_names(events: &mut chanserv::LinkEvents) -> (NodeId, Vec<String>, Vec<String>) {
    loop {
        match timeout(T, events.recv()).await.unwrap().unwrap() {
            LinkEvent::Names {
                node,
                added,
                removed,
                ..
            } => return (node, added, removed),
            _ => continue,
        }
    }
}

#[tokio::test]
async fn names_appearing_and_disappearing_two_hops_away_are_events() {
    let (a, b, c, _ab, bc) = chain().await;
    let mut events = a.subscribe();
    let svc = || vec!["svc".to_string()];
    let l = c.bind("svc").unwrap();
    assert_eq!(next_names(&mut events).await, (c.id(), svc(), vec![]));
    drop(l);
    assert_eq!(next_names(&mut events).await, (c.id(), vec![], svc()));
    let _l = c.bind("svc").unwrap();
    assert_eq!(next_names(&mut events).await, (c.id(), svc(), vec![]));
    // C becomes unreachable: its names go, B's link to A stays.
    bc.cut();
    assert_eq!(next_names(&mut events).await, (c.id(), vec![], svc()));
    assert!(a.providers("svc").is_empty());
    assert_eq!(
        a.routes().iter().map(|r| r.node).collect::<Vec<_>>(),
        [b.id()]
    );
}

#[tokio::test]
async fn names_of_another_environment_stay_invisible_but_relay_works() {
    let (a, b, c) = (node_in("prod"), node_in("staging"), node_in("prod"));
    let _ab = link(&a, &b).await;
    let _bc = link(&b, &c).await;
    let mut events = a.subscribe();
    let _on_b = b.bind("svc").unwrap();
    let _on_c = c.bind("svc").unwrap();
    // C is prod like A: seen through B, which is staging and whose name is not.
    a.wait_for_name("svc", T).await.unwrap();
    assert_eq!(a.providers("svc"), [c.id()]);
    assert!(b.providers("svc") == [b.id()], "B sees only its own");
    let named = next_names(&mut events).await;
    assert_eq!(named, (c.id(), vec!["svc".to_string()], vec![]));
    let routes = a.routes();
    let to_b = routes.iter().find(|r| r.node == b.id()).unwrap();
    assert!(to_b.names.is_empty() && to_b.environment == "staging");
}

#[tokio::test]
async fn buckets_range_over_every_provider_however_far() {
    let (a, b, c, _ab, _bc) = chain().await;
    let mut ls = Vec::new();
    for n in [&a, &b, &c] {
        let mut l = n.bind("kv").unwrap();
        let id = n.id();
        ls.push(tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let _ = s.write_all(&id.to_le_bytes()).await;
                let _ = s.shutdown().await;
            }
        }));
    }
    a.wait_for_providers("kv", 3, T).await.unwrap();
    let mut owners = BTreeSet::new();
    for i in 0..60 {
        let mut s = a
            .dial("kv", DialOptions::new(T).bucket(format!("b{i}")))
            .await
            .unwrap();
        let mut id = [0u8; 8];
        s.read_exact(&mut id).await.unwrap();
        owners.insert(u64::from_le_bytes(id));
    }
    assert_eq!(owners, [a.id(), b.id(), c.id()].into_iter().collect());
    for l in ls {
        l.abort();
    }
}
