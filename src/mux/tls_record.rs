//! The TLS 1.3 record protection of a link once rustls has run its handshake
//! (RFC 8446, section 5.2): one direction's AEAD key, IV and sequence number, sealing
//! and opening records in place in `tls_io`'s buffers. rustls' own record layer
//! copies every record once more on each side (a fresh vector per record sent, its
//! deframer and plaintext queue on receipt); this one does not.

use std::io;

use rustls::{
    AlertDescription, ConnectionTrafficSecrets, ContentType, InvalidMessage, PeerMisbehaved,
};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};

/// A record's header: content type, legacy version, length.
pub(super) const HEADER: usize = 5;
/// The AEAD tag of every suite chanserv offers.
pub(super) const TAG: usize = 16;
/// The most plaintext a record carries.
pub(super) const MAX_PLAIN: usize = 16 * 1024;
/// The most a protected record's body (after the header) may be.
pub(super) const MAX_BODY: usize = MAX_PLAIN + 256;
/// The largest protected record, header included.
pub(super) const MAX_RECORD: usize = HEADER + MAX_BODY;
/// The outer content type of every protected record.
pub(super) const APPLICATION_DATA: u8 = 23;
/// Inner content types.
pub(super) const ALERT: u8 = 21;
pub(super) const HANDSHAKE: u8 = 22;

/// An error of the record layer, as rustls names it, in an [`io::Error`] (so
/// `tls::classify` reads it like one from rustls).
pub(super) fn failure(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A record's header for a body of `len` bytes.
pub(super) fn header(len: usize) -> [u8; HEADER] {
    let [hi, lo] = (len as u16).to_be_bytes();
    [APPLICATION_DATA, 3, 3, hi, lo]
}

/// The length a header gives its record's body; an error when the header is not
/// that of a protected TLS 1.3 record or the record is too long (checked before the
/// body is read: a peer's length never sizes a buffer).
pub(super) fn body_len(h: &[u8; HEADER]) -> io::Result<usize> {
    if h[0] != APPLICATION_DATA {
        let bad = rustls::Error::InappropriateMessage {
            expect_types: vec![ContentType::ApplicationData],
            got_type: ContentType::from(h[0]),
        };
        return Err(failure(bad));
    }
    let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
    if len > MAX_BODY {
        return Err(failure(rustls::Error::PeerSentOversizedRecord));
    }
    Ok(len)
}

/// A handshake message after the handshake (RFC 8446, section 4.6).
#[derive(Debug, PartialEq)]
pub(super) enum PostHandshake<'a> {
    /// `KeyUpdate`: the peer's next record is under its next key; `ask` if it asks
    /// for ours to be renewed too.
    KeyUpdate { ask: bool },
    /// `NewSessionTicket`, its body.
    Ticket(&'a [u8]),
}

const KEY_UPDATE: u8 = 24;
const NEW_SESSION_TICKET: u8 = 4;

/// Reads the handshake messages of one record, handing each to `each`. A `KeyUpdate`
/// must end its record (the next record is under the next key); a message split
/// across records, an empty record or any other message is an error.
pub(super) fn post_handshake<'a>(
    mut msgs: &'a [u8],
    mut each: impl FnMut(PostHandshake<'a>) -> io::Result<()>,
) -> io::Result<()> {
    if msgs.is_empty() {
        return Err(unexpected("an empty handshake record"));
    }
    while !msgs.is_empty() {
        let [typ, a, b, c, rest @ ..] = msgs else {
            return Err(unexpected("a handshake message split across records"));
        };
        let len = usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c);
        if rest.len() < len {
            return Err(unexpected("a handshake message split across records"));
        }
        let (body, more) = rest.split_at(len);
        let msg = match (*typ, body) {
            (KEY_UPDATE, [ask @ (0 | 1)]) if more.is_empty() => {
                PostHandshake::KeyUpdate { ask: *ask == 1 }
            }
            (KEY_UPDATE, [0 | 1]) => {
                return Err(failure(rustls::Error::PeerMisbehaved(
                    PeerMisbehaved::KeyEpochWithPendingFragment,
                )))
            }
            (KEY_UPDATE, _) => {
                return Err(failure(rustls::Error::InvalidMessage(
                    InvalidMessage::InvalidKeyUpdate,
                )))
            }
            (NEW_SESSION_TICKET, _) => PostHandshake::Ticket(body),
            _ => return Err(unexpected("a handshake message after the handshake")),
        };
        each(msg)?;
        msgs = more;
    }
    Ok(())
}

