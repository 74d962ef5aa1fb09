//! The TLS handshake of a link, run by rustls' unbuffered API over buffers owned
//! here, after which `tls_io` takes the traffic keys over and rustls keeps only what
//! renews them (`rustls::kernel`).

use std::io;

use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::CertificateDer;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::InvalidMessage;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::tls_io::{Keys, TlsIo, RX_BUFFER};
use super::tls_record::failure;

/// A TLS connection being handshaken, either side.
pub(super) enum Handshaking {
    Client(UnbufferedClientConnection),
    Server(UnbufferedServerConnection),
}

/// What the handshake does next.
enum Next {
    Again,
    Read,
    Write,
    Done,
}

/// What the peer sent besides the handshake, before it ended.
#[derive(Default)]
struct Early {
    /// Application data.
    data: Vec<u8>,
    /// `close_notify` followed it.
    closed: bool,
}

/// Handles one state of the handshake: how much of the input is done with, and what
/// next. What the peer sent already is noted in `early`, handshake records to send
/// are appended to `out`.
fn step<Data>(
    status: UnbufferedStatus<'_, '_, Data>,
    early: &mut Early,
    out: &mut Vec<u8>,
) -> (usize, Result<Next, rustls::Error>) {
    let discard = status.discard;
    let next = match status.state {
        Err(e) => Err(e),
        Ok(ConnectionState::ReadTraffic(mut r)) => loop {
            match r.next_record() {
                Some(Ok(record)) => early.data.extend_from_slice(record.payload),
                Some(Err(e)) => break Err(e),
                None => break Ok(Next::Again),
            }
        },
        Ok(ConnectionState::EncodeTlsData(mut e)) => {
            let at = out.len();
            out.resize(at + 4096, 0);
            let mut r = e.encode(&mut out[at..]);
            if let Err(EncodeError::InsufficientSize(s)) = &r {
                out.resize(at + s.required_size, 0);
                r = e.encode(&mut out[at..]);
            }
            match r {
                Ok(n) => {
                    out.truncate(at + n);
                    Ok(Next::Again)
                }
                Err(e) => {
                    out.truncate(at);
                    Err(rustls::Error::General(e.to_string()))
                }
            }
        }
        Ok(ConnectionState::TransmitTlsData(t)) => {
            t.done();
            Ok(Next::Write)
        }
        Ok(ConnectionState::BlockedHandshake) => Ok(Next::Read),
        Ok(ConnectionState::WriteTraffic(_)) => Ok(Next::Done),
        // The peer finished and closed at once: the stream's reads end (EOF) after
        // what it sent. (Reported once; the next state is `WriteTraffic`.)
        Ok(ConnectionState::PeerClosed) => {
            early.closed = true;
            Ok(Next::Again)
        }
        // Early data (0-RTT) is not offered; nothing else is known.
        Ok(_) => Err(rustls::Error::General(
            "unexpected state of the TLS handshake".into(),
        )),
    };
    (discard, next)
}

impl Handshaking {
    fn step(
        &mut self,
        input: &mut [u8],
        early: &mut Early,
        out: &mut Vec<u8>,
    ) -> (usize, Result<Next, rustls::Error>) {
        match self {
            Handshaking::Client(c) => step(c.process_tls_records(input), early, out),
            Handshaking::Server(s) => step(s.process_tls_records(input), early, out),
        }
    }

    /// Runs the handshake on `io`: the stream, and the peer's certificate.
    pub(super) async fn run<IO>(
        mut self,
        mut io: IO,
    ) -> io::Result<(TlsIo<IO>, Option<CertificateDer<'static>>)>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let mut buf = vec![0; RX_BUFFER];
        let (mut start, mut end) = (0, 0);
        let (mut early, mut out) = (Early::default(), Vec::new());
        loop {
            let (discard, next) = self.step(&mut buf[start..end], &mut early, &mut out);
            start += discard;
            let next = match next {
                Ok(next) => next,
                Err(e) => {
                    self.last_gasp(&mut io, &mut buf[start..end], out).await;
                    return Err(failure(e));
                }
            };
            match next {
                Next::Again => {}
                Next::Write => {
                    io.write_all(&out).await?;
                    io.flush().await?;
                    out.clear();
                }
                Next::Read => {
                    if start > 0 {
                        buf.copy_within(start..end, 0);
                        (start, end) = (0, end - start);
                    }
                    if end == buf.len() {
                        return Err(failure(rustls::Error::InvalidMessage(
                            InvalidMessage::HandshakePayloadTooLarge,
                        )));
                    }
                    let n = io.read(&mut buf[end..]).await?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "tls handshake eof",
                        ));
                    }
                    end += n;
                }
                Next::Done => break,
            }
        }
        let peer = self.peer_leaf();
        let (secrets, keys) = match self {
            Handshaking::Client(c) => c
                .dangerous_into_kernel_connection()
                .map(|(s, k)| (s, Keys::Client(k))),
            Handshaking::Server(s) => s
                .dangerous_into_kernel_connection()
                .map(|(s, k)| (s, Keys::Server(k))),
        }
        .map_err(failure)?;
        let read = (buf, start..end);
        let io = TlsIo::new(io, keys, &secrets, read, &early.data, early.closed)?;
        Ok((io, peer))
    }

    /// rustls has records to send.
    fn queued(&self) -> bool {
        match self {
            Handshaking::Client(c) => c.wants_write(),
            Handshaking::Server(s) => s.wants_write(),
        }
    }

    fn peer_leaf(&self) -> Option<CertificateDer<'static>> {
        let certs = match self {
            Handshaking::Client(c) => c.peer_certificates(),
            Handshaking::Server(s) => s.peer_certificates(),
        };
        certs.and_then(|c| c.first()).cloned()
    }

    /// After a failure, sends the alert rustls has for the peer, if it can. (Only the
    /// steps that hand over queued records run: another would process `input` again.)
    async fn last_gasp<IO: AsyncWrite + Unpin>(
        &mut self,
        io: &mut IO,
        input: &mut [u8],
        mut out: Vec<u8>,
    ) {
        let mut early = Early::default();
        while self.queued() {
            if !matches!(self.step(input, &mut early, &mut out).1, Ok(Next::Again)) {
                break;
            }
        }
        // The failure is what the caller hears of: a peer that does not take its
        // alert learns of it when the socket closes.
        let _ = io.write_all(&out).await;
        let _ = io.flush().await;
    }
}
