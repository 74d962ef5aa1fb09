//! The control stream of a link (`PROTOCOL.md`, "Control stream"): names, keep-alive
//! and rotation. Keep-alive is a state machine fed with `now` ([`KeepAlive`]); the
//! loop around it only moves bytes and timers.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant};

use super::authz::CTL_REFUSED;
use super::link::{hex, Link};
use super::node::Inner;
use super::registry::parse_names;
use super::stream::MuxStream;
use super::{CTL_NAMES, CTL_PING, CTL_PONG, CTL_ROTATE};
use crate::frame::FrameCodec;

/// Largest control message: a NAMES message of thousands of names fits.
const CONTROL_LIMIT: usize = 16 << 20;

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
        let opened = tokio::select! {
            _ = link.cancel.cancelled() => return false,
            r = timeout(self.cfg.keepalive_timeout, self.open_control(link)) => r,
        };
        let mut writer = match opened {
            Ok(Ok(w)) => w,
            Ok(Err(e)) => {
                tracing::debug!(peer = %hex(link.peer), "control stream: {e}");
                return false;
            }
            Err(_) => {
                tracing::warn!(peer = %hex(link.peer), "control stream: keep-alive timeout");
                return false;
            }
        };
        let codec = FrameCodec::new().with_limit(CONTROL_LIMIT);
        let mut reader: Option<MuxStream> = None;
        let mut inbound = Some(inbound);
        let (mut rbuf, mut wbuf) = (BytesMut::new(), BytesMut::new());
        let mut ka = KeepAlive::new(
            Instant::now(),
            self.cfg.keepalive_interval,
            self.cfg.keepalive_timeout,
        );
        let encode = |m: &[u8], wbuf: &mut BytesMut| {
            if let Err(e) = codec.encode(m, wbuf) {
                tracing::error!(peer = %hex(link.peer), "control message not sent: {e}");
            }
        };
        loop {
            tokio::select! {
                _ = link.cancel.cancelled() => return link.is_draining(),
                _ = tokio::time::sleep_until(ka.deadline()) => match ka.poll(Instant::now()) {
                    Some(KeepAliveAction::Dead) => {
                        tracing::warn!(peer = %hex(link.peer), "link: keep-alive timeout");
                        return false;
                    }
                    Some(KeepAliveAction::Ping) => encode(&[CTL_PING], &mut wbuf),
                    None => continue,
                },
                _ = link.idle.notified() => {
                    if link.is_draining() && self.retirable(link) {
                        return true;
                    }
                    continue;
                }
                m = out.recv() => match m {
                    Some(m) => encode(&m, &mut wbuf),
                    None => return false,
                },
                s = async { inbound.as_mut().expect("guarded").await }, if inbound.is_some() => {
                    inbound = None;
                    match s {
                        Ok(s) => reader = Some(s),
                        Err(_) => return false,
                    }
                    continue;
                }
                n = async { reader.as_mut().expect("guarded").read_buf(&mut rbuf).await }, if reader.is_some() => {
                    match n {
                        Ok(0) | Err(_) => return link.is_draining(),
                        Ok(_) => ka.heard(Instant::now()),
                    }
                    loop {
                        match codec.decode(&mut rbuf) {
                            Ok(Some(msg)) => {
                                if let Some(reply) = self.on_control(link, msg) {
                                    encode(reply, &mut wbuf);
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!(peer = %hex(link.peer), "bad control message: {e}");
                                return false;
                            }
                        }
                    }
                }
            }
            if !wbuf.is_empty() {
                let send = async {
                    writer.write_all(&wbuf).await?;
                    writer.flush().await
                };
                if !matches!(timeout(self.cfg.keepalive_timeout, send).await, Ok(Ok(()))) {
                    tracing::warn!(peer = %hex(link.peer), "link: control write failed");
                    return false;
                }
                wbuf.clear();
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

    /// Handles one control message; returns the reply to send, if any.
    fn on_control(&self, link: &Arc<Link>, mut msg: Bytes) -> Option<&'static [u8]> {
        if msg.is_empty() {
            return None;
        }
        match msg.get_u8() {
            CTL_PING => return Some(&[CTL_PONG]),
            CTL_PONG => {}
            CTL_NAMES => {
                let names = self.authorize_names(link, parse_names(msg));
                tracing::debug!(peer = %hex(link.peer), ?names, "peer names");
                self.state
                    .lock()
                    .unwrap()
                    .peer_names
                    .insert(link.peer, names);
                self.names_changed.notify_waiters();
            }
            CTL_ROTATE => link.rotate(),
            CTL_REFUSED => self.on_names_refused(link, msg),
            other => tracing::debug!(peer = %hex(link.peer), "unknown control message {other}"),
        }
        None
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