/// Whether an alert is `close_notify` (the peer's last record) rather than
/// `user_canceled` (which only announces it); an error for any other (RFC 8446,
/// section 6: every other alert is an error, whatever its level).
pub(super) fn closes(alert: &[u8]) -> io::Result<bool> {
    let [_level, what] = alert else {
        // One alert a record, whole (RFC 8446, section 5.1).
        let bad = if alert.len() < 2 {
            InvalidMessage::MessageTooShort
        } else {
            InvalidMessage::TrailingData("an alert")
        };
        return Err(failure(rustls::Error::InvalidMessage(bad)));
    };
    match AlertDescription::from(*what) {
        AlertDescription::CloseNotify => Ok(true),
        AlertDescription::UserCanceled => Ok(false),
        other => Err(failure(rustls::Error::AlertReceived(other))),
    }
}

/// The fatal alert that tells the peer why a record of its failed, if one does: none
/// for an alert of its own, a failed socket or EOF.
pub(super) fn alert_for(e: &io::Error) -> Option<AlertDescription> {
    let e = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(match e {
        rustls::Error::DecryptError => AlertDescription::BadRecordMac,
        rustls::Error::PeerSentOversizedRecord => AlertDescription::RecordOverflow,
        rustls::Error::InvalidMessage(InvalidMessage::UnexpectedMessage(_))
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::PeerMisbehaved(_) => AlertDescription::UnexpectedMessage,
        rustls::Error::InvalidMessage(_) => AlertDescription::DecodeError,
        _ => return None,
    })
}

pub(super) fn unexpected(what: &'static str) -> io::Error {
    failure(rustls::Error::InvalidMessage(
        InvalidMessage::UnexpectedMessage(what),
    ))
}

/// One direction's protection: its AEAD key and IV, and the sequence number of its
/// next record.
pub(super) struct Key {
    aead: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    pub(super) seq: u64,
}

