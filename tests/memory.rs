//! The client's memory is bounded in bytes (`ClientConfig`, "Memory"): 1,000 sources
//! of 64 KiB frames whose consumer stops after one frame each keep the process's
//! resident memory under `S × max(16 KiB, F + 4) + receive_budget`, plus 64 KiB per
//! source for buffers and state. Without credit, yamux's 256 KiB window per stream
//! allowed up to 250 MiB here.
//!
//! Alone in its binary: it measures the whole process's RSS. The producers hand out
//! one shared frame, so the server side allocates nothing per frame and what grows
//! is what the client holds (and yamux's bounded send queue).

use std::time::Duration;

use bytes::Bytes;
use chanserv::{Client, ClientConfig, Server, Source};
use futures::{stream, StreamExt};
use tokio::time::timeout;

#[path = "support/mesh.rs"]
mod mesh;

const SOURCES: usize = 1000;
const FRAME: usize = 64 << 10;
const BUDGET: usize = 16 << 20;
/// The allowance per open source for its buffers and state (see `ClientConfig`).
const STATE: usize = 64 << 10;

fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

#[tokio::test]
async fn a_thousand_slow_sources_of_64_kib_frames_stay_under_the_formula() {
    timeout(Duration::from_secs(60), async {
        let (server, client) = mesh::pair().await;
        let frame = Bytes::from(vec![5u8; FRAME]);
        let svc = Server::new(server)
            .listen_and_serve("slow", move |_| {
                let frame = frame.clone();
                stream::iter((0..SOURCES).map(move |_| {
                    let f = frame.clone();
                    Source::new("s", stream::repeat_with(move || f.clone()))
                }))
            })
            .unwrap();
        client
            .wait_for_name("slow", Duration::from_secs(10))
            .await
            .unwrap();
        let cfg = ClientConfig::default().receive_budget(BUDGET);
        let client = Client::with_config(client, cfg).unwrap();
        let before = rss();
        let mut sources = client.lookup_and_post("slow", "", &[]).await.unwrap();
        let mut held = Vec::new();
        while let Some(s) = sources.next().await {
            held.push(s.unwrap());
        }
        assert_eq!(held.len(), SOURCES);
        // One frame from each, then the consumer stops reading.
        for s in &mut held {
            assert_eq!(s.next().await.unwrap().unwrap().len(), FRAME);
        }
        // Every producer waits for credit: nothing more is on its way.
        while svc.stats().blocked.len() < SOURCES {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let grown = rss().saturating_sub(before);
        let frames = SOURCES * (16 << 10).max(FRAME + 4) + BUDGET;
        // Buffers and state of an open source, both ends in this one process.
        let state = SOURCES * STATE;
        eprintln!(
            "RSS grew {} MiB; frames {} MiB + state {} MiB",
            grown >> 20,
            frames >> 20,
            state >> 20
        );
        assert!(
            grown < frames + state,
            "RSS grew {grown} bytes, over the formula's {frames} + {state}"
        );
        drop(held);
    })
    .await
    .unwrap();
}
