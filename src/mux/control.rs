//! The control stream of a link (`PROTOCOL.md`, "Control stream"): names, keep-alive
//! and rotation. Keep-alive is a state machine fed with `now` ([`KeepAlive`]); the
//! loop around it only moves bytes and timers.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant};

use super::link::{hex, Link};
use super::node::Inner;
use super::stream::{read_frames, MuxStream};
use crate::error::Result;
use crate::proto::frame::FrameCodec;
use crate::proto::link::{Control, CONTROL_LIMIT};

/// What keep-alive asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeepAliveAction {
    /// Send a PING now.
    Ping,
    /// Nothing was heard for the timeout: the link is dead.
    Dead,
}

/// Keep-alive of one link: a PING every `interval`, dead after `timeout` of silence,
/// and the round trip of PING to PONG. Pure: no clock of its own.
///
/// A peer answers every PING with a PONG, in order, on one stream: the n-th PONG
/// answers the n-th PING. One PING at a time is timed (the first sent while none
/// is), so a slow peer with several PINGs outstanding still gets each measured
/// round trip matched to its own PING. A PONG beyond the PINGs sent is ignored.
#[derive(Debug)]
pub(super) struct KeepAlive {
    interval: Duration,
    timeout: Duration,
    last_heard: Instant,
    next_ping: Instant,
    /// PINGs sent so far.
    pings: u64,
    /// PONGs received so far (never more than `pings`).
    pongs: u64,
    /// The PING being timed: its number (counting from 1) and when it was sent.
    timed: Option<(u64, Instant)>,
}

impl KeepAlive {
    pub(super) fn new(now: Instant, interval: Duration, timeout: Duration) -> Self {
        KeepAlive {
            interval,
            timeout,
            last_heard: now,
            next_ping: now + interval,
            pings: 0,
            pongs: 0,
            timed: None,
        }
    }

    /// A PONG arrived at `now`: the round trip of the PING it answers, if that one
    /// was timed.
    pub(super) fn pong(&mut self, now: Instant) -> Option<Duration> {
        if self.pongs == self.pings {
            return None;
        }
        self.pongs += 1;
        match self.timed {
            Some((n, sent)) if n == self.pongs => {
                self.timed = None;
                Some(now.saturating_duration_since(sent))
            }
            _ => None,
        }
    }

    /// Something arrived from the peer.
    pub(super) fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// When [`poll`](Self::poll) has something to say next.
    pub(super) fn deadline(&self) -> Instant {
        self.next_ping.min(self.last_heard + self.timeout)
    }

    /// What to do at `now`.
    pub(super) fn poll(&mut self, now: Instant) -> Option<KeepAliveAction> {
        if now >= self.last_heard + self.timeout {
            return Some(KeepAliveAction::Dead);
        }
        if now >= self.next_ping {
            self.next_ping = now + self.interval;
            self.pings += 1;
            if self.timed.is_none() {
                self.timed = Some((self.pings, now));
            }
            return Some(KeepAliveAction::Ping);
        }
        None
    }
}

/// What one turn of the control loop decided.
enum Turn {
    /// Go on (after writing what the turn queued).
    Go,
    /// The link must close: true when it retired after a rotation.
    Exit(bool),
}

/// A control loop's state between turns, but for its reading half (which the
/// loop's `select!` borrows while the other branches wait).
struct ControlLoop<'a> {
    inner: &'a Inner,
    link: &'a Arc<Link>,
    writer: MuxStream,
    codec: FrameCodec,
    wbuf: BytesMut,
    ka: KeepAlive,
}

