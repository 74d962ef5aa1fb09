//! TLS links: mutual authentication, peer identities, and who may announce which
//! names. Each refusal is checked on both sides (the refused node's error or log, the
//! refusing node's log), and after each a good peer still links to the same server.
//! Certificates are made here with rcgen (`support/certs.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chanserv::{Error, LinkEvent, LinkEvents, Listener, Multiplexer, Node, NodeConfig, TlsConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::timeout;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;

#[path = "support/certs.rs"]
mod certs;
use certs::Ca;

const T: Duration = Duration::from_secs(20);
const SERVER: &str = "server.test";

/// The log lines of this test's thread, where its nodes' tasks run
/// (`#[tokio::test]` is single-threaded): searchable, and awaitable as they come.
#[derive(Clone, Default)]
struct Logs {
    text: Arc<Mutex<String>>,
    grew: Arc<Notify>,
}

impl Logs {
    /// Captures this thread's logs while the returned guard lives.
    fn capture() -> (Logs, impl Sized) {
        let logs = Logs::default();
        let guard = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
            .finish()
            .set_default();
        (logs, guard)
    }

    /// Waits for a line that contains each of `parts`, and returns it.
    async fn line_with(&self, parts: &[&str]) -> String {
        loop {
            let grew = self.grew.notified();
            tokio::pin!(grew);
            grew.as_mut().enable();
            let found = self
                .text
                .lock()
                .unwrap()
                .lines()
                .find(|l| parts.iter().all(|p| l.contains(p)))
                .map(str::to_owned);
            if let Some(line) = found {
                return line;
            }
            grew.await;
        }
    }
}

struct LogWriter(Logs);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(b);
        self.0.text.lock().unwrap().push_str(&text);
        self.0.grew.notify_waiters();
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Logs {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> LogWriter {
        LogWriter(self.clone())
    }
}

fn tls(cfg: TlsConfig) -> NodeConfig {
    NodeConfig::default().tls(cfg)
}

/// A TLS node listening on loopback TCP and serving `echo`.
async fn server(cfg: TlsConfig) -> (Node, SocketAddr) {
    let node = Node::with_config(tls(cfg));
    let addr = node.listen("127.0.0.1:0").await.unwrap();
    serve(&node, "echo");
    (node, addr)
}

/// Binds `name` on `node`: a stream gets its 2 bytes back, then the node's id.
fn serve(node: &Node, name: &str) {
    let mut l = node.bind(name).unwrap();
    let id = node.id();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 2];
                if s.read_exact(&mut b).await.is_ok() {
                    let answer = [&b[..], &id.to_le_bytes()].concat();
                    // The dialer checks what arrives; a failure here shows there.
                    let _ = s.write_all(&answer).await;
                    let _ = s.shutdown().await; // likewise
                }
            });
        }
    });
}

/// Dials `name` from `node`: the id of the node that answered.
async fn ask(node: &Node, name: &str) -> u64 {
    let mut s = node.dial(name, T).await.unwrap();
    s.write_all(b"hi").await.unwrap();
    let mut b = [0u8; 10];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b[..2], b"hi");
    u64::from_le_bytes(b[2..].try_into().unwrap())
}

async fn up(events: &mut LinkEvents, peer: u64) {
    while let Some(e) = events.recv().await {
        if matches!(&e, LinkEvent::Up(p) if p.node == peer) {
            return;
        }
    }
    panic!("no link up to {peer:016x}");
}

/// A peer with a good certificate links to `server` at `addr`, both sides see each
/// other's identity, and it reaches the server's `echo`.
async fn good_peer_links(ca: &Ca, addr: SocketAddr, server: &Node) {
    let mut events = server.subscribe();
    let node = Node::with_config(tls(ca.node("good.test")));
    let j = node.join(addr).await.expect("a good peer links");
    assert_eq!(j.peer(), server.id());
    up(&mut events, node.id()).await;
    assert_eq!(node.peer_identity(server.id()).as_deref(), Some(SERVER));
    assert_eq!(
        server.peer_identity(node.id()).as_deref(),
        Some("good.test")
    );
    node.wait_for_name("echo", T).await.unwrap();
    assert_eq!(ask(&node, "echo").await, server.id());
    j.leave().await;
}