impl Key {
    /// The key of `secrets`, whose next record is number `seq`.
    pub(super) fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> io::Result<Key> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => {
                return Err(failure(rustls::Error::General(
                    "unknown cipher suite".into(),
                )))
            }
        };
        let bad = || failure(rustls::Error::General("bad traffic secrets".into()));
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| bad())?;
        let iv = iv.as_ref().try_into().map_err(|_| bad())?;
        Ok(Key {
            aead: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The nonce of the next record (the IV xor its sequence number), which it uses up.
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        let mut n = self.iv;
        for (b, s) in n[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *b ^= s;
        }
        self.seq = self.seq.checked_add(1).ok_or_else(|| {
            failure(rustls::Error::EncryptError) // 2^64 records: never in practice
        })?;
        Ok(Nonce::assume_unique_for_key(n))
    }

    /// Protects the record that starts at `start` in `buf` and runs to its end: a
    /// header (rewritten here), then plaintext, to which the inner content type `typ`
    /// and the tag are appended.
    pub(super) fn seal(&mut self, buf: &mut Vec<u8>, start: usize, typ: u8) -> io::Result<()> {
        buf.push(typ);
        self.seal_inner(buf, start)
    }

    /// Protects the record that starts at `start` in `buf` and runs to its end: a
    /// header (rewritten here), then its inner plaintext (content, content type and
    /// any padding), to which the tag is appended.
    pub(super) fn seal_inner(&mut self, buf: &mut Vec<u8>, start: usize) -> io::Result<()> {
        let h = header(buf.len() - start - HEADER + TAG);
        buf[start..start + HEADER].copy_from_slice(&h);
        let nonce = self.next_nonce()?;
        let tag = self
            .aead
            .seal_in_place_separate_tag(nonce, Aad::from(h), &mut buf[start + HEADER..])
            .map_err(|_| failure(rustls::Error::EncryptError))?;
        buf.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Opens the record whose header is `h` and whose body is `body`, in place: its
    /// inner content type and the length of its plaintext, which starts `body`.
    pub(super) fn open(&mut self, h: [u8; HEADER], body: &mut [u8]) -> io::Result<(u8, usize)> {
        let nonce = self.next_nonce()?;
        let plain = self
            .aead
            .open_in_place(nonce, Aad::from(h), body)
            .map_err(|_| failure(rustls::Error::DecryptError))?;
        // TLSInnerPlaintext: content, type, zero padding; at most 2^14 + 1 bytes.
        if plain.len() > MAX_PLAIN + 1 {
            return Err(failure(rustls::Error::PeerSentOversizedRecord));
        }
        // The content type is the last byte that is not zero padding.
        let Some(at) = plain.iter().rposition(|&b| b != 0) else {
            return Err(failure(rustls::Error::PeerMisbehaved(
                PeerMisbehaved::IllegalTlsInnerPlaintext,
            )));
        };
        Ok((plain[at], at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: [u8; 32] = [7; 32];
    const IV: [u8; 12] = [9; 12];

    fn key() -> Key {
        let secrets = ConnectionTrafficSecrets::Aes256Gcm {
            key: rustls::crypto::cipher::AeadKey::from(SECRET),
            iv: rustls::crypto::cipher::Iv::from(IV),
        };
        Key::new(5, &secrets).unwrap()
    }

    /// A record sealed from `inner` (content, type, padding) as it stands.
    fn sealed(tx: &mut Key, inner: &[u8]) -> Vec<u8> {
        let mut buf = vec![0; HEADER];
        buf.extend_from_slice(inner);
        tx.seal_inner(&mut buf, 0).unwrap();
        buf
    }

    fn open(rx: &mut Key, record: &mut [u8]) -> io::Result<(u8, usize)> {
        let h: [u8; HEADER] = record[..HEADER].try_into().unwrap();
        rx.open(h, &mut record[HEADER..])
    }

    fn rustls_error(r: io::Result<impl std::fmt::Debug>) -> rustls::Error {
        let e = r.unwrap_err();
        e.get_ref()
            .and_then(|i| i.downcast_ref::<rustls::Error>())
            .cloned()
            .unwrap_or_else(|| panic!("not a rustls error: {e}"))
    }

    #[test]
    fn a_sealed_record_opens_with_its_type_and_refuses_tampering() {
        let (mut tx, mut rx) = (key(), key());
        let mut buf = vec![0; HEADER];
        buf.extend_from_slice(b"hello");
        tx.seal(&mut buf, 0, APPLICATION_DATA).unwrap();
        assert_eq!(buf.len(), HEADER + 5 + 1 + TAG);
        let h: [u8; HEADER] = buf[..HEADER].try_into().unwrap();
        assert_eq!(body_len(&h).unwrap(), 5 + 1 + TAG);
        let mut copy = buf.clone();
        let (typ, n) = rx.open(h, &mut buf[HEADER..]).unwrap();
        assert_eq!(
            (typ, &buf[HEADER..HEADER + n]),
            (APPLICATION_DATA, &b"hello"[..])
        );
        assert_eq!((tx.seq, rx.seq), (6, 6));
        // The same bytes again (a replay: the next sequence number) and a flipped bit fail.
        let mut replay = copy.clone();
        assert!(rx.open(h, &mut replay[HEADER..]).is_err());
        let mut rx = key();
        copy[HEADER + 2] ^= 1;
        assert_eq!(
            rustls_error(rx.open(h, &mut copy[HEADER..])),
            rustls::Error::DecryptError
        );
    }

    #[test]
    fn the_nonce_is_the_iv_xor_the_sequence_number() {
        let mut tx = key();
        let mut record = sealed(&mut tx, b"x\x17");
        // RFC 8446, section 5.3: the sequence number (5), left-padded, xor the IV.
        let mut nonce = IV;
        nonce[11] ^= 5;
        let alg = &aead::AES_256_GCM;
        let ring_key = LessSafeKey::new(UnboundKey::new(alg, &SECRET).unwrap());
        let h: [u8; HEADER] = record[..HEADER].try_into().unwrap();
        let plain = ring_key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(h),
                &mut record[HEADER..],
            )
            .unwrap();
        assert_eq!(plain, b"x\x17");
    }

    #[test]
    fn padding_is_stripped_and_inner_plaintexts_without_a_type_or_too_long_are_refused() {
        let (mut tx, mut rx) = (key(), key());
        let mut r = sealed(&mut tx, b"ab\x17\0\0\0");
        assert_eq!(open(&mut rx, &mut r).unwrap(), (APPLICATION_DATA, 2));
        let mut r = sealed(&mut tx, &[0; 40]);
        let bad = rustls::PeerMisbehaved::IllegalTlsInnerPlaintext;
        assert_eq!(rustls_error(open(&mut rx, &mut r)), bad.into());
        // 2^14 bytes of content, its type and one byte of padding: one too many.
        let mut inner = vec![1; MAX_PLAIN];
        inner.extend_from_slice(&[APPLICATION_DATA, 0]);
        let mut r = sealed(&mut tx, &inner);
        let big = rustls::Error::PeerSentOversizedRecord;
        assert_eq!(rustls_error(open(&mut rx, &mut r)), big);
        inner.pop();
        let mut r = sealed(&mut tx, &inner);
        assert_eq!(
            open(&mut rx, &mut r).unwrap(),
            (APPLICATION_DATA, MAX_PLAIN)
        );
        // A body shorter than a tag.
        let mut r = header(3).to_vec();
        r.extend_from_slice(&[1, 2, 3]);
        assert_eq!(
            rustls_error(open(&mut rx, &mut r)),
            rustls::Error::DecryptError
        );
    }

    #[test]
    fn headers_of_other_types_or_oversized_records_are_refused() {
        assert_eq!(body_len(&header(MAX_BODY)).unwrap(), MAX_BODY);
        let big = rustls::Error::PeerSentOversizedRecord;
        assert_eq!(rustls_error(body_len(&header(MAX_BODY + 1))), big);
        assert_eq!(rustls_error(body_len(&[23, 3, 3, 0xff, 0xff])), big);
        let other = rustls_error(body_len(&[22, 3, 3, 0, 10]));
        assert!(
            matches!(other, rustls::Error::InappropriateMessage { .. }),
            "{other:?}"
        );
    }

    fn messages(msgs: &[u8]) -> io::Result<Vec<PostHandshake<'_>>> {
        let mut got = Vec::new();
        post_handshake(msgs, |m| {
            got.push(m);
            Ok(())
        })?;
        Ok(got)
    }

    #[test]
    fn post_handshake_messages_are_read_whole_and_a_key_update_ends_its_record() {
        let update = |ask| PostHandshake::KeyUpdate { ask };
        assert_eq!(messages(&[24, 0, 0, 1, 1]).unwrap(), [update(true)]);
        let two = [4, 0, 0, 2, 9, 9, 24, 0, 0, 1, 0];
        let ticket = PostHandshake::Ticket(&[9, 9]);
        assert_eq!(messages(&two).unwrap(), [ticket, update(false)]);
        // A key update followed by anything, with a bad value or a bad length.
        let pending = rustls::PeerMisbehaved::KeyEpochWithPendingFragment;
        assert_eq!(rustls_error(messages(&[24, 0, 0, 1, 0, 4])), pending.into());
        let invalid = rustls::Error::InvalidMessage(InvalidMessage::InvalidKeyUpdate);
        assert_eq!(rustls_error(messages(&[24, 0, 0, 1, 2])), invalid);
        assert_eq!(rustls_error(messages(&[24, 0, 0, 2, 0, 0])), invalid);
        // Empty, split, truncated, or a handshake message that has no place here.
        for bad in [
            &[][..],
            &[24, 0, 0],
            &[24, 0, 0, 1],
            &[4, 0xff, 0xff, 0xff, 1],
            &[20, 0, 0, 0],
        ] {
            let e = rustls_error(messages(bad));
            assert!(
                matches!(e, rustls::Error::InvalidMessage(_)),
                "{bad:?}: {e:?}"
            );
        }
    }

    #[test]
    fn close_notify_ends_user_canceled_is_ignored_and_other_alerts_fail() {
        assert!(closes(&[1, 0]).unwrap());
        assert!(!closes(&[1, 90]).unwrap());
        let alert = rustls::Error::AlertReceived(AlertDescription::BadRecordMac);
        assert_eq!(rustls_error(closes(&[2, 20])), alert);
        // A warning level does not make another alert harmless (RFC 8446, section 6).
        let alert = rustls::Error::AlertReceived(AlertDescription::DecryptError);
        assert_eq!(rustls_error(closes(&[1, 51])), alert);
        for bad in [&[][..], &[1], &[1, 0, 1, 0]] {
            assert!(closes(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn each_failure_of_the_peer_has_its_alert() {
        let alert = |e: rustls::Error| alert_for(&failure(e));
        assert_eq!(
            alert(rustls::Error::DecryptError),
            Some(AlertDescription::BadRecordMac)
        );
        assert_eq!(
            alert(rustls::Error::PeerSentOversizedRecord),
            Some(AlertDescription::RecordOverflow)
        );
        let split = unexpected("a handshake message split across records");
        assert_eq!(alert_for(&split), Some(AlertDescription::UnexpectedMessage));
        let update = rustls::Error::InvalidMessage(InvalidMessage::InvalidKeyUpdate);
        assert_eq!(alert(update), Some(AlertDescription::DecodeError));
        let theirs = rustls::Error::AlertReceived(AlertDescription::BadRecordMac);
        assert_eq!(alert(theirs), None);
        assert_eq!(alert_for(&io::ErrorKind::UnexpectedEof.into()), None);
    }
}
