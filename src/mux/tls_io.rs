//! The byte stream of a TLS link after its handshake ([`TlsIo`]).
//!
//! rustls runs the handshake (`tls_handshake`), then hands over the traffic keys
//! (`rustls::kernel`) and keeps only what computes the next keys on a key update. The
//! records are sealed and opened here, in place (`tls_record`): plaintext written is
//! copied once, straight into the record that carries it, and encrypted there;
//! ciphertext is read from the socket into one buffer (initialised once), decrypted
//! there, and read out from it. That is one copy each way. rustls' own record layer
//! (tokio-rustls) copies twice to four times (a fresh vector per record sent; on
//! receipt its deframer, which reads 4 KiB at a time, its plaintext queue, the
//! reader) and zeroes and reallocates its read buffer as it goes.
//!
//! What the record layer does besides (RFC 8446): a `close_notify` alert ends the
//! read side (EOF) and is sent on shutdown, and EOF without it is an error
//! (truncation); any other alert fails the stream with
//! [`rustls::Error::AlertReceived`]; a peer's `KeyUpdate` renews the read key (and
//! the write key when asked); the write key is renewed before its suite's
//! confidentiality limit. Errors are [`rustls::Error`]s in [`io::Error`]s, as from
//! rustls. A read that fails fails every later read too, and a peer at fault is sent
//! the fatal alert that says why (its record failed to open, was too long, held
//! what it may not), after which nothing more is written.

use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{AlertDescription, ExtractedSecrets, PeerMisbehaved};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::tls_record::{
    alert_for, body_len, closes, failure, post_handshake, unexpected, Key, PostHandshake, ALERT,
    APPLICATION_DATA, HANDSHAKE, HEADER, MAX_PLAIN, MAX_RECORD,
};

/// The read buffer: several records, so one read takes what the socket has.
pub(super) const RX_BUFFER: usize = 128 * 1024;
/// Sealed bytes not yet sent past which a write waits for the socket.
const TX_LIMIT: usize = 256 * 1024;
/// Sealed bytes past which a write sends them on (a flush sends what there is).
const SEND_AT: usize = 64 * 1024;
/// Empty records in a row past which the peer is only wasting our time (as rustls and
/// BoringSSL count them).
const MAX_EMPTY: u8 = 32;

/// A TLS 1.3 stream after its handshake: reads decrypt, writes encrypt (buffered until
/// a flush, as by a `BufWriter`), shutdown sends `close_notify`. Dropping it drops
/// the socket.
pub(super) struct TlsIo<IO> {
    io: IO,
    rx: Rx,
    tx: Tx,
    keys: Keys,
}

/// The read side: `buf` holds ciphertext read and not yet opened (`start..end`), and
/// before it the plaintext of an opened record not yet read (`plain`).
struct Rx {
    buf: Vec<u8>,
    plain: Range<usize>,
    start: usize,
    end: usize,
    key: Key,
    /// The peer sent `close_notify`.
    closed: bool,
    /// Empty records opened in a row.
    empty: u8,
    /// Why a read failed: every later read fails so too.
    failed: Option<(io::ErrorKind, String)>,
}

/// What [`Rx::open_next`] found at the front of the buffer.
#[derive(Debug, PartialEq)]
enum Record {
    /// Not a whole record yet.
    Partial,
    /// A record, opened and handled: application data (now `plain`) or an alert.
    Opened,
    /// A record of handshake messages, at this range of the buffer, for the caller.
    Handshake(Range<usize>),
}

/// The write side: `buf` holds sealed records from `sent` on, then the record being
/// filled (from `open`, its header reserved).
struct Tx {
    buf: Vec<u8>,
    sent: usize,
    open: Option<usize>,
    key: Key,
    /// The write key is renewed before its record number reaches this.
    limit: u64,
    /// The peer asked for a key update: it goes before the next record.
    update: bool,
    /// `close_notify` or a fatal alert is sealed: nothing more may be written.
    closed: bool,
}