impl Inner {
    /// The link's control loop: names, pings, rotation. Returns when the link must
    /// close: true when it retired after a rotation, false when it died or was
    /// cancelled.
    pub(super) async fn control(
        self: Arc<Self>,
        link: &Arc<Link>,
        mut out: mpsc::UnboundedReceiver<Bytes>,
        inbound: oneshot::Receiver<MuxStream>,
    ) -> bool {
        let Some(writer) = self.open_control_in_time(link).await else {
            return false;
        };
        let cfg = &self.cfg;
        let mut ctl = ControlLoop {
            inner: &self,
            link,
            writer,
            codec: FrameCodec::new().with_limit(CONTROL_LIMIT),
            wbuf: BytesMut::new(),
            ka: KeepAlive::new(
                Instant::now(),
                cfg.keepalive_interval,
                cfg.keepalive_timeout,
            ),
        };
        let codec = ctl.codec;
        let mut reader: Option<MuxStream> = None;
        let mut inbound = Some(inbound);
        let mut rbuf = BytesMut::new();
        loop {
            let turn = tokio::select! {
                _ = link.cancel.cancelled() => Turn::Exit(link.is_draining()),
                _ = tokio::time::sleep_until(ctl.ka.deadline()) => ctl.on_timer(),
                _ = link.idle.notified() => match link.is_draining() && self.retirable(link) {
                    true => Turn::Exit(true),
                    false => Turn::Go,
                },
                m = out.recv() => match m {
                    // Whole frames already (see `Link::send_control`).
                    Some(m) => {
                        ctl.wbuf.extend_from_slice(&m);
                        Turn::Go
                    }
                    None => Turn::Exit(false),
                },
                s = async { inbound.as_mut().expect("guarded").await }, if inbound.is_some() => {
                    inbound = None;
                    match s {
                        Ok(s) => {
                            reader = Some(s);
                            Turn::Go
                        }
                        Err(_) => Turn::Exit(false),
                    }
                }
                r = async {
                    read_frames(reader.as_mut().expect("guarded"), &codec, &mut rbuf).await
                }, if reader.is_some() => ctl.on_read(r, &mut rbuf),
            };
            if let Turn::Exit(retired) = turn {
                return retired;
            }
            if !ctl.flush().await {
                return false;
            }
        }
    }

    /// Opens this side's control stream, within the keep-alive timeout; `None` when
    /// the link is cancelled first or the stream does not open.
    async fn open_control_in_time(&self, link: &Arc<Link>) -> Option<MuxStream> {
        let opened = tokio::select! {
            _ = link.cancel.cancelled() => return None,
            r = timeout(self.cfg.keepalive_timeout, self.open_control(link)) => r,
        };
        match opened {
            Ok(Ok(w)) => Some(w),
            Ok(Err(e)) => {
                tracing::debug!(peer = %hex(link.peer), "control stream: {e}");
                None
            }
            Err(_) => {
                tracing::warn!(peer = %hex(link.peer), "control stream: keep-alive timeout");
                None
            }
        }
    }

    /// A draining link retires once nothing uses it and a newer link to its peer is
    /// up (so its peer's names stay known). It leaves the routing table here, under the
    /// same lock routes take their count under, so no dial picks it any more.
    fn retirable(&self, link: &Link) -> bool {
        use std::sync::atomic::Ordering;
        let mut st = self.state.lock().unwrap();
        if link.active.load(Ordering::Acquire) != 0 {
            return false;
        }
        let Some(links) = st.links.get_mut(&link.peer) else {
            return false;
        };
        if !links.iter().any(|l| l.id > link.id && !l.is_draining()) {
            return false;
        }
        links.retain(|l| l.id != link.id);
        true
    }
}

