//! The server's side of credit on a child stream (`PROTOCOL.md`, "Credit"): what the
//! client said it consumed, what that lets the pump send, the flushes waiting for it,
//! and whether the client confirmed the end.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::futures::Notified;
use tokio::sync::{oneshot, Notify};

use crate::error::Error;
use crate::proto::credit::{ChildMsg, INITIAL_WINDOW};

/// What a source may always have in flight, whatever its request's [`InFlight`]: one
/// write batch, so a source its consumer waits on moves a batch per round trip.
pub(super) const OWN_ROOM: u64 = 8 * 1024;

/// The bytes one request's sources sent and the client has not said it consumed,
/// bounded by `ServerConfig::max_request_in_flight`: credit bounds each source, this
/// bounds their sum (a thousand sources are not a thousand initial windows).
#[derive(Debug)]
pub(super) struct InFlight {
    limit: u64,
    now: AtomicU64,
    /// Told whenever bytes in flight were consumed: a source held back by this
    /// bound, not by its own credit, waits for it.
    freed: Notify,
}

impl InFlight {
    pub(super) fn new(limit: usize) -> Self {
        InFlight {
            limit: limit as u64,
            now: AtomicU64::new(0),
            freed: Notify::new(),
        }
    }

    fn fits(&self, cost: u64) -> bool {
        // Relaxed: the pumps of one request run in one task; the bound is advisory
        // between them, never a safety property.
        self.now.load(Ordering::Relaxed).saturating_add(cost) <= self.limit
    }

    fn add(&self, n: u64) {
        self.now.fetch_add(n, Ordering::Relaxed);
    }

    fn sub(&self, n: u64) {
        if n == 0 {
            // A source that ends with everything consumed frees nothing.
            return;
        }
        self.now.fetch_sub(n, Ordering::Relaxed);
        self.freed.notify_waiters();
    }

    /// Resolves the next time bytes in flight are consumed (once polled).
    pub(super) fn freed(&self) -> Notified<'_> {
        self.freed.notified()
    }

    /// Bytes in flight now.
    #[cfg(test)]
    pub(super) fn now(&self) -> u64 {
        self.now.load(Ordering::Relaxed)
    }
}

/// What the client told the server on one child stream, and what was sent.
pub(super) struct Back {
    /// Cost of every frame staged so far (see [`Back::staged`]).
    sent: u64,
    /// Cost of the frames the consumer took, as last reported.
    consumed: u64,
    /// The most `sent` may reach: `consumed + window` of the last CREDIT.
    limit: u64,
    /// The client confirmed that its consumer took the end.
    pub(super) done: bool,
    /// Flushes waiting for the consumer: (cost sent before the flush, its waiter).
    syncs: VecDeque<(u64, oneshot::Sender<()>)>,
    rbuf: BytesMut,
    /// What this source's request has in flight, this source's share included.
    inflight: Arc<InFlight>,
}

impl Back {
    pub(super) fn new(inflight: Arc<InFlight>) -> Self {
        Back {
            inflight,
            sent: 0,
            consumed: 0,
            limit: INITIAL_WINDOW.into(),
            done: false,
            syncs: VecDeque::new(),
            rbuf: BytesMut::new(),
        }
    }

    /// True when a frame of `cost` may go now: it fits the credit and the request's
    /// bytes in flight (or this source's own room), or the consumer took everything
    /// sent (so a frame larger than the window still goes, alone).
    #[inline]
    pub(super) fn allows(&self, cost: u64) -> bool {
        let own = self.sent - self.consumed + cost;
        (self.sent + cost <= self.limit && (own <= OWN_ROOM || self.inflight.fits(cost)))
            || self.sent == self.consumed
    }

    /// What this source's request has in flight.
    pub(super) fn inflight(&self) -> &Arc<InFlight> {
        &self.inflight
    }

    /// A frame of `cost` was staged.
    #[inline]
    pub(super) fn staged(&mut self, cost: u64) {
        self.sent += cost;
        self.inflight.add(cost);
    }

    /// A flush of everything staged so far: resolved when the consumer took it.
    pub(super) fn sync(&mut self, waiter: oneshot::Sender<()>) {
        if self.consumed >= self.sent {
            // Err: the producer stopped waiting.
            let _ = waiter.send(());
        } else {
            self.syncs.push_back((self.sent, waiter));
        }
    }

