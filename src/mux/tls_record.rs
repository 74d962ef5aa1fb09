//! The TLS 1.3 record protection of a link once rustls has run its handshake
//! (RFC 8446, section 5.2): one direction's AEAD key, IV and sequence number, sealing
//! and opening records in place in `tls_io`'s buffers. rustls' own record layer
//! copies every record once more on each side (a fresh vector per record sent, its
//! deframer and plaintext queue on receipt); this one does not.

use std::io;

use rustls::{ConnectionTrafficSecrets, ContentType, InvalidMessage};

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
/// that of a protected TLS 1.3 record or the record is too long.
pub(super) fn body_len(h: &[u8]) -> io::Result<usize> {
    if h[0] != APPLICATION_DATA {
        let bad = rustls::Error::InappropriateMessage {
            expect_types: vec![ContentType::ApplicationData],
            got_type: ContentType::from(h[0]),
        };
        return Err(failure(bad));
    }
    let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
    if len > MAX_BODY {
        return Err(failure(rustls::Error::InvalidMessage(
            InvalidMessage::MessageTooLarge,
        )));
    }
    Ok(len)
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
        // The content type is the last byte that is not zero padding.
        let Some(at) = plain.iter().rposition(|&b| b != 0) else {
            return Err(failure(rustls::Error::PeerMisbehaved(
                rustls::PeerMisbehaved::IllegalTlsInnerPlaintext,
            )));
        };
        if at > MAX_PLAIN {
            return Err(failure(rustls::Error::PeerSentOversizedRecord));
        }
        Ok((plain[at], at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        let secrets = ConnectionTrafficSecrets::Aes256Gcm {
            key: rustls::crypto::cipher::AeadKey::from([7u8; 32]),
            iv: rustls::crypto::cipher::Iv::from([9u8; 12]),
        };
        Key::new(5, &secrets).unwrap()
    }

    #[test]
    fn a_sealed_record_opens_with_its_type_and_refuses_tampering() {
        let (mut tx, mut rx) = (key(), key());
        let mut buf = vec![0; HEADER];
        buf.extend_from_slice(b"hello");
        tx.seal(&mut buf, 0, APPLICATION_DATA).unwrap();
        assert_eq!(buf.len(), HEADER + 5 + 1 + TAG);
        assert_eq!(body_len(&buf).unwrap(), 5 + 1 + TAG);
        let h: [u8; HEADER] = buf[..HEADER].try_into().unwrap();
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
        assert!(rx.open(h, &mut copy[HEADER..]).is_err());
    }

    #[test]
    fn headers_of_other_types_or_oversized_records_are_refused() {
        assert_eq!(body_len(&header(MAX_BODY)).unwrap(), MAX_BODY);
        assert!(body_len(&header(MAX_BODY + 1)).is_err());
        assert!(body_len(&[22, 3, 3, 0, 10]).is_err());
    }
}
