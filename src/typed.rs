//! Typed frames (the `serde` feature): each frame of a source is one value encoded with
//! [postcard](https://docs.rs/postcard), so neither side writes its own serialization.
//!
//! This module owns the conversion between values and frames and nothing else: a typed
//! source is an ordinary [`Source`] underneath, so it crosses links, is forwarded by
//! gateways and is cancelled exactly like one. The header stays raw [`Bytes`].
//!
//! - Consumers: [`Source::typed`] (or [`TypedSource::new`]) turns a received source
//!   into a `Stream<Item = Result<T>>`.
//! - Producers: [`Source::from_typed`] makes a source from a stream of values;
//!   [`Source::typed_channel`] gives a [`TypedSender`] that encodes each value it sends.
//!
//! A frame that does not decode as `T` is [`Error::Serde`] for that frame alone, and
//! the stream goes on with the next frame (see [`TypedSource`] for why).
//!
//! ```
//! use chanserv::Source;
//! use futures::{stream, StreamExt};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! struct Point {
//!     x: i32,
//!     y: i32,
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), chanserv::Error> {
//! // The producer side (what a source function returns)...
//! let points = stream::iter([Point { x: 1, y: 2 }, Point { x: 3, y: 4 }]);
//! let source = Source::from_typed("points", points);
//! // ...and the consumer side (what a client received).
//! let mut points = source.typed::<Point>();
//! assert_eq!(points.header(), "points");
//! assert_eq!(points.next().await.transpose()?, Some(Point { x: 1, y: 2 }));
//! assert_eq!(points.next().await.transpose()?, Some(Point { x: 3, y: 4 }));
//! assert!(points.next().await.is_none(), "the producer finished");
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures::stream::{FusedStream, Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::source::{Meta, Source, SourceSender};

/// Encodes `value` as one frame with postcard. `Err(Error::Serde)` when the value's
/// `Serialize` fails (for example a sequence of unknown length, which postcard cannot
/// write).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes> {
    postcard::to_allocvec(value)
        .map(Bytes::from)
        .map_err(|e| Error::Serde(format!("cannot encode {}: {e}", std::any::type_name::<T>())))
}

/// Decodes one frame as a `T`: the frame must hold exactly one value (bytes left over
/// are an error too, so a frame of another type is rarely taken for a `T`).
pub fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<T> {
    decode_frame(frame, None)
}

fn decode_frame<T: DeserializeOwned>(frame: &[u8], index: Option<u64>) -> Result<T> {
    let what = || {
        let at = index.map(|i| format!(" {i}")).unwrap_or_default();
        format!("frame{at} ({} bytes)", frame.len())
    };
    let ty = std::any::type_name::<T>;
    match postcard::take_from_bytes::<T>(frame) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(Error::Serde(format!(
            "{} decodes as {} with {} bytes left over",
            what(),
            ty(),
            rest.len()
        ))),
        Err(e) => Err(Error::Serde(format!(
            "{} does not decode as {}: {e}",
            what(),
            ty()
        ))),
    }
}

/// A [`Source`] whose frames are read as values of `T`: a
/// `Stream<Item = Result<T, Error>>` ([`recv`](Self::recv) too). The header and the meta
/// stay as they are.
///
/// Items follow the source's contract, plus one kind of error that is not the end:
/// - `Ok(value)` for each frame that decodes as `T`;
/// - `Err(e)` with [`e.is_serde()`](Error::is_serde) for a frame that does not; the
///   message names the frame's index (counted from this view's first frame), its
///   length and postcard's reason. **The stream goes on**: the frame arrived intact
///   and in order, only its contents do not fit `T`, so the sources' transport, order
///   and completion guarantees still hold for the frames after it. A consumer that
///   wants to stop at the first bad frame drops the view (which cancels the source);
/// - any other `Err` (link gone, producer failed, timeout) is the last item, as on a
///   `Source`; `None` once the producer finished.
///
/// Dropping it drops the source: a received one is cancelled, its producer dropped.
#[must_use = "a source does nothing unless its frames are read; dropping it cancels it"]
pub struct TypedSource<T> {
    source: Source,
    /// The index of the next frame, for decode errors.
    next_index: u64,
    /// `fn() -> T`: the view makes `T`s, it holds none (so it is `Send` and `Unpin`
    /// whatever `T` is).
    _type: PhantomData<fn() -> T>,
}

impl<T> TypedSource<T> {
    /// A typed view of `source`'s frames (the same as [`Source::typed`]).
    pub fn new(source: Source) -> Self {
        TypedSource {
            source,
            next_index: 0,
            _type: PhantomData,
        }
    }

    /// The source's header, raw.
    pub fn header(&self) -> &Bytes {
        self.source.header()
    }

    /// Where the source came from.
    pub fn meta(&self) -> &Meta {
        self.source.meta()
    }

    /// The source underneath, to read the rest of its frames raw.
    pub fn into_inner(self) -> Source {
        self.source
    }
}

impl<T: DeserializeOwned> TypedSource<T> {
    /// The next value: `None` once the source completed. See the type's docs for the
    /// errors and which of them end the stream.
    pub async fn recv(&mut self) -> Option<Result<T>> {
        self.next().await
    }
}

