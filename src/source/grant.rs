//! The client's side of credit on a child stream (`PROTOCOL.md`, "Credit"): what the
//! consumer took, what to grant the server, and when a source's window grows.
//!
//! A source starts with [`INITIAL_WINDOW`] of credit. Its window doubles only when
//! the window is what held it back: the server said it waited for credit (a BLOCKED
//! word), the consumer took everything sent before that word, and then found nothing
//! more to take. A slow consumer never grows its window; a fast one over a long link
//! grows it towards the link's bandwidth × delay, up to
//! [`ClientConfig::max_source_window`](crate::ClientConfig::max_source_window) and
//! within the client's [`ReceiveBudget`] shared by all its sources.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWrite;

use crate::proto::credit::{cost, ChildMsg, INITIAL_WINDOW};

/// The most a consumer takes before its credit goes back. Half a window alone would
/// let a large window's credit go back in large steps, and a sender that waits a
/// round trip for each step is held to about half the window per round trip
/// (16 MiB windows over 20 ms: ~280 MiB/s); smaller steps keep it sending.
const CREDIT_STEP: u32 = 256 * 1024;

/// The bytes a client's sources may hold beyond their initial windows, shared by all
/// its sources on every link.
#[derive(Debug)]
pub(crate) struct ReceiveBudget {
    limit: u64,
    used: AtomicU64,
}

impl ReceiveBudget {
    pub(crate) fn new(limit: usize) -> Self {
        ReceiveBudget {
            limit: limit as u64,
            used: AtomicU64::new(0),
        }
    }