impl ControlLoop<'_> {
    /// Handles one control message (a frame's body); returns the reply, if any.
    fn on_control(&mut self, body: Bytes) -> Option<Control> {
        let (inner, link) = (self.inner, self.link);
        let msg = match Control::decode(body) {
            Ok(msg) => msg,
            // An empty message says nothing; it was always ignored.
            Err(e) => {
                tracing::debug!(peer = %hex(link.peer), "control message ignored: {e}");
                return None;
            }
        };
        match msg {
            Control::Ping => return Some(Control::Pong),
            Control::Pong => {
                if let Some(rtt) = self.ka.pong(Instant::now()) {
                    link.rtt.set(rtt);
                }
            }
            Control::Names(names) => {
                let names = inner.authorize_names(link, names);
                tracing::debug!(peer = %hex(link.peer), ?names, "peer names");
                let mut st = inner.state.lock().unwrap();
                st.set_peer_names(link.peer, names);
                inner.refresh(&mut st);
            }
            Control::Routes(ads) => {
                tracing::trace!(peer = %hex(link.peer), routes = ads.len(), "peer routes");
                let mut st = inner.state.lock().unwrap();
                // A peer's routes count only while it is linked (a late message of a
                // link that just closed must not bring them back).
                if st.links.contains_key(&link.peer) {
                    st.routing.set_ads(link.peer, ads);
                    inner.refresh(&mut st);
                }
            }
            Control::Rotate => link.rotate(),
            Control::Refused(names) => inner.on_names_refused(link, names),
            Control::Unknown(k) => {
                tracing::debug!(peer = %hex(link.peer), "unknown control message {k}")
            }
        }
        None
    }

    /// Keep-alive's deadline passed: ping, or declare the link dead.
    fn on_timer(&mut self) -> Turn {
        match self.ka.poll(Instant::now()) {
            Some(KeepAliveAction::Dead) => {
                tracing::warn!(peer = %hex(self.link.peer), "link: keep-alive timeout");
                Turn::Exit(false)
            }
            Some(KeepAliveAction::Ping) => {
                self.queue(&Control::Ping);
                Turn::Go
            }
            None => Turn::Go,
        }
    }

    /// A read of the peer's control stream returned: handle every whole message.
    fn on_read(&mut self, read: Result<usize>, rbuf: &mut BytesMut) -> Turn {
        if !matches!(read, Ok(1..)) {
            // The peer closed it (or the link failed): a retiring link ends so.
            return Turn::Exit(self.link.is_draining());
        }
        self.ka.heard(Instant::now());
        loop {
            match self.codec.decode(rbuf) {
                Ok(Some(body)) => {
                    if let Some(reply) = self.on_control(body) {
                        self.queue(&reply);
                    }
                }
                Ok(None) => return Turn::Go,
                Err(e) => {
                    tracing::warn!(peer = %hex(self.link.peer), "bad control message: {e}");
                    return Turn::Exit(false);
                }
            }
        }
    }

    fn queue(&mut self, msg: &Control) {
        if let Err(e) = msg.encode(&mut self.wbuf) {
            tracing::error!(peer = %hex(self.link.peer), "control message not sent: {e}");
        }
    }

    /// Writes what was queued, within the keep-alive timeout; false when that failed
    /// (the link is then dead).
    async fn flush(&mut self) -> bool {
        if self.wbuf.is_empty() {
            return true;
        }
        let send = async {
            self.writer.write_all(&self.wbuf).await?;
            self.writer.flush().await
        };
        if !matches!(
            timeout(self.inner.cfg.keepalive_timeout, send).await,
            Ok(Ok(()))
        ) {
            tracing::warn!(peer = %hex(self.link.peer), "link: control write failed");
            return false;
        }
        self.wbuf.clear();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_pings_on_interval_and_declares_silence_dead() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut ka = KeepAlive::new(t0, s, 4 * s);
        assert_eq!(ka.deadline(), t0 + s);
        assert_eq!(ka.poll(t0), None);
        assert_eq!(ka.poll(t0 + s), Some(KeepAliveAction::Ping));
        assert_eq!(ka.poll(t0 + s), None, "one ping per interval");
        assert_eq!(ka.deadline(), t0 + 2 * s);
        ka.heard(t0 + 3 * s);
        assert_eq!(ka.poll(t0 + 6 * s), Some(KeepAliveAction::Ping));
        assert_eq!(ka.poll(t0 + 7 * s), Some(KeepAliveAction::Dead));
        let mut quiet = KeepAlive::new(t0, s, 4 * s);
        assert_eq!(quiet.poll(t0 + 4 * s), Some(KeepAliveAction::Dead));
    }

    #[test]
    fn a_pong_is_timed_against_its_own_ping() {
        let t0 = Instant::now();
        let (s, ms) = (Duration::from_secs(1), Duration::from_millis(1));
        let mut ka = KeepAlive::new(t0, s, 10 * s);
        assert_eq!(ka.pong(t0), None, "no PING sent: a stray PONG says nothing");
        assert_eq!(ka.poll(t0 + s), Some(KeepAliveAction::Ping));
        assert_eq!(ka.pong(t0 + s + 7 * ms), Some(7 * ms));
        assert_eq!(ka.pong(t0 + s + 8 * ms), None, "one PONG per PING");
        // A slow peer: PINGs 2 and 3 are out before PONG 2; only PING 2 is timed.
        assert_eq!(ka.poll(t0 + 2 * s), Some(KeepAliveAction::Ping));
        assert_eq!(ka.poll(t0 + 3 * s), Some(KeepAliveAction::Ping));
        assert_eq!(ka.pong(t0 + 3 * s + 500 * ms), Some(1500 * ms));
        // PING 4 goes out before PONG 3: PONG 3 answers PING 3, which was not
        // timed, so it must not be matched to PING 4.
        assert_eq!(ka.poll(t0 + 4 * s), Some(KeepAliveAction::Ping));
        assert_eq!(ka.pong(t0 + 4 * s + ms), None);
        assert_eq!(ka.pong(t0 + 4 * s + 3 * ms), Some(3 * ms));
    }
}