/// What rustls keeps after the handshake: how to compute the next traffic keys.
pub(super) enum Keys {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Keys {
    /// The next key of one direction (a key update).
    fn next(&mut self, write: bool) -> io::Result<Key> {
        let r = match (self, write) {
            (Keys::Client(k), true) => k.update_tx_secret(),
            (Keys::Client(k), false) => k.update_rx_secret(),
            (Keys::Server(k), true) => k.update_tx_secret(),
            (Keys::Server(k), false) => k.update_rx_secret(),
        };
        let (seq, secrets) = r.map_err(failure)?;
        Key::new(seq, &secrets)
    }

    /// A `NewSessionTicket` from the peer: only a server may send one.
    fn ticket(&mut self, payload: &[u8]) -> io::Result<()> {
        match self {
            Keys::Client(k) => k.handle_new_session_ticket(payload).map_err(failure),
            Keys::Server(_) => Err(unexpected("a NewSessionTicket from a client")),
        }
    }

    /// How many records one key may seal.
    fn limit(&self) -> u64 {
        let suite = match self {
            Keys::Client(k) => k.negotiated_cipher_suite(),
            Keys::Server(k) => k.negotiated_cipher_suite(),
        };
        let limit = suite
            .tls13()
            .map_or(u64::MAX, |s| s.common.confidentiality_limit);
        // Renew a little early: the KeyUpdate itself is sealed with the old key.
        limit.min(1 << 62).saturating_sub(2)
    }
}

impl Rx {
    /// Opens the next record if the buffer holds all of it. Application data is then
    /// `plain`, and an alert is handled here; handshake messages are left to the
    /// caller, which holds the keys.
    fn open_next(&mut self) -> io::Result<Record> {
        if self.end - self.start < HEADER {
            return Ok(Record::Partial);
        }
        let mut h = [0; HEADER];
        h.copy_from_slice(&self.buf[self.start..self.start + HEADER]);
        let len = body_len(&h)?;
        let body = self.start + HEADER;
        if self.end - body < len {
            return Ok(Record::Partial);
        }
        let (typ, n) = self.key.open(h, &mut self.buf[body..body + len])?;
        self.start = body + len;
        self.empty = if n == 0 { self.empty + 1 } else { 0 };
        if self.empty > MAX_EMPTY {
            let e = rustls::Error::PeerMisbehaved(PeerMisbehaved::TooManyEmptyFragments);
            return Err(failure(e));
        }
        let content = body..body + n;
        match typ {
            APPLICATION_DATA => self.plain = content,
            ALERT => self.closed = closes(&self.buf[content])?,
            HANDSHAKE => return Ok(Record::Handshake(content)),
            _ => return Err(unexpected("a record of an unknown content type")),
        }
        Ok(Record::Opened)
    }

    /// Makes room at the end of the buffer for the rest of the next record.
    fn make_room(&mut self) {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.start + MAX_RECORD > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
    }
}

impl Tx {
    fn new(key: Key, limit: u64) -> Tx {
        Tx {
            buf: Vec::with_capacity(TX_LIMIT + 2 * MAX_RECORD),
            sent: 0,
            open: None,
            key,
            limit,
            update: false,
            closed: false,
        }
    }

    /// Bytes buffered, sealed or not.
    fn pending(&self) -> usize {
        self.buf.len() - self.sent
    }

    /// Where the sealed bytes end.
    fn sealed(&self) -> usize {
        self.open.unwrap_or(self.buf.len())
    }

