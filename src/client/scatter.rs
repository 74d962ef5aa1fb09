//! Scatter-gather: one request to every provider of a name, their sources merged into
//! one stream that says which provider each came from, until a deadline.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, FuturesUnordered, SelectAll, Stream, StreamExt};

use super::{Client, Sources};
use crate::error::Result;
use crate::mux::{Node, NodeId};
use crate::source::{RequestTag, Source};

impl Client<Node> {
    /// Posts `body` to every node that provides the service `name` now
    /// ([`Node::providers`]), one request each, and merges their sources into one
    /// [`Scatter`] stream of `(provider, source)`.
    ///
    /// A provider that fails (unreachable, request refused or failed) yields one
    /// `(provider, Err(e))` and the others go on. The stream ends when every provider
    /// said it announced all its sources, or at `within` from now, whichever comes
    /// first: what arrived by then is what you get, and requests still announcing are
    /// cancelled. Sources already handed out keep flowing after the end.
    pub fn scatter(
        &self,
        name: &str,
        body: impl Into<Bytes>,
        tags: &[RequestTag],
        within: Duration,
    ) -> Scatter {
        let body = body.into();
        let providers = self.inner.mux.providers(name);
        let posting = providers
            .iter()
            .map(|&node| {
                let (client, name, body, tags) =
                    (self.clone(), name.to_owned(), body.clone(), tags.to_vec());
                Box::pin(async move {
                    let sources = client.post_on(&name, body, &tags, Some(node)).await;
                    (node, sources)
                }) as BoxFuture<'static, (NodeId, Result<Sources>)>
            })
            .collect();
        Scatter {
            providers,
            posting,
            sources: SelectAll::new(),
            deadline: Box::pin(tokio::time::sleep(within)),
            done: false,
        }
    }
}

/// The merged sources of a [`Client::scatter`]: a `Stream` of
/// `(provider, Result<Source>)`. Dropping it cancels the requests still announcing
/// (and the sources not yet handed out).
#[must_use = "dropping the scatter cancels its requests"]
pub struct Scatter {
    providers: Vec<NodeId>,
    posting: FuturesUnordered<BoxFuture<'static, (NodeId, Result<Sources>)>>,
    sources: SelectAll<BoxStream<'static, (NodeId, Result<Source>)>>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    done: bool,
}

impl Scatter {
    /// The providers the request went to.
    pub fn providers(&self) -> &[NodeId] {
        &self.providers
    }

    fn finish(&mut self) -> Poll<Option<(NodeId, Result<Source>)>> {
        self.done = true;
        self.posting = FuturesUnordered::new();
        self.sources = SelectAll::new();
        Poll::Ready(None)
    }
}

impl fmt::Debug for Scatter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scatter")
            .field("providers", &self.providers.len())
            .field("posting", &self.posting.len())
            .field("announcing", &self.sources.len())
            .finish()
    }
}

impl Stream for Scatter {
    type Item = (NodeId, Result<Source>);

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            return this.finish();
        }
        while let Poll::Ready(Some((node, posted))) = this.posting.poll_next_unpin(cx) {
            match posted {
                Ok(sources) => this.sources.push(sources.map(move |s| (node, s)).boxed()),
                Err(e) => return Poll::Ready(Some((node, Err(e)))),
            }
        }
        match this.sources.poll_next_unpin(cx) {
            Poll::Ready(Some(item)) => Poll::Ready(Some(item)),
            // Every request posted said its last word, and none is still posting.
            Poll::Ready(None) if this.posting.is_empty() => this.finish(),
            _ => Poll::Pending,
        }
    }
}
