//! Typed frames through a real server and client over a node link: values round-trip,
//! a frame that does not decode is an error for that frame alone, and the typed sender
//! feeds a typed source end to end.
#![cfg(feature = "serde")]

use std::time::Duration;

use bytes::Bytes;
use chanserv::typed::{encode, TypedSource};
use chanserv::{Client, Error, Node, Request, ServeHandle, Server, Source};
use futures::{stream, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::time::timeout;

#[path = "support/mesh.rs"]
mod mesh;

const T: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Unit {
    Celsius,
    Kelvin { offset: f32 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reading {
    sensor: String,
    seq: u64,
    values: Vec<i32>,
    unit: Unit,
    note: Option<String>,
}

fn reading(seq: u64) -> Reading {
    Reading {
        sensor: format!("s-{}", seq % 3),
        seq,
        values: (0..seq as i32 % 5).map(|v| v * -7).collect(),
        unit: if seq % 2 == 0 {
            Unit::Celsius
        } else {
            Unit::Kelvin { offset: 273.15 }
        },
        note: (seq % 4 == 0).then(|| "checked".to_string()),
    }
}

/// A service on one node and a client on another, linked in memory.
async fn serve<F, S>(f: F) -> (ServeHandle, Client<Node>)
where
    F: Fn(Request) -> S + Send + Sync + 'static,
    S: Stream<Item = Source> + Send + 'static,
{
    let (server, client) = (Node::new(), Node::new());
    mesh::link(&client, &server).await;
    let handle = Server::new(server).listen_and_serve("typed", f).unwrap();
    client.wait_for_name("typed", T).await.unwrap();
    (handle, Client::new(client).unwrap())
}

/// The request's only source, as a typed view.
async fn one_source<T: serde::de::DeserializeOwned>(client: &Client<Node>) -> TypedSource<T> {
    let mut sources = client.lookup_and_post("typed", "", &[]).await.unwrap();
    let source = sources.next().await.unwrap().unwrap();
    assert!(sources.next().await.is_none(), "one source per request");
    source.typed()
}

#[tokio::test]
async fn a_struct_type_round_trips_in_order_and_completes() {
    timeout(T, async {
        let (_svc, client) = serve(|_| {
            let values = stream::iter((0..500).map(reading));
            stream::iter([Source::from_typed("readings", values)])
        })
        .await;
        let mut readings = one_source::<Reading>(&client).await;
        assert_eq!(readings.header(), &Bytes::from("readings"), "header raw");
        for seq in 0..500 {
            assert_eq!(readings.recv().await.unwrap().unwrap(), reading(seq));
        }
        assert!(readings.recv().await.is_none(), "completion, not failure");
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn a_frame_that_does_not_decode_is_an_error_for_that_frame_alone() {
    timeout(T, async {
        let (_svc, client) = serve(|_| {
            let frames = vec![
                encode(&reading(1)).unwrap(),
                // Not postcard at all: a varint that never ends.
                Bytes::from_static(&[0xff; 12]),
                encode(&reading(2)).unwrap(),
                // A valid value of another type, with bytes left over for `Reading`.
                encode(&(reading(3), 99u8)).unwrap(),
                encode(&reading(4)).unwrap(),
            ];
            stream::iter([Source::new("mixed", stream::iter(frames))])
        })
        .await;
        let mut readings = one_source::<Reading>(&client).await;
        assert_eq!(readings.recv().await.unwrap().unwrap(), reading(1));
        let e = readings.recv().await.unwrap().unwrap_err();
        assert!(e.is_serde() && !e.is_closed() && !e.is_remote(), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("frame 1 (12 bytes)") && msg.contains("Reading"),
            "{msg}"
        );
        assert_eq!(readings.recv().await.unwrap().unwrap(), reading(2));
        let e = readings.recv().await.unwrap().unwrap_err();
        assert!(matches!(&e, Error::Serde(m) if m.contains("frame 3") && m.contains("left over")));
        assert_eq!(readings.recv().await.unwrap().unwrap(), reading(4));
        assert!(
            readings.recv().await.is_none(),
            "the source still completes"
        );
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn the_typed_sender_feeds_a_typed_source_and_its_abort_fails_it() {
    timeout(T, async {
        let (_svc, client) = serve(|req| {
            let (tx, source) = Source::typed_channel::<Reading>("live", 4);
            let abort = req.body == "abort";
            tokio::spawn(async move {
                for seq in 0..200 {
                    tx.send(&reading(seq)).await.unwrap();
                }
                if abort {
                    tx.abort("sensor unplugged").await;
                }
                // Otherwise the drop completes the source.
            });
            stream::iter([source])
        })
        .await;
        for body in ["complete", "abort"] {
            let mut sources = client.lookup_and_post("typed", body, &[]).await.unwrap();
            let mut live = sources.next().await.unwrap().unwrap().typed::<Reading>();
            for seq in 0..200 {
                assert_eq!(live.recv().await.unwrap().unwrap(), reading(seq));
            }
            match live.recv().await {
                None => assert_eq!(body, "complete"),
                Some(Err(Error::SourceFailed(m))) => {
                    assert_eq!((body, m.as_str()), ("abort", "sensor unplugged"))
                }
                other => panic!("{body}: {other:?}"),
            }
            assert!(live.recv().await.is_none());
        }
    })
    .await
    .expect("hung");
}

#[tokio::test]
async fn dropping_the_typed_source_closes_the_typed_sender() {
    timeout(T, async {
        let (done_tx, done_rx) = oneshot::channel();
        let done_tx = std::sync::Mutex::new(Some(done_tx));
        let (_svc, client) = serve(move |_| {
            let (tx, source) = Source::typed_channel::<u64>("endless", 1);
            let done = done_tx.lock().unwrap().take();
            tokio::spawn(async move {
                let mut n = 0u64;
                let end = loop {
                    match tx.send(&n).await {
                        Ok(()) => n += 1,
                        Err(e) => break e,
                    }
                };
                if let Some(done) = done {
                    // Err: the test gave up waiting, and its timeout reports that.
                    let _ = done.send(end);
                }
            });
            stream::iter([source])
        })
        .await;
        let mut numbers = one_source::<u64>(&client).await;
        for n in 0..3 {
            assert_eq!(numbers.recv().await.unwrap().unwrap(), n);
        }
        drop(numbers);
        let end = done_rx.await.unwrap();
        assert!(matches!(end, Error::Closed), "{end:?}");
    })
    .await
    .expect("hung");
}
