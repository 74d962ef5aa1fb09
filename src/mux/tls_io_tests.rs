//! `tls_io` against rustls' own record layer (tokio-rustls) both ways, and against
//! itself: data both ways across many records, key updates, shutdown and EOF.

use std::future::Future;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

use rustls::client::UnbufferedClientConnection;
use rustls::server::UnbufferedServerConnection;

use super::*;
use crate::mux::tls::{TlsConfig, TlsLinks};
use crate::mux::tls_handshake::Handshaking;
use crate::mux::tls_record::MAX_PLAIN;

/// A node's built TLS, its certificate issued by a fresh CA.
fn links() -> TlsLinks {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca.self_signed(&ca_key).unwrap();
    let mut node = CertificateParams::new(vec!["a.test".to_owned()]).unwrap();
    node.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = node.signed_by(&key, &ca, &ca_key).unwrap();
    let cfg = TlsConfig::from_pem(ca.pem(), cert.pem(), key.serialize_pem()).unwrap();
    cfg.build().unwrap()
}

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("test timed out")
}

fn client(l: &TlsLinks) -> Handshaking {
    Handshaking::Client(UnbufferedClientConnection::new(l.client.clone(), l.name.clone()).unwrap())
}

fn server(l: &TlsLinks) -> Handshaking {
    Handshaking::Server(UnbufferedServerConnection::new(l.server.clone()).unwrap())
}

/// `n` bytes that differ from record to record.
fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i / 7) as u8 ^ seed).collect()
}

/// Writes `data` on `w` (then flushes) while `r` reads as much, which must match.
async fn send<W, R>(w: &mut W, r: &mut R, data: &[u8])
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let mut got = vec![0; data.len()];
    let write = async {
        w.write_all(data).await.unwrap();
        w.flush().await.unwrap();
    };
    let (_, read) = tokio::join!(write, r.read_exact(&mut got));
    read.unwrap();
    assert!(got == data, "the bytes read differ from those written");
}

/// Both ends made by `tls_io`, over a pipe with a 64 KiB buffer.
async fn ours() -> (TlsIo<DuplexStream>, TlsIo<DuplexStream>) {
    let l = links();
    let (a, b) = duplex(64 * 1024);
    let (c, s) = tokio::join!(client(&l).run(a), server(&l).run(b));
    let ((c, cert), (s, _)) = (c.unwrap(), s.unwrap());
    assert!(cert.is_some(), "the client sees the server's certificate");
    (c, s)
}

type RustlsServer = tokio_rustls::server::TlsStream<DuplexStream>;

/// Our client, linked to rustls' own server stream.
async fn with_rustls_server(l: &TlsLinks) -> (TlsIo<DuplexStream>, RustlsServer) {
    let (a, b) = duplex(64 * 1024);
    let accept = tokio_rustls::TlsAcceptor::from(l.server.clone()).accept(b);
    let (ours, theirs) = tokio::join!(client(l).run(a), accept);
    (ours.unwrap().0, theirs.unwrap())
}

#[tokio::test]
async fn data_crosses_both_ways_to_and_from_rustls_own_streams() {
    bounded(async {
        let l = links();
        // Our client, rustls' server.
        let (mut ours, mut theirs) = with_rustls_server(&l).await;
        for (n, seed) in [(1, 1), (300 * 1024 + 17, 2), (5, 3)] {
            send(&mut ours, &mut theirs, &pattern(n, seed)).await;
            send(&mut theirs, &mut ours, &pattern(n, seed + 10)).await;
        }
        // Our shutdown is a clean EOF there, and theirs here.
        ours.shutdown().await.unwrap();
        assert_eq!(theirs.read(&mut [0; 8]).await.unwrap(), 0);
        theirs.shutdown().await.unwrap();
        assert_eq!(ours.read(&mut [0; 8]).await.unwrap(), 0);

        // rustls' client, our server.
        let (a, b) = duplex(64 * 1024);
        let connect = tokio_rustls::TlsConnector::from(l.client.clone()).connect(l.name.clone(), a);
        let (theirs, ours) = tokio::join!(connect, server(&l).run(b));
        let (mut theirs, (mut ours, cert)) = (theirs.unwrap(), ours.unwrap());
        assert!(cert.is_some(), "the server sees the client's certificate");
        send(&mut theirs, &mut ours, &pattern(200 * 1024, 4)).await;
        send(&mut ours, &mut theirs, &pattern(200 * 1024, 5)).await;
    })
    .await;
}

#[tokio::test]
async fn key_updates_from_either_side_keep_the_stream_going() {
    bounded(async {
        let (mut ours, mut theirs) = with_rustls_server(&links()).await;
        // rustls renews its key: we follow.
        theirs.get_mut().1.refresh_traffic_keys().unwrap();
        send(&mut theirs, &mut ours, &pattern(100 * 1024, 1)).await;
        // Ours renews every 2 records: rustls follows (7 records, 3 updates).
        ours.tx.limit = 2;
        send(&mut ours, &mut theirs, &pattern(100 * 1024, 2)).await;
        assert!(ours.tx.key.seq <= 2, "the key was renewed");
        send(&mut theirs, &mut ours, &pattern(1000, 3)).await;
    })
    .await;
}

