//! An endless producer for tests: counts how many frames were taken from it and
//! reports its drop (so a test sees backpressure and cancellation reach it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

/// Yields `size`-byte frames of 7s forever.
pub struct Counted {
    /// Frames taken so far.
    pub polled: Arc<AtomicU64>,
    /// Told when the producer is dropped.
    pub dropped: Option<tokio::sync::oneshot::Sender<()>>,
    pub size: usize,
}

impl futures::Stream for Counted {
    type Item = Bytes;
    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Bytes>> {
        self.polled.fetch_add(1, Ordering::Relaxed);
        std::task::Poll::Ready(Some(Bytes::from(vec![7u8; self.size])))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(tx) = self.dropped.take() {
            // The test may have stopped listening; nothing to tell then.
            let _ = tx.send(());
        }
    }
}

/// The sources of a backpressure test: "stalled", an endless [`Counted`] of 1 KiB
/// frames counting into `polled`, beside "flowing", the frames of `flowing`.
pub fn stalled_and_flowing<S>(
    polled: &Arc<AtomicU64>,
    flowing: S,
) -> impl futures::Stream<Item = chanserv::Source>
where
    S: futures::Stream<Item = Bytes> + Send + 'static,
{
    let endless = Counted {
        polled: polled.clone(),
        dropped: None,
        size: 1024,
    };
    futures::stream::iter([
        chanserv::Source::new("stalled", endless),
        chanserv::Source::new("flowing", flowing),
    ])
}
