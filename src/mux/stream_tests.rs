//! Unit tests of `stream.rs`.

use super::*;

/// Hands out `data` at most `step` bytes a read, noting the most room it was given.
struct Trickle {
    data: Vec<u8>,
    at: usize,
    step: usize,
    most_room: usize,
}

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.most_room = self.most_room.max(buf.remaining());
        let n = self
            .step
            .min(buf.remaining())
            .min(self.data.len() - self.at);
        buf.put_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

#[test]
fn the_tail_of_a_big_frame_does_not_move_what_came_before_it() {
    // Two big frames read in pieces that straddle their boundary: near the end of
    // the second, only a few bytes are needed, and asking for the read floor then
    // would move the whole partial frame (the first one, dropped, left the buffer
    // unique with its offset: BytesMut would shift the data back).
    let codec = FrameCodec::new();
    let payload = vec![7u8; 1 << 20];
    let mut wire = BytesMut::new();
    codec.encode(&payload, &mut wire).unwrap();
    codec.encode(&payload, &mut wire).unwrap();
    let mut r = Trickle {
        data: wire.to_vec(),
        at: 0,
        // Pieces that leave the last few hundred bytes of each frame for a read
        // of their own.
        step: 65_000,
        most_room: 0,
    };
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut buf = BytesMut::new();
    let mut frames = 0;
    let mut second_at = None;
    while let Poll::Ready(Ok(n)) = poll_read_frames(&mut r, &mut cx, &codec, &mut buf) {
        if n == 0 {
            break;
        }
        while let Some(f) = codec.decode(&mut buf).unwrap() {
            assert_eq!(f, payload);
            frames += 1;
            if frames == 2 {
                let header = wire.len() / 2 - payload.len();
                let at = second_at.map(|p: *const u8| p.wrapping_add(header));
                assert_eq!(at, Some(f.as_ptr()), "the second frame was moved");
            }
        }
        // Once the second frame has its room, its bytes stay where they are.
        let room_for_it = buf.capacity() - buf.len() >= codec.bytes_needed(&buf);
        if frames == 1 && buf.len() > MIN_READ && room_for_it {
            second_at.get_or_insert(buf.as_ptr());
        }
    }
    assert_eq!(frames, 2);
    assert!(second_at.is_some());
}

#[test]
fn a_big_frame_gets_its_room_once_and_is_read_in_capped_pieces() {
    let codec = FrameCodec::new();
    let payload = vec![7u8; 4 << 20];
    let mut wire = BytesMut::new();
    codec.encode(&payload, &mut wire).unwrap();
    let mut r = Trickle {
        data: wire.to_vec(),
        at: 0,
        step: 64 * 1024,
        most_room: 0,
    };
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut buf = BytesMut::new();
    let mut read = |buf: &mut BytesMut| match poll_read_frames(&mut r, &mut cx, &codec, buf) {
        Poll::Ready(Ok(n)) => n,
        other => panic!("{other:?}"),
    };
    // The first read learns the header; from the second on, the room is the frame's.
    assert!(read(&mut buf) > 0);
    assert!(read(&mut buf) > 0);
    let room = buf.as_ptr();
    while read(&mut buf) > 0 {
        assert_eq!(buf.as_ptr(), room, "the frame's room was reserved once");
    }
    assert_eq!(codec.decode(&mut buf).unwrap().unwrap(), payload);
    assert!(
        r.most_room <= MAX_READ,
        "a read was given {} bytes",
        r.most_room
    );
}