#[tokio::test]
async fn a_key_update_request_is_answered_before_the_next_record() {
    bounded(async {
        let (mut c, mut s) = ours().await;
        c.tx.update_key(&mut c.keys, true).unwrap();
        send(&mut c, &mut s, b"after the update").await;
        assert!(s.tx.update, "the server owes an update");
        send(&mut s, &mut c, &pattern(40_000, 1)).await;
        assert!(!s.tx.update, "it sent it");
        send(&mut c, &mut s, b"and on").await;
    })
    .await;
}

#[tokio::test]
async fn eof_without_close_notify_is_an_error_and_with_it_is_not() {
    bounded(async {
        let (mut c, mut s) = ours().await;
        c.write_all(b"last words").await.unwrap();
        c.flush().await.unwrap();
        drop(c);
        let mut got = [0; 10];
        s.read_exact(&mut got).await.unwrap();
        let e = s.read(&mut [0; 8]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");

        let (mut c, mut s) = ours().await;
        c.write_all(b"bye").await.unwrap();
        c.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
        assert!(c.write(b"more").await.is_err(), "no writes after shutdown");
    })
    .await;
}

/// The rustls error inside `e`, if any.
fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
}

#[tokio::test]
async fn a_corrupted_record_fails_every_read_and_the_peer_hears_why() {
    bounded(async {
        let (mut c, mut s) = ours().await;
        c.write_all(b"x").await.unwrap();
        c.tx.seal().unwrap();
        let last = c.tx.buf.len() - 1;
        c.tx.buf[last] ^= 1;
        c.flush().await.unwrap();
        let e = s.read(&mut [0; 8]).await.unwrap_err();
        assert_eq!(rustls_error(&e), Some(&rustls::Error::DecryptError), "{e}");
        let again = s.read(&mut [0; 8]).await.unwrap_err();
        assert_eq!(again.kind(), e.kind(), "{again}");
        assert!(s.write(b"more").await.is_err(), "no writes after the alert");
        let e = c.read(&mut [0; 8]).await.unwrap_err();
        let alert = rustls::Error::AlertReceived(AlertDescription::BadRecordMac);
        assert_eq!(rustls_error(&e), Some(&alert), "{e}");
    })
    .await;
}

#[tokio::test]
async fn an_oversized_record_is_refused_from_its_header() {
    bounded(async {
        let (mut c, mut s) = ours().await;
        // A header that announces 2^14 + 257 bytes, and no body.
        let [hi, lo] = ((MAX_PLAIN + 257) as u16).to_be_bytes();
        c.io.write_all(&[APPLICATION_DATA, 3, 3, hi, lo])
            .await
            .unwrap();
        let e = s.read(&mut [0; 8]).await.unwrap_err();
        let big = rustls::Error::PeerSentOversizedRecord;
        assert_eq!(rustls_error(&e), Some(&big), "{e}");
        assert_eq!(s.rx.buf.len(), RX_BUFFER, "nothing was allocated for it");
        let e = c.read(&mut [0; 8]).await.unwrap_err();
        let alert = rustls::Error::AlertReceived(AlertDescription::RecordOverflow);
        assert_eq!(rustls_error(&e), Some(&alert), "{e}");
    })
    .await;
}

#[tokio::test]
async fn a_run_of_empty_records_is_refused() {
    bounded(async {
        let (mut c, mut s) = ours().await;
        for run in [MAX_EMPTY, MAX_EMPTY + 1] {
            for _ in 0..run {
                c.tx.seal_message(APPLICATION_DATA, &[]).unwrap();
            }
            c.write_all(b"x").await.unwrap();
            c.flush().await.unwrap();
            let r = s.read(&mut [0; 8]).await;
            if run == MAX_EMPTY {
                assert_eq!(r.unwrap(), 1, "{run} empty records in a row are fine");
            } else {
                let e = r.unwrap_err();
                let many = rustls::PeerMisbehaved::TooManyEmptyFragments;
                assert_eq!(rustls_error(&e), Some(&many.into()), "{e}");
            }
        }
    })
    .await;
}

#[tokio::test]
async fn what_is_written_after_a_key_update_request_goes_under_the_next_key() {
    bounded(async {
        let (mut c, mut s) = ours().await;
        // A record being filled when the request arrives is sealed under the old key
        // with what it holds; what is written next goes under the new one.
        c.write_all(b"a").await.unwrap();
        s.tx.update_key(&mut s.keys, true).unwrap();
        send(&mut s, &mut c, b"ping").await;
        assert!(c.tx.update, "the client owes an update");
        c.write_all(b"b").await.unwrap();
        c.flush().await.unwrap();
        assert!(!c.tx.update, "the update went before b");
        assert_eq!(c.tx.key.seq, 1, "b is the first record under the next key");
        let mut got = [0; 2];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ab");
    })
    .await;
}

#[tokio::test]
async fn a_peer_that_writes_and_closes_right_after_its_handshake_is_read_to_the_end() {
    bounded(async {
        let l = links();
        let (a, b) = duplex(64 * 1024);
        let connect = tokio_rustls::TlsConnector::from(l.client.clone()).connect(l.name.clone(), a);
        let theirs = async {
            // Finished, data and close_notify in one go, then EOF.
            let mut t = connect.await.unwrap();
            t.write_all(b"hi").await.unwrap();
            t.shutdown().await.unwrap();
            t
        };
        let (_theirs, ours) = tokio::join!(theirs, server(&l).run(b));
        let mut ours = ours.unwrap().0;
        let mut got = Vec::new();
        ours.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hi");
    })
    .await;
}
