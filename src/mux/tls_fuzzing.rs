//! The read side of a TLS link ([`Rx`](super::Rx), its buffer and record decoder) fed
//! arbitrary records, for the fuzz target `fuzz/fuzz_targets/tls_records.rs` and the
//! property test below. Whatever the peer sends, it must fail with an error, never
//! panic, never grow its buffer, always leave room for the next read, and never hand
//! out more than a record's worth of plaintext. The input describes records rather
//! than being them: random ciphertext would never get past the AEAD tag.

use rustls::crypto::cipher::{AeadKey, Iv};
use rustls::ConnectionTrafficSecrets;

use super::{post_handshake, PostHandshake, Record, Rx, RX_BUFFER};
use crate::mux::tls_record::{Key, ALERT, APPLICATION_DATA, HANDSHAKE, HEADER, MAX_PLAIN};

/// The key of epoch `n` (each key update moves both sides to the next).
fn key(epoch: u8) -> Key {
    let secrets = ConnectionTrafficSecrets::Aes256Gcm {
        key: AeadKey::from([epoch; 32]),
        iv: Iv::from([epoch ^ 0x5a; 12]),
    };
    match Key::new(0, &secrets) {
        Ok(k) => k,
        Err(e) => unreachable!("a 32-byte key and 12-byte IV: {e}"),
    }
}

/// Appends a record sealed from `inner` (content, content type, padding as given).
fn seal(tx: &mut Key, wire: &mut Vec<u8>, inner: &[u8]) {
    let start = wire.len();
    wire.extend_from_slice(&[0; HEADER]);
    wire.extend_from_slice(inner);
    if tx.seal_inner(wire, start).is_err() {
        wire.truncate(start); // too long to seal: ring refuses, nothing to send
    }
}

/// The bytes a peer sends, built from `data`: each step is one byte of what, then
/// its arguments (a length is one byte unless said):
/// 0, 7: application data, its length then its bytes;
/// 1: an alert, its two bytes; 2: handshake messages, their length then bytes;
/// 3: a record sealed from arbitrary inner plaintext (content, type, padding as
///    given), its length in two bytes then its bytes;
/// 4: raw bytes, their length then the bytes (garbage, cut records);
/// 5: a large record: content length in two bytes, content type, padding / 64;
/// 6: a key update, then a byte (ask for ours or not): later records are sealed
///    under the next key.
fn wire(mut data: &[u8]) -> Vec<u8> {
    let (mut tx, mut epoch, mut wire) = (key(0), 0u8, Vec::new());
    while let [what, rest @ ..] = data {
        data = rest;
        let mut take = |n: usize| {
            let (a, b) = data.split_at(n.min(data.len()));
            data = b;
            a
        };
        let mut len = || take(1).first().map_or(0, |n| usize::from(*n));
        let inner = match what % 8 {
            1 => [take(2), &[ALERT]].concat(),
            2 => {
                let n = len();
                [take(n), &[HANDSHAKE]].concat()
            }
            3 => {
                let n = match take(2) {
                    [a, b] => usize::from(u16::from_be_bytes([*a, *b])),
                    _ => 0,
                };
                take(n).to_vec()
            }
            4 => {
                let n = len();
                wire.extend_from_slice(take(n));
                continue;
            }
            5 => {
                let [a, b, typ, pad] = take(4) else { continue };
                let mut inner = vec![b'x'; usize::from(u16::from_be_bytes([*a, *b]))];
                inner.push(*typ);
                inner.resize(inner.len() + usize::from(*pad) * 64, 0);
                inner
            }
            6 => {
                let ask = take(1).first().map_or(0, |a| a & 1);
                seal(&mut tx, &mut wire, &[24, 0, 0, 1, ask, HANDSHAKE]);
                epoch = epoch.wrapping_add(1);
                tx = key(epoch);
                continue;
            }
            _ => {
                let n = len();
                [take(n), &[APPLICATION_DATA]].concat()
            }
        };
        seal(&mut tx, &mut wire, &inner);
    }
    wire
}

/// Feeds what `data` describes (after its first byte: how much each read takes) to
/// a link's read side: how many records it opened before it failed or ran out.
pub fn records(data: &[u8]) -> usize {
    let Some((&step, data)) = data.split_first() else {
        return 0;
    };
    let wire = wire(data);
    let mut rx = Rx::after_handshake(vec![0; RX_BUFFER], 0..0, &[], key(0));
    let (mut epoch, mut opened, mut at) = (0u8, 0, 0);
    loop {
        rx.plain = rx.plain.end..rx.plain.end; // the reader takes it all
        match rx.open_next() {
            Ok(Record::Partial) => {}
            Ok(Record::Opened) => {
                assert!(
                    rx.plain.len() <= MAX_PLAIN,
                    "more than a record's plaintext"
                );
                opened += 1;
                if rx.closed {
                    return opened;
                }
                continue;
            }
            Ok(Record::Handshake(msgs)) => {
                let Rx {
                    buf, key: rx_key, ..
                } = &mut rx;
                let r = post_handshake(&buf[msgs], |msg| {
                    if let PostHandshake::KeyUpdate { .. } = msg {
                        epoch = epoch.wrapping_add(1);
                        *rx_key = key(epoch);
                    }
                    Ok(())
                });
                if r.is_err() {
                    return opened;
                }
                opened += 1;
                continue;
            }
            Err(_) => return opened,
        }
        // What a read does: make room, then take what the socket has.
        rx.make_room();
        assert_eq!(rx.buf.len(), RX_BUFFER, "the read buffer never grows");
        let room = rx.buf.len() - rx.end;
        assert!(room > 0, "a read always has room (0 would read as EOF)");
        let n = usize::from(step).max(1).min(room).min(wire.len() - at);
        if n == 0 {
            return opened; // EOF: an error of the caller's, after what was opened
        }
        rx.buf[rx.end..rx.end + n].copy_from_slice(&wire[at..at + n]);
        (rx.end, at) = (rx.end + n, at + n);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn records_sealed_whole_are_opened_across_key_updates_and_garbage_stops_them() {
        // Data, padded data, a key update, data under the next key, then a byte of
        // garbage and more data, which is never reached. Read 7 bytes at a time.
        let mut data = vec![7, 0, 5];
        data.extend_from_slice(b"hello");
        data.extend_from_slice(&[3, 0, 8]);
        data.extend_from_slice(b"again\x17\0\0");
        data.extend_from_slice(&[6, 1, 0, 1, b'!', 4, 1, 0xee, 0, 1, b'?']);
        assert_eq!(records(&data), 4);
        // A record with 16 KiB of content, then one with 1 byte too many.
        let big = |n: u16| {
            let [a, b] = n.to_be_bytes();
            [5, a, b, APPLICATION_DATA, 0]
        };
        let data: Vec<u8> = [[255].as_slice(), &big(16 * 1024), &big(16 * 1024 + 1)].concat();
        assert_eq!(records(&data), 1);
        // user_canceled is passed over, close_notify ends what is read.
        let data = [9, 1, 1, 90, 0, 1, b'a', 1, 1, 0, 0, 1, b'b'];
        assert_eq!(records(&data), 3);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn arbitrary_records_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            records(&data);
        }
    }
}
