//! Linking nodes for tests: over loopback TCP, or over an in-memory pipe.

#![allow(dead_code)] // each test binary uses what it needs

use chanserv::Node;

/// A server node listening on loopback and a client node joined to it (the join
/// detached: it lives as long as the client node).
pub async fn pair() -> (Node, Node) {
    let (a, b) = (Node::new(), Node::new());
    let addr = a.listen("127.0.0.1:0").await.unwrap();
    b.join(addr).await.unwrap().detach();
    (a, b)
}

/// Links `client` to `server` over an in-memory pipe (no reconnection).
pub async fn link(client: &Node, server: &Node) {
    let (a, b) = tokio::io::duplex(1 << 16);
    let s = server.clone();
    let accept = tokio::spawn(async move { s.attach(b, false).await });
    assert_eq!(client.attach(a, true).await.unwrap(), server.id());
    accept.await.unwrap().unwrap();
}