    /// Takes `n` bytes of the budget, or nothing when fewer are left.
    fn take(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + n <= self.limit).then_some(u + n)
            })
            .is_ok()
    }

    fn give_back(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Bytes taken by growing windows now.
    #[cfg(test)]
    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

/// One source's credit, as its reader keeps it.
pub(crate) struct Grant {
    /// Cost of the frames decoded so far.
    received: u64,
    /// Cost of the frames the consumer took.
    consumed: u64,
    /// `consumed` as last told to the server.
    reported: u64,
    window: u32,
    max_window: u32,
    /// Where the server's flushes sit (cost received before each).
    syncs: VecDeque<u64>,
    /// Where the server last said it waited for credit.
    blocked_at: Option<u64>,
    /// The consumer took everything before a BLOCKED word since it last starved.
    passed_block: bool,
    /// Messages waiting to be written.
    out: BytesMut,
    /// DONE was queued.
    done: bool,
    budget: Arc<ReceiveBudget>,
    /// Window beyond the initial one, taken from the budget.
    charged: u64,
}

impl Grant {
    pub(crate) fn new(budget: Arc<ReceiveBudget>, max_window: u32) -> Self {
        Grant {
            received: 0,
            consumed: 0,
            reported: 0,
            window: INITIAL_WINDOW,
            max_window: max_window.max(INITIAL_WINDOW),
            syncs: VecDeque::new(),
            blocked_at: None,
            passed_block: false,
            out: BytesMut::new(),
            done: false,
            budget,
            charged: 0,
        }
    }

    pub(crate) fn decoded_frame(&mut self, len: usize) {
        self.received += cost(len);
    }

    pub(crate) fn decoded_sync(&mut self) {
        self.syncs.push_back(self.received);
    }

    pub(crate) fn decoded_blocked(&mut self) {
        self.blocked_at = Some(self.received);
    }

    /// The consumer took a frame of `len` bytes: credit goes back once half the
    /// window (at most [`CREDIT_STEP`]) was consumed, or when a flush was reached.
    #[inline]
    pub(crate) fn consumed(&mut self, len: usize) {
        self.consumed += cost(len);
        // The common case, per frame: nothing is due yet.
        if self.consumed - self.reported < self.step()
            && self.syncs.is_empty()
            && self.blocked_at.is_none()
        {
            return;
        }
        self.settle(false);
    }

    /// How much the consumer takes before credit goes back.
    #[inline]
    fn step(&self) -> u64 {
        u64::from((self.window / 2).min(CREDIT_STEP))
    }

    /// True when messages wait to be written.
    #[inline]
    pub(crate) fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// The consumer found nothing to take: the window grows if it is what held the
    /// source back, and any flush reached is reported.
    pub(crate) fn starving(&mut self) {
        self.settle(true);
    }

    fn settle(&mut self, starving: bool) {
        let mut due = self.consumed - self.reported >= self.step();
        while self.syncs.front().is_some_and(|&at| at <= self.consumed) {
            self.syncs.pop_front();
            due = true;
        }
        if self.blocked_at.is_some_and(|at| at <= self.consumed) {
            self.blocked_at = None;
            self.passed_block = true;
        }
        if starving && std::mem::take(&mut self.passed_block) {
            // The server waits for credit and the consumer took all it had: say so
            // even when the window cannot grow (the server's own bound on what a
            // request has in flight may be what held it back).
            due |= self.grow() || self.consumed > self.reported;
        }
        if due && !self.done {
            self.reported = self.consumed;
            ChildMsg::Credit {
                consumed: self.consumed,
                window: self.window,
            }
            .encode(&mut self.out);
        }
    }

    /// Doubles the window within its maximum and the budget; true if it grew.
    fn grow(&mut self) -> bool {
        let target = self.window.saturating_mul(2).min(self.max_window);
        let more = u64::from(target - self.window);
        if more == 0 || !self.budget.take(more) {
            return false;
        }
        self.charged += more;
        self.window = target;
        tracing::debug!(window = target, "source window grew");
        true
    }

    /// The consumer took the end: tell the server, once.
    pub(crate) fn done(&mut self) {
        if !std::mem::replace(&mut self.done, true) {
            ChildMsg::Done {
                consumed: self.consumed,
            }
            .encode(&mut self.out);
        }
    }

    /// Writes what is queued. Ready once nothing is left (written, or the stream
    /// failed: its reader finds out why); Pending while the stream cannot take it.
    pub(crate) fn poll_write<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        w: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        if self.out.is_empty() {
            return Poll::Ready(());
        }
        while !self.out.is_empty() {
            match Pin::new(&mut *w).poll_write(cx, &self.out) {
                Poll::Ready(Ok(n)) if n > 0 => self.out.advance(n),
                Poll::Ready(_) => self.out.clear(),
                Poll::Pending => return Poll::Pending,
            }
        }
        match Pin::new(&mut *w).poll_flush(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(()),
        }
    }

    /// Forgets what is queued: the stream is gone.
    pub(crate) fn clear(&mut self) {
        self.out.clear();
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        self.budget.give_back(self.charged);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(budget: usize) -> (Grant, Arc<ReceiveBudget>) {
        let b = Arc::new(ReceiveBudget::new(budget));
        (Grant::new(b.clone(), 1 << 20), b)
    }

    fn sent(g: &mut Grant) -> Vec<ChildMsg> {
        let mut v = Vec::new();
        while let Some(m) = ChildMsg::decode(&mut g.out).unwrap() {
            v.push(m);
        }
        v
    }

    #[test]
    fn credit_goes_back_at_half_the_window() {
        let (mut g, _) = grant(0);
        let frame = INITIAL_WINDOW as usize / 3;
        g.decoded_frame(frame);
        g.decoded_frame(frame);
        g.consumed(frame);
        assert!(sent(&mut g).is_empty(), "under half of the window");
        g.consumed(frame);
        let c = ChildMsg::Credit {
            consumed: 2 * cost(frame),
            window: INITIAL_WINDOW,
        };
        assert_eq!(sent(&mut g), vec![c]);
    }

    #[test]
    fn a_large_window_gives_credit_back_in_steps() {
        let (mut g, _) = grant(1 << 30);
        g.window = 16 << 20;
        let frame = CREDIT_STEP as usize / 2 - 4;
        for _ in 0..4 {
            g.decoded_frame(frame);
        }
        g.consumed(frame);
        assert!(sent(&mut g).is_empty(), "half a step");
        g.consumed(frame);
        let c = ChildMsg::Credit {
            consumed: u64::from(CREDIT_STEP),
            window: 16 << 20,
        };
        assert_eq!(sent(&mut g), vec![c], "a step, far below half the window");
    }

    #[test]
    fn a_window_grows_only_when_it_held_the_source_back_and_gives_the_budget_back() {
        let (mut g, budget) = grant(1 << 20);
        g.decoded_frame(100);
        g.consumed(100);
        g.starving();
        assert!(
            sent(&mut g).is_empty(),
            "a slow producer: no growth, no message"
        );
        g.decoded_frame(100);
        g.decoded_blocked();
        g.consumed(100);
        g.starving();
        let grown = ChildMsg::Credit {
            consumed: 208,
            window: 2 * INITIAL_WINDOW,
        };
        assert_eq!(sent(&mut g), vec![grown]);
        assert_eq!(budget.used(), INITIAL_WINDOW.into());
        drop(g);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn starving_past_a_block_reports_what_was_taken_even_without_growth() {
        let (mut g, _) = grant(0);
        g.decoded_frame(100);
        g.decoded_blocked();
        g.consumed(100);
        g.starving();
        let c = ChildMsg::Credit {
            consumed: 104,
            window: INITIAL_WINDOW,
        };
        assert_eq!(sent(&mut g), vec![c], "the server waits for this");
        g.starving();
        assert!(sent(&mut g).is_empty(), "nothing new taken: nothing to say");
    }

    #[test]
    fn no_budget_no_growth_and_a_flush_is_reported_when_reached() {
        let (mut g, _) = grant(0);
        g.decoded_frame(10);
        g.decoded_sync();
        g.decoded_blocked();
        g.consumed(10);
        g.starving();
        let c = ChildMsg::Credit {
            consumed: 14,
            window: INITIAL_WINDOW,
        };
        assert_eq!(sent(&mut g), vec![c]);
        g.done();
        g.done();
        assert_eq!(sent(&mut g), vec![ChildMsg::Done { consumed: 14 }]);
    }
}