fn refused_with(e: &Error, part: &str) -> bool {
    matches!(e, Error::Tls(m) if m.contains(part))
}

#[tokio::test]
async fn a_peer_without_a_certificate_is_refused() {
    let (logs, _guard) = Logs::capture();
    timeout(T, async {
        let ca = Ca::new("mesh CA");
        let (server, addr) = server(ca.node(SERVER)).await;
        // A TLS client that trusts the CA but has no certificate of its own.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der()).unwrap();
        let ring = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(ring)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(SERVER).unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .expect("in TLS 1.3 the client is done before the server checks it");
        let e = Node::new().attach(stream, true).await.unwrap_err();
        assert!(refused_with(&e, "requires a certificate"), "{e}");
        logs.line_with(&["inbound link from 127.0.0.1:", "presented no certificate"])
            .await;
        good_peer_links(&ca, addr, &server).await;
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn a_certificate_of_another_ca_is_refused_both_ways() {
    let (logs, _guard) = Logs::capture();
    timeout(T, async {
        let (ca, other) = (Ca::new("mesh CA"), Ca::new("other CA"));
        let (server, addr) = server(ca.node(SERVER)).await;
        // Knows the mesh's CA (it is no secret) but holds a certificate of another.
        let (cert, key) = other.issue_with("intruder.test", |_| {});
        let intruder = TlsConfig::from_pem(ca.pem(), cert, key).unwrap();
        let e = Node::with_config(tls(intruder))
            .join(addr)
            .await
            .unwrap_err();
        assert!(refused_with(&e, "not issued by a CA it trusts"), "{e}");
        logs.line_with(&["inbound link from", "UnknownIssuer"])
            .await;
        // A node of the other mesh refuses the server's certificate in turn.
        let stranger = Node::with_config(tls(other.node("stranger.test")));
        let e = stranger.join(addr).await.unwrap_err();
        assert!(refused_with(&e, "UnknownIssuer"), "{e}");
        logs.line_with(&["inbound link from", "not issued by a CA it trusts"])
            .await;
        good_peer_links(&ca, addr, &server).await;
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let (logs, _guard) = Logs::capture();
    timeout(T, async {
        let ca = Ca::new("mesh CA");
        let (server, addr) = server(ca.node(SERVER)).await;
        let (cert, key) = ca.issue_with("late.test", |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        });
        let late = TlsConfig::from_pem(ca.pem(), cert, key).unwrap();
        let e = Node::with_config(tls(late)).join(addr).await.unwrap_err();
        assert!(refused_with(&e, "expired"), "{e}");
        logs.line_with(&["inbound link from", "certificate expired"])
            .await;
        good_peer_links(&ca, addr, &server).await;
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn a_peer_announces_only_the_names_it_was_given() {
    let (logs, _guard) = Logs::capture();
    timeout(T, async {
        let ca = Ca::new("mesh CA");
        let policy = ca
            .node(SERVER)
            .allow_names("evil.test", ["evil"])
            .allow_names("good.test", ["good-*"]);
        let (server, addr) = server(policy).await;
        let evil = Node::with_config(tls(ca.node("evil.test")));
        serve(&evil, "evil");
        serve(&evil, "good-svc");
        let _evil_link = evil.join(addr).await.unwrap();
        server.wait_for_name("evil", T).await.unwrap();
        // Its other name is not routed to it, and the server says which and whose.
        logs.line_with(&["may not announce", "evil.test", "good-svc"])
            .await;
        assert!(server.providers("good-svc").is_empty());
        let e = server.dial("good-svc", T).await.unwrap_err();
        assert!(matches!(e, Error::NoSuchAddress(_)), "{e}");
        // The announcing side is told.
        logs.line_with(&["the peer refused names", "good-svc"])
            .await;
        assert_eq!(ask(&server, "evil").await, evil.id());
        assert_eq!(
            server.peer_identity(evil.id()).as_deref(),
            Some("evil.test")
        );
        // The peer that was given the name gets its traffic.
        let good = Node::with_config(tls(ca.node("good.test")));
        serve(&good, "good-svc");
        let _good_link = good.join(addr).await.unwrap();
        server.wait_for_name("good-svc", T).await.unwrap();
        assert_eq!(server.providers("good-svc"), vec![good.id()]);
        assert_eq!(ask(&server, "good-svc").await, good.id());
        good_peer_links(&ca, addr, &server).await;
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn an_authenticated_peer_cannot_take_over_another_nodes_id() {
    let (logs, _guard) = Logs::capture();
    timeout(T, async {
        let ca = Ca::new("mesh CA");
        let (server, addr) = server(ca.node(SERVER)).await;
        let mut events = server.subscribe();
        let good = Node::with_config(tls(ca.node("good.test")));
        serve(&good, "good-svc");
        let _good_link = good.join(addr).await.unwrap();
        up(&mut events, good.id()).await;
        let spoof = NodeConfig::default().node_id(good.id());
        let evil = Node::with_config(spoof.tls(ca.node("evil.test")));
        serve(&evil, "good-svc");
        // Its side may see the link come up before the server refuses it: the
        // server's log says what happened.
        let _evil_link = evil.join(addr).await;
        logs.line_with(&["inbound link from", "is linked already as good.test"])
            .await;
        assert_eq!(server.link_count(good.id()), 1);
        assert_eq!(
            server.peer_identity(good.id()).as_deref(),
            Some("good.test")
        );
        server.wait_for_name("good-svc", T).await.unwrap();
        assert_eq!(ask(&server, "good-svc").await, good.id());
        good_peer_links(&ca, addr, &server).await;
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn plaintext_and_tls_nodes_do_not_link() {
    let (logs, _guard) = Logs::capture();
    timeout(T, async {
        let ca = Ca::new("mesh CA");
        let (server, addr) = server(ca.node(SERVER)).await;
        let e = Node::new().join(addr).await.unwrap_err();
        assert!(e.is_protocol() || matches!(e, Error::Io(_)), "{e}");
        logs.line_with(&["inbound link from", "does not speak TLS"])
            .await;
        let plain = Node::new();
        let plain_addr = plain.listen("127.0.0.1:0").await.unwrap();
        let e = Node::with_config(tls(ca.node("x.test")))
            .join(plain_addr)
            .await
            .unwrap_err();
        assert!(refused_with(&e, "plaintext node?"), "{e}");
        good_peer_links(&ca, addr, &server).await;
    })
    .await
    .expect("hung");
}

fn sock(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("chanserv-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p); // a leftover of an earlier run, if any
    p
}

#[tokio::test]
async fn unix_links_run_tls_and_allow_peers_narrows_who_links() {
    let (logs, _guard) = Logs::capture();
    timeout(T, async {
        let ca = Ca::new("mesh CA");
        let path = sock("allow-peers");
        let server = Node::with_config(tls(ca.node(SERVER).allow_peers(["*.good.test"])));
        server.listen_unix(&path).await.unwrap();
        serve(&server, "echo");
        let a = Node::with_config(tls(ca.node("a.good.test")));
        let _a_link = a.join_unix(&path).await.unwrap();
        assert_eq!(a.peer_identity(server.id()).as_deref(), Some(SERVER));
        a.wait_for_name("echo", T).await.unwrap();
        assert_eq!(ask(&a, "echo").await, server.id());
        let b = Node::with_config(tls(ca.node("b.other.test")));
        let e = b.join_unix(&path).await.unwrap_err();
        assert!(refused_with(&e, "our identity may not link"), "{e}");
        logs.line_with(&["inbound link from unix:", "not among the allowed peers"])
            .await;
        let c = Node::with_config(tls(ca.node("c.good.test")));
        let _c_link = c.join_unix(&path).await.unwrap();
        c.wait_for_name("echo", T).await.unwrap();
        assert_eq!(ask(&c, "echo").await, server.id());
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn a_join_relinks_over_mtls_after_the_server_restarts_on_its_port() {
    timeout(T, async {
        let ca = Ca::new("mesh CA");
        let server_tls = ca.node(SERVER);
        let (server, addr) = server(server_tls.clone()).await;
        let fast = Duration::from_millis(5);
        let cfg = tls(ca.node("client.test")).reconnect_backoff(fast, 10 * fast);
        let client = Node::with_config(cfg);
        let mut events = client.subscribe();
        client.join(addr).await.unwrap().detach();
        let e = events.recv().await;
        assert!(
            matches!(&e, Some(LinkEvent::Up(p)) if p.node == server.id()),
            "{e:?}"
        );
        server.shutdown().await;
        // Its `echo` comes and goes by name events first.
        loop {
            match events.recv().await.unwrap() {
                LinkEvent::Down(p) if p.node == server.id() => break,
                LinkEvent::Names { node, .. } if node == server.id() => {}
                other => panic!("{other:?}"),
            }
        }
        let restarted = Node::with_config(tls(server_tls));
        assert_eq!(restarted.listen(addr).await.unwrap(), addr);
        serve(&restarted, "echo");
        let e = events.recv().await;
        assert!(
            matches!(&e, Some(LinkEvent::Up(p)) if p.node == restarted.id()),
            "{e:?}"
        );
        assert_eq!(
            client.peer_identity(restarted.id()).as_deref(),
            Some(SERVER)
        );
        client.wait_for_name("echo", T).await.unwrap();
        assert_eq!(ask(&client, "echo").await, restarted.id());
        assert_eq!(client.links_established(), 2);
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn a_stalled_tls_handshake_times_out_and_others_link_meanwhile() {
    let (logs, _guard) = Logs::capture();
    timeout(T, async {
        let ca = Ca::new("mesh CA");
        let quick = |cfg: TlsConfig| tls(cfg).handshake_timeout(Duration::from_millis(300));
        let server = Node::with_config(quick(ca.node(SERVER)));
        let addr = server.listen("127.0.0.1:0").await.unwrap();
        serve(&server, "echo");
        // Connects and says nothing: the server's TLS accept waits for a ClientHello.
        let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        good_peer_links(&ca, addr, &server).await;
        logs.line_with(&["inbound link from", "link handshake timeout"])
            .await;
        // A listener that accepts and never answers: the dialer's TLS gives up too.
        let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mute_addr = mute.local_addr().unwrap();
        let e = Node::with_config(quick(ca.node("client.test")))
            .join(mute_addr)
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::Timeout(chanserv::Timeout::Handshake)),
            "{e}"
        );
        drop(mute);
    })
    .await
    .expect("hung");
}

#[test]
fn a_tls_config_that_cannot_work_is_refused_with_its_reason() {
    let ca = Ca::new("mesh CA");
    let (cert, key) = ca.issue_with("node.test", |_| {});
    let (_, other_key) = ca.issue_with("other.test", |_| {});
    let tls_err = |r: chanserv::Result<TlsConfig>| match r {
        Err(Error::Tls(m)) => m,
        other => panic!("expected Error::Tls, got {other:?}"),
    };
    let m = tls_err(TlsConfig::from_pem("", &cert, &key));
    assert!(m.contains("CA PEM: no certificate"), "{m}");
    let m = tls_err(TlsConfig::from_pem(ca.pem(), "", &key));
    assert!(m.contains("certificate PEM: no certificate"), "{m}");
    let m = tls_err(TlsConfig::from_pem(ca.pem(), &cert, &other_key));
    assert!(m.contains("certificate and key"), "{m}");
    let (no_name, no_name_key) = ca.issue_with("unnamed.test", |p| p.subject_alt_names.clear());
    let m = tls_err(TlsConfig::from_pem(ca.pem(), no_name, no_name_key));
    assert!(m.contains("no DNS subjectAltName"), "{m}");
    let (wild, wild_key) = ca.issue_with("*.mesh.test", |_| {});
    let m = tls_err(TlsConfig::from_pem(ca.pem(), wild, wild_key));
    assert!(m.contains("wildcard"), "{m}");
    let ok = TlsConfig::from_pem(ca.pem(), &cert, &key).unwrap();
    assert_eq!(ok.identity(), "node.test");
    let missing = std::env::temp_dir().join("chanserv-tls-no-such-file.pem");
    match TlsConfig::from_files(&missing, &missing, &missing) {
        Err(Error::Io(e)) => assert!(e.to_string().contains("no-such-file"), "{e}"),
        other => panic!("expected Error::Io, got {other:?}"),
    }
}