    /// Puts as much of `data` as the buffer takes into records: how much it took.
    fn append(&mut self, data: &[u8], keys: &mut Keys) -> io::Result<usize> {
        if self.closed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS stream is shut down",
            ));
        }
        if self.update {
            // Nothing written after the peer asked for a key update goes under the
            // old key (RFC 8446, section 4.6.3): the update goes before the next record.
            self.seal()?;
        }
        let mut n = 0;
        while n < data.len() && self.pending() < TX_LIMIT {
            let start = match self.open {
                Some(s) => s,
                None => self.open_record(keys)?,
            };
            let room = MAX_PLAIN - (self.buf.len() - start - HEADER);
            let take = room.min(data.len() - n);
            self.buf.extend_from_slice(&data[n..n + take]);
            n += take;
            if take == room {
                self.seal()?;
            }
        }
        Ok(n)
    }

    /// Starts a record (renewing the key first when due): where it starts.
    fn open_record(&mut self, keys: &mut Keys) -> io::Result<usize> {
        if self.update || self.key.seq >= self.limit {
            self.update_key(keys, false)?;
        }
        if self.sent == self.buf.len() {
            self.buf.clear();
            self.sent = 0;
        } else if self.buf.capacity() - self.buf.len() < MAX_RECORD {
            self.buf.drain(..self.sent);
            self.sent = 0;
        }
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; HEADER]);
        self.open = Some(start);
        Ok(start)
    }

    /// Seals the record being filled, if any.
    fn seal(&mut self) -> io::Result<()> {
        match self.open.take() {
            Some(start) => self.key.seal(&mut self.buf, start, APPLICATION_DATA),
            None => Ok(()),
        }
    }

    /// Seals a record of its own for `msg`, of inner content type `typ`.
    fn seal_message(&mut self, typ: u8, msg: &[u8]) -> io::Result<()> {
        self.seal()?;
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; HEADER]);
        self.buf.extend_from_slice(msg);
        self.key.seal(&mut self.buf, start, typ)
    }

    /// Sends a `KeyUpdate` (asking the peer to update too if `ask`) under the old
    /// key, then uses the next.
    fn update_key(&mut self, keys: &mut Keys, ask: bool) -> io::Result<()> {
        self.seal_message(HANDSHAKE, &[24, 0, 0, 1, u8::from(ask)])?;
        self.key = keys.next(true)?;
        self.update = false;
        Ok(())
    }

    /// Seals `close_notify` after what was written.
    fn close(&mut self) -> io::Result<()> {
        self.end(1, AlertDescription::CloseNotify)
    }

    /// Seals the alert `what` of `level` (1 warning, 2 fatal) after what was written,
    /// unless the stream is closed already: the last record.
    fn end(&mut self, level: u8, what: AlertDescription) -> io::Result<()> {
        if !self.closed {
            self.seal_message(ALERT, &[level, what.into()])?;
            self.closed = true;
        }
        Ok(())
    }
}

impl<IO> TlsIo<IO> {
    /// Opens the next record in the read buffer and acts on its handshake messages:
    /// whether there was a whole one.
    fn open_next(&mut self) -> io::Result<bool> {
        let msgs = match self.rx.open_next()? {
            Record::Partial => return Ok(false),
            Record::Opened => return Ok(true),
            Record::Handshake(msgs) => msgs,
        };
        let (rx, tx, keys) = (&mut self.rx, &mut self.tx, &mut self.keys);
        post_handshake(&rx.buf[msgs], |msg| match msg {
            PostHandshake::KeyUpdate { ask } => {
                rx.key = keys.next(false)?;
                tx.update |= ask;
                Ok(())
            }
            PostHandshake::Ticket(ticket) => keys.ticket(ticket),
        })?;
        Ok(true)
    }
}

impl<IO: AsyncWrite + Unpin> TlsIo<IO> {
    /// Writes sealed records to the socket until at most `keep` bytes of them are
    /// left.
    fn poll_send(&mut self, cx: &mut Context<'_>, keep: usize) -> Poll<io::Result<()>> {
        let end = self.tx.sealed();
        while end - self.tx.sent > keep {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.tx.buf[self.tx.sent..end]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.tx.sent += n;
        }
        Poll::Ready(Ok(()))
    }