impl<T: DeserializeOwned> Stream for TypedSource<T> {
    type Item = Result<T>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<T>>> {
        let this = self.get_mut();
        Poll::Ready(match ready!(this.source.poll_next_unpin(cx)) {
            Some(Ok(frame)) => {
                let index = this.next_index;
                this.next_index += 1;
                Some(decode_frame(&frame, Some(index)))
            }
            Some(Err(e)) => Some(Err(e)),
            None => None,
        })
    }
}

impl<T: DeserializeOwned> FusedStream for TypedSource<T> {
    fn is_terminated(&self) -> bool {
        self.source.is_terminated()
    }
}

impl<T> fmt::Debug for TypedSource<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedSource")
            .field("type", &std::any::type_name::<T>())
            .field("source", &self.source)
            .field("next_index", &self.next_index)
            .finish()
    }
}

/// A [`SourceSender`] that encodes each value it sends (from [`Source::typed_channel`]
/// or [`TypedSender::new`]).
///
/// Dropping it drops the `SourceSender`: that completes the source, or fails it when
/// the thread is panicking.
pub struct TypedSender<T> {
    sender: SourceSender,
    /// `fn(&T)`: the sender takes `T`s by reference, it holds none.
    _type: PhantomData<fn(&T)>,
}

impl<T: Serialize> TypedSender<T> {
    /// Wraps a raw sender: every value sent through it is one frame.
    pub fn new(sender: SourceSender) -> Self {
        TypedSender {
            sender,
            _type: PhantomData,
        }
    }

    /// Sends `value` as one frame, waiting while the buffer is full. The value is
    /// encoded at once, so the future does not borrow it (nor need `T: Sync` to be
    /// `Send`). `Err(Error::Serde)` when it cannot be encoded (nothing was sent, the
    /// source goes on); `Err(Error::Closed)` when the source is gone.
    pub fn send(&self, value: &T) -> impl Future<Output = Result<()>> + Send + '_ {
        let frame = encode(value);
        async move { self.sender.send(frame?).await }
    }

    /// Fails the source with `reason`; the consumer gets [`Error::SourceFailed`].
    pub async fn abort(self, reason: impl Into<String>) {
        self.sender.abort(reason).await
    }

    /// True once the source was dropped by its consumer.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// The raw sender, for frames already encoded (with [`encode`], say for
    /// [`SourceSender::try_send`]).
    pub fn sender(&self) -> &SourceSender {
        &self.sender
    }

    /// The raw sender, giving up the typed view.
    pub fn into_inner(self) -> SourceSender {
        self.sender
    }
}

impl<T> fmt::Debug for TypedSender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedSender")
            .field("type", &std::any::type_name::<T>())
            .field("sender", &self.sender)
            .finish()
    }
}

/// Typed constructors and views (the `serde` feature).
impl Source {
    /// A typed view of this source's frames: each is decoded as a `T`. A frame that
    /// does not decode is an [`Error::Serde`] for that frame and the stream goes on
    /// (see [`TypedSource`]).
    pub fn typed<T: DeserializeOwned>(self) -> TypedSource<T> {
        TypedSource::new(self)
    }

    /// A source whose frames are `values`, each encoded as one frame; it completes
    /// when the stream ends. A value that cannot be encoded fails the source with
    /// [`Error::Serde`] (a remote consumer sees [`Error::SourceFailed`] with its
    /// message).
    ///
    /// ```
    /// # use futures::stream;
    /// let source = chanserv::Source::from_typed("squares", stream::iter((0u32..4).map(|i| i * i)));
    /// ```
    pub fn from_typed<S, T>(header: impl Into<Bytes>, values: S) -> Source
    where
        S: Stream<Item = T> + Send + 'static,
        T: Serialize,
    {
        Source::try_new(header, values.map(|v| encode(&v)))
    }

    /// [`Source::channel`] with a sender that encodes values: send them with the
    /// [`TypedSender`]; dropping it completes the source, [`TypedSender::abort`] fails
    /// it. `capacity` frames are buffered before `send` waits.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), chanserv::Error> {
    /// let (tx, source) = chanserv::Source::typed_channel::<(u8, String)>("pairs", 8);
    /// tx.send(&(1, "one".to_string())).await?;
    /// drop(tx);
    /// let mut pairs = source.typed::<(u8, String)>();
    /// assert_eq!(pairs.recv().await.transpose()?, Some((1, "one".to_string())));
    /// assert!(pairs.recv().await.is_none());
    /// # Ok(()) }
    /// ```
    ///
    /// # Panics
    /// If `capacity` is 0.
    pub fn typed_channel<T: Serialize>(
        header: impl Into<Bytes>,
        capacity: usize,
    ) -> (TypedSender<T>, Source) {
        let (tx, source) = Source::channel(header, capacity);
        (TypedSender::new(tx), source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_round_trips_and_left_over_bytes_are_an_error() {
        let frame = encode(&(7u16, "seven")).unwrap();
        assert_eq!(
            decode::<(u16, String)>(&frame).unwrap(),
            (7, "seven".into())
        );
        let e = decode::<u16>(&frame).unwrap_err();
        assert!(e.is_serde() && e.to_string().contains("left over"), "{e}");
        let e = decode::<String>(&[0xff]).unwrap_err();
        assert!(
            e.is_serde() && e.to_string().contains("does not decode"),
            "{e}"
        );
    }

    #[test]
    fn a_sequence_of_unknown_length_does_not_encode() {
        struct Unsized;
        impl Serialize for Unsized {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq([1u8, 2].iter().filter(|_| true))
            }
        }
        assert!(encode(&Unsized).unwrap_err().is_serde());
    }
}
