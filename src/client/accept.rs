//! The client's one accept loop: every child stream of every request arrives here
//! and is routed by its (request, source) prefix.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::{Routes, Slot};
use crate::error::{Error, ErrorFn, Timeout};
use crate::mux::{from_io, Listener};
use crate::proto::chanserv::ChildPrefix;
use crate::source::BoxIo;

/// The client's one accept loop: reads each child stream's (request, source) prefix
/// and hands the stream to its `Source`, or drops it (reset) when nobody waits for it.
pub(super) async fn accept_children<L: Listener>(
    mut listener: L,
    routes: Arc<Mutex<Routes>>,
    stop: CancellationToken,
    on_error: Option<ErrorFn>,
) {
    let report = |e: &Error| match &on_error {
        Some(f) => f(e),
        None => tracing::debug!("chanserv client: {e}"),
    };
    let mut prefixes = FuturesUnordered::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((mut s, _)) => prefixes.push(async move {
                    let mut p = [0u8; ChildPrefix::LEN];
                    // The flush sends the accepted status now: a stream whose consumer
                    // has not reached it yet must not count among the link's
                    // unacknowledged opens, or the server could open no more (and
                    // the one source the consumer waits for might be among those).
                    let prefix = async {
                        s.read_exact(&mut p).await?;
                        s.flush().await
                    };
                    let r = tokio::time::timeout(Duration::from_secs(30), prefix).await;
                    match r {
                        Ok(Ok(())) => ChildPrefix::decode(&p).map(|p| (p, s)),
                        Ok(Err(e)) => Err(from_io(e)),
                        Err(_) => Err(Error::Timeout(Timeout::ChanAccept)),
                    }
                }),
                Err(_) => return,
            },
            Some(r) = prefixes.next(), if !prefixes.is_empty() => match r {
                Ok((p, s)) => {
                    let key = (p.request, p.source);
                    let s: BoxIo = Box::new(s);
                    let mut r = routes.lock().unwrap();
                    if !r.live.contains(&key.0) {
                        continue; // dropped: the request is gone, reset the stream
                    }
                    match r.slots.remove(&key) {
                        // A Source dropped while waiting: its stream is dropped
                        // (reset) with the unsent value, which is what we want.
                        Some(Slot::Waiting(tx)) => drop(tx.send(s)),
                        Some(Slot::Arrived(_)) => {
                            drop(r);
                            report(&Error::Protocol(format!("source {} of request {} opened twice", key.1, key.0)));
                        }
                        None => { r.slots.insert(key, Slot::Arrived(s)); }
                    }
                }
                Err(e) => report(&e),
            },
        }
    }
}
