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

/// Keep-alive of one link: a PING every `interval`, dead after `timeout` of silence.
/// Pure: no clock of its own.
#[derive(Debug)]
pub(super) struct KeepAlive {
    interval: Duration,
    timeout: Duration,
    last_heard: Instant,
    next_ping: Instant,
}

impl KeepAlive {
    pub(super) fn new(now: Instant, interval: Duration, timeout: Duration) -> Self {
        KeepAlive {
            interval,
            timeout,
            last_heard: now,
            next_ping: now + interval,
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

    /// Handles one control message (a frame's body); returns the reply, if any.
    fn on_control(&self, link: &Arc<Link>, body: Bytes) -> Option<Control> {
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
            Control::Pong => {}
            Control::Names(names) => {
                let names = self.authorize_names(link, names);
                tracing::debug!(peer = %hex(link.peer), ?names, "peer names");
                self.state
                    .lock()
                    .unwrap()
                    .peer_names
                    .insert(link.peer, names);
                self.names_changed.notify_waiters();
            }
            Control::Rotate => link.rotate(),
            Control::Refused(names) => self.on_names_refused(link, names),
            Control::Unknown(k) => {
                tracing::debug!(peer = %hex(link.peer), "unknown control message {k}")
            }
        }
        None
    }
}

impl ControlLoop<'_> {
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
                    if let Some(reply) = self.inner.on_control(self.link, body) {
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
}
