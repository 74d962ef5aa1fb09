//! The server's side of credit on a child stream (`PROTOCOL.md`, "Credit"): what the
//! client said it consumed, what that lets the pump send, the flushes waiting for it,
//! and whether the client confirmed the end.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::oneshot;

use crate::error::Error;
use crate::proto::credit::{ChildMsg, INITIAL_WINDOW};

/// What the client told the server on one child stream, and what was sent.
pub(super) struct Back {
    /// Cost of every frame staged so far.
    pub(super) sent: u64,
    /// Cost of the frames the consumer took, as last reported.
    consumed: u64,
    /// The most `sent` may reach: `consumed + window` of the last CREDIT.
    limit: u64,
    /// The client confirmed that its consumer took the end.
    pub(super) done: bool,
    /// Flushes waiting for the consumer: (cost sent before the flush, its waiter).
    syncs: VecDeque<(u64, oneshot::Sender<()>)>,
    rbuf: BytesMut,
}

impl Back {
    pub(super) fn new() -> Self {
        Back {
            sent: 0,
            consumed: 0,
            limit: INITIAL_WINDOW.into(),
            done: false,
            syncs: VecDeque::new(),
            rbuf: BytesMut::new(),
        }
    }

    /// True when a frame of `cost` may go now: it fits the credit, or the consumer
    /// took everything sent (so a frame larger than the window still goes, alone).
    pub(super) fn allows(&self, cost: u64) -> bool {
        self.sent + cost <= self.limit || self.sent == self.consumed
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
        self.consumed = self.consumed.max(consumed);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_moves_the_limit_and_a_big_frame_goes_alone() {
        let mut b = Back::new();
        assert!(b.allows(INITIAL_WINDOW.into()));
        b.sent = 10_000;
        assert!(!b.allows(10_000), "over the initial window");
        b.on_message(ChildMsg::Credit {
            consumed: 10_000,
            window: 100,
        })
        .unwrap();
        assert!(
            b.allows(1 << 20),
            "nothing in flight: one frame of any size"
        );
        b.sent += 1 << 20;
        assert!(!b.allows(1));
    }

    #[test]
    fn flushes_resolve_in_order_once_consumed() {
        let mut b = Back::new();
        b.sent = 100;
        let (tx1, mut rx1) = oneshot::channel();
        b.sync(tx1);
        b.sent = 200;
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
        let mut b = Back::new();
        b.sent = 5;
        assert!(b
            .on_message(ChildMsg::Credit {
                consumed: 6,
                window: 0
            })
            .is_err());
    }
}
