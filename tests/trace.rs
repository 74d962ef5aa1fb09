//! Tracing: one request can be followed across hosts by (reply address, request id);
//! a link's lines say which peer and address they are about.

use std::time::Duration;

use bytes::Bytes;
use chanserv::{Client, Server, Source};
use futures::{stream, StreamExt};
use tokio::time::timeout;

#[path = "support/mesh.rs"]
mod mesh;
use mesh::pair;

const T: Duration = Duration::from_secs(20);

/// Collects what a `fmt` subscriber writes.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn one_request_can_be_followed_across_hosts_by_its_id() {
    let out = Captured::default();
    let w = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || w.clone())
        .finish();
    // The one test of this binary, with a global subscriber: a scoped one races with
    // tracing's per-callsite interest cache when other tests run on other threads.
    tracing::subscriber::set_global_default(subscriber).unwrap();
    timeout(T, async {
        let (a, b) = pair().await;
        let _svc = Server::new(a)
            .listen_and_serve("traced", |_| {
                stream::iter([Source::new("s", stream::iter([Bytes::from("f")]))])
            })
            .unwrap();
        b.wait_for_name("traced", T).await.unwrap();
        let client = Client::new(b).unwrap();
        for _ in 0..2 {
            let mut sources = client.lookup_and_post("traced", "", &[]).await.unwrap();
            while let Some(s) = sources.next().await {
                drop(s.unwrap());
            }
        }
    })
    .await
    .expect("hung");
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    // The client's line for request 2 names its reply address; the server's span
    // for that request carries the same two fields.
    let posting = text
        .lines()
        .find(|l| l.contains("posting") && l.contains("request=2"))
        .unwrap_or_else(|| panic!("no client line for request 2 in:\n{text}"));
    let reply = posting
        .split_whitespace()
        .find_map(|w| w.strip_prefix("reply="))
        .expect("reply field");
    let server = format!("request=2 reply={reply}");
    assert!(
        text.lines().any(|l| l.contains("service=traced")
            && l.contains(&server)
            && l.contains("request read")),
        "no server line with {server} in:\n{text}"
    );
    // A link's own lines (here: the names its peer announced) carry the link's span:
    // which peer, at which address.
    assert!(
        text.lines()
            .any(|l| l.contains("link{peer=") && l.contains("addr=") && l.contains("peer names")),
        "no line in a link span in:\n{text}"
    );
}