    fn on_message(&mut self, msg: ChildMsg) -> Result<(), Error> {
        let consumed = match msg {
            ChildMsg::Credit { consumed, window } => {
                self.limit = consumed.saturating_add(window.into());
                consumed
            }
            ChildMsg::Done { consumed } => {
                self.done = true;
                consumed
            }
        };
        if consumed > self.sent {
            return Err(Error::Protocol(format!(
                "the client reports {consumed} bytes consumed of {} sent",
                self.sent
            )));
        }
        if consumed > self.consumed {
            self.inflight.sub(consumed - self.consumed);
            self.consumed = consumed;
        }
        while let Some((at, _)) = self.syncs.front() {
            if *at > self.consumed {
                break;
            }
            let (_, waiter) = self.syncs.pop_front().expect("just seen");
            // Err: the producer stopped waiting.
            let _ = waiter.send(());
        }
        Ok(())
    }

    /// Reads and applies what the client wrote. Ready only when the client is gone:
    /// its side ended (it let go of the source, after DONE or not), the stream was
    /// reset or refused, the link died, or it wrote something that is not credit.
    /// Pending otherwise, with every message that had arrived applied.
    pub(super) fn poll_gone<S: AsyncRead + Unpin>(
        &mut self,
        s: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Error> {
        loop {
            loop {
                match ChildMsg::decode(&mut self.rbuf) {
                    Ok(Some(m)) => {
                        if let Err(e) = self.on_message(m) {
                            return Poll::Ready(io::Error::other(e));
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return Poll::Ready(io::Error::other(e)),
                }
            }
            // Credit messages are small: a little room at a time bounds what a
            // hostile client makes us hold to one message.
            let mut b = [0u8; 64];
            let mut rb = ReadBuf::new(&mut b);
            match Pin::new(&mut *s).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    return Poll::Ready(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "the client closed the source",
                    ))
                }
                Poll::Ready(Ok(())) => self.rbuf.extend_from_slice(rb.filled()),
                Poll::Ready(Err(e)) => return Poll::Ready(e),
            }
        }
    }
}

impl Drop for Back {
    fn drop(&mut self) {
        self.inflight.sub(self.sent - self.consumed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn back() -> Back {
        Back::new(Arc::new(InFlight::new(usize::MAX)))
    }

    #[test]
    fn credit_moves_the_limit_and_a_big_frame_goes_alone() {
        let mut b = back();
        assert!(b.allows(INITIAL_WINDOW.into()));
        let half = u64::from(INITIAL_WINDOW) / 2 + 1;
        b.staged(half);
        assert!(!b.allows(half), "over the initial window");
        b.on_message(ChildMsg::Credit {
            consumed: half,
            window: 100,
        })
        .unwrap();
        assert!(
            b.allows(1 << 20),
            "nothing in flight: one frame of any size"
        );
        b.staged(1 << 20);
        assert!(!b.allows(1));
    }

    #[test]
    fn the_request_bound_holds_a_source_past_its_own_room_until_credit_frees_it() {
        let inflight = Arc::new(InFlight::new(10_000));
        let mut a = Back::new(inflight.clone());
        let mut b = Back::new(inflight.clone());
        a.staged(10_000);
        assert!(!a.allows(1), "the bound is taken");
        assert!(
            b.allows(OWN_ROOM),
            "a source's own room, whatever the bound"
        );
        b.staged(OWN_ROOM);
        assert!(!b.allows(1), "past its own room and the bound");
        assert_eq!(inflight.now(), 10_000 + OWN_ROOM);
        a.on_message(ChildMsg::Credit {
            consumed: 9_000,
            window: INITIAL_WINDOW,
        })
        .unwrap();
        assert!(!b.allows(1_000), "not room enough yet");
        assert!(b.allows(800), "a's consumer freed room in the request");
        drop(a);
        assert_eq!(inflight.now(), OWN_ROOM, "a source gone frees what it held");
        drop(b);
        assert_eq!(inflight.now(), 0);
    }

    #[test]
    fn flushes_resolve_in_order_once_consumed() {
        let mut b = back();
        b.staged(100);
        let (tx1, mut rx1) = oneshot::channel();
        b.sync(tx1);
        b.staged(100);
        let (tx2, mut rx2) = oneshot::channel();
        b.sync(tx2);
        b.on_message(ChildMsg::Credit {
            consumed: 150,
            window: 1,
        })
        .unwrap();
        assert!(rx1.try_recv().is_ok());
        assert!(rx2.try_recv().is_err());
        b.on_message(ChildMsg::Done { consumed: 200 }).unwrap();
        assert!(rx2.try_recv().is_ok());
        assert!(b.done);
    }

    #[test]
    fn consuming_more_than_was_sent_is_a_protocol_error() {
        let mut b = back();
        b.staged(5);
        assert!(b
            .on_message(ChildMsg::Credit {
                consumed: 6,
                window: 0
            })
            .is_err());
    }
}