    /// After a read failed with `e`: every later read fails so too, and a peer at
    /// fault is sent the fatal alert that says why, after which nothing is written.
    fn fail(&mut self, cx: &mut Context<'_>, e: &io::Error) {
        self.rx.failed = Some((e.kind(), e.to_string()));
        if let Some(alert) = alert_for(e) {
            if self.tx.end(2, alert).is_ok() {
                // Sent if the socket takes it now. The read's error is what the caller
                // hears of; a peer that does not take the alert sees the socket close.
                let _ = self.poll_send(cx, 0);
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> TlsIo<IO> {
    /// Reads into `out` what the next records hold.
    fn poll_records(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let rx = &mut self.rx;
            if !rx.plain.is_empty() {
                let n = rx.plain.len().min(out.remaining());
                out.put_slice(&rx.buf[rx.plain.start..rx.plain.start + n]);
                rx.plain.start += n;
                return Poll::Ready(Ok(()));
            }
            if rx.closed || out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if self.open_next()? {
                continue;
            }
            let rx = &mut self.rx;
            rx.make_room();
            let mut into = ReadBuf::new(&mut rx.buf[rx.end..]);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut into))?;
            let n = into.filled().len();
            if n == 0 {
                // Truncation: the peer's data may have been cut short.
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )));
            }
            rx.end += n;
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsIo<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some((kind, why)) = &this.rx.failed {
            return Poll::Ready(Err(io::Error::new(*kind, why.clone())));
        }
        let r = ready!(this.poll_records(cx, out));
        if let Err(e) = &r {
            this.fail(cx, e);
        }
        Poll::Ready(r)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for TlsIo<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.tx.pending() >= TX_LIMIT {
            ready!(this.poll_send(cx, TX_LIMIT - MAX_RECORD))?;
        }
        let n = this.tx.append(data, &mut this.keys)?;
        if this.tx.sealed() - this.tx.sent >= SEND_AT {
            // What the socket does not take now goes with the next write or flush.
            if let Poll::Ready(Err(e)) = this.poll_send(cx, 0) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.tx.seal()?;
        ready!(this.poll_send(cx, 0))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.tx.close()?;
        ready!(this.poll_send(cx, 0))?;
        match ready!(Pin::new(&mut this.io).poll_shutdown(cx)) {
            // Not connected any more is as good as shut down.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            r => Poll::Ready(r),
        }
    }
}

impl<IO> TlsIo<IO> {
    /// The stream after the handshake on `io`, with the traffic keys rustls handed
    /// over: `buf[left]` is ciphertext read already, `early` the plaintext the peer
    /// sent before it, `closed` whether `close_notify` followed that.
    pub(super) fn new(
        io: IO,
        keys: Keys,
        secrets: &ExtractedSecrets,
        (buf, left): (Vec<u8>, Range<usize>),
        early: &[u8],
        closed: bool,
    ) -> io::Result<TlsIo<IO>> {
        let key = Key::new(secrets.rx.0, &secrets.rx.1)?;
        let mut rx = Rx::after_handshake(buf, left, early, key);
        rx.closed = closed;
        let tx = Tx::new(Key::new(secrets.tx.0, &secrets.tx.1)?, keys.limit());
        Ok(TlsIo { io, rx, tx, keys })
    }
}

impl Rx {
    /// The read side after the handshake: the ciphertext left in `buf[left]`,
    /// preceded by the plaintext the peer sent already.
    fn after_handshake(mut buf: Vec<u8>, left: Range<usize>, early: &[u8], key: Key) -> Rx {
        let p = early.len();
        let (plain, start, end) = if p <= left.start {
            buf[left.start - p..left.start].copy_from_slice(early);
            (left.start - p..left.start, left.start, left.end)
        } else {
            let mut fresh = vec![0; RX_BUFFER.max(p + left.len() + MAX_RECORD)];
            fresh[..p].copy_from_slice(early);
            fresh[p..p + left.len()].copy_from_slice(&buf[left.clone()]);
            buf = fresh;
            (0..p, p, p + left.len())
        };
        Rx {
            buf,
            plain,
            start,
            end,
            key,
            closed: false,
            empty: 0,
            failed: None,
        }
    }
}

#[cfg(test)]
#[path = "tls_io_tests.rs"]
mod tests;

#[cfg(any(test, fuzzing))]
#[path = "tls_fuzzing.rs"]
pub mod fuzzing;
