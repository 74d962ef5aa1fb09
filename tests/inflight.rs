//! The server's bound on what one request's sources have in flight together
//! (`ServerConfig::max_request_in_flight`): many sources whose consumer reads none of
//! them hold far less than their windows would allow, and a source the consumer then
//! reads still moves while the others hold the bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chanserv::{Client, Server, ServerConfig, Source};
use futures::{stream, StreamExt};
use tokio::time::timeout;

#[path = "support/mesh.rs"]
mod mesh;

const T: Duration = Duration::from_secs(30);
const SOURCES: usize = 64;
const FRAME: usize = 1024;
/// A frame's cost against credit and the bound: its length and its 4-byte header.
const COST: usize = FRAME + 4;
const BOUND: usize = 256 << 10;
/// What a source may have in flight beyond the bound (the server's `OWN_ROOM`).
const OWN: usize = 8 << 10;

#[tokio::test]
async fn unread_sources_hold_the_bound_and_a_read_one_still_moves() {
    timeout(T, async {
        let (server, client) = mesh::pair().await;
        let made = Arc::new(AtomicUsize::new(0));
        let m = made.clone();
        let cfg = ServerConfig::default().max_request_in_flight(BOUND);
        let svc = Server::with_config(server, cfg)
            .listen_and_serve("many", move |_| {
                let m = m.clone();
                stream::iter(0..SOURCES).map(move |i| {
                    let m = m.clone();
                    // Endless frames of the source's index, counted as made.
                    let frames = stream::repeat_with(move || {
                        m.fetch_add(1, Ordering::SeqCst);
                        Bytes::from(vec![i as u8; FRAME])
                    });
                    Source::new(vec![i as u8], frames)
                })
            })
            .unwrap();
        client.wait_for_name("many", T).await.unwrap();
        let client = Client::new(client).unwrap();
        let mut sources = client.lookup_and_post("many", "", &[]).await.unwrap();
        let mut held = Vec::new();
        while held.len() < SOURCES {
            held.push(sources.next().await.unwrap().unwrap());
        }
        // Every source waits: on its own credit or on the request's bound.
        while svc.stats().blocked.len() < SOURCES {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before = svc.stats().frames_sent as usize;
        // Allowed: the bound, each source's own room, and a frame per source of
        // rounding.
        let allowed = (BOUND + SOURCES * OWN) / COST + SOURCES;
        let windows = SOURCES * (64 << 10) / COST;
        assert!(
            before <= allowed,
            "{before} frames sent, at most {allowed} allowed ({windows} by windows alone)"
        );
        // The last source, held back by the others, moves when read: 2 MiB of it.
        let last = held.last_mut().unwrap();
        assert_eq!(last.header(), &[SOURCES as u8 - 1][..]);
        for _ in 0..2048 {
            let f = last.next().await.unwrap().unwrap();
            assert_eq!(f, vec![SOURCES as u8 - 1; FRAME]);
        }
        // Only that source sent more: the others still hold at most the bound.
        let after = svc.stats().frames_sent as usize;
        assert!(
            after <= allowed + 2048 + (64 << 10) / COST,
            "{after} frames sent after 2048 were read"
        );
        // The producers made no more than was sent and what the announcements and the
        // pumps hold (16 KiB of frames per source at most).
        let made = made.load(Ordering::SeqCst);
        assert!(made <= after + SOURCES * (16 + 2), "{made} frames made");
        drop(held);
        drop(sources);
    })
    .await
    .expect("a source held back by the bound never moved");
}
