//! The relay of `chanserv node`: it makes the services of the nodes joined to it
//! reachable from every other node joined to it.
//!
//! Why: the library announces a node's names to its linked peers only, and a source's
//! child stream is dialed back to the client's node over a direct link. A client
//! joined to a hub therefore cannot post to a service whose node is joined to the
//! same hub. So the hub binds each name its peers provide and forwards every request
//! to one of them (`Client::post_to`), handing the sources it receives to its own
//! caller untouched: frames keep their backpressure, errors their messages.
//!
//! Loops: the hub also binds [`RELAY_MARK`]; names provided only by relays are not
//! relayed again, and a relay forwards to origin providers only. So a request
//! crosses at most one relay, and a service must be joined to the same hub as its
//! clients (or be joined by them directly).
//!
//! When: the relay subscribes to the node's link events ([`Node::subscribe`]) and
//! looks at [`Node::services`] again on each `Names` event of a peer (a peer's last
//! `Names` comes before its `Down`), and after missed events.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chanserv::{
    BoxError, Client, Error, LinkEvent, Multiplexer, Node, NodeId, Request, ServeHandle, Server,
};
use futures::StreamExt;
use tokio::sync::oneshot;

use crate::admin::{is_reserved, Served, RELAY_MARK};
use crate::mesh::describe;
use crate::Fail;

/// A running relay; [`stop`](Relay::stop) ends it gracefully. Dropping it stops the
/// relaying at once (requests in flight are cancelled).
pub struct Relay {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    served: Served,
    _mark: chanserv::NodeListener,
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Empty after `stop`: it took the handles for a graceful shutdown.
        drop(self.served.take());
    }
}

impl Relay {
    /// Starts relaying on `node`; the relayed services go into `served` (shared with
    /// the admin service and the metrics).
    pub fn start(node: Node, served: Served) -> Result<Relay, Fail> {
        let mark = node
            .bind(RELAY_MARK)
            .map_err(|e| Fail::usage(format!("cannot bind {RELAY_MARK}: {e}")))?;
        let client = Client::new(node.clone())
            .map_err(|e| Fail::usage(format!("cannot start the relay: {e}")))?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(node, client, served.clone(), stopped));
        Ok(Relay {
            stop: Some(stop),
            task,
            served,
            _mark: mark,
        })
    }

    /// Stops relaying new requests; lets those in flight finish for up to `grace`.
    pub async fn stop(mut self, grace: Duration) {
        if let Some(s) = self.stop.take() {
            if s.send(()).is_err() {
                tracing::debug!("the relay had stopped already");
            }
        }
        if (&mut self.task).await.is_err() {
            tracing::debug!("the relay's task failed");
        }
        let handles = self.served.take();
        futures::future::join_all(handles.into_iter().map(|h| h.shutdown(grace))).await;
    }
}

async fn run(node: Node, client: Client, served: Served, mut stop: oneshot::Receiver<()>) {
    // Subscribed before the first look, so no change after it goes unseen.
    let mut events = node.subscribe();
    sync(&node, &client, &served);
    loop {
        let event = tokio::select! {
            _ = &mut stop => return,
            e = events.next() => e,
        };
        match event {
            // This node's own names (the relay's binds among them) change nothing.
            Some(LinkEvent::Names { node: n, .. }) if n == node.id() => {}
            Some(LinkEvent::Names { .. } | LinkEvent::Missed(_)) => sync(&node, &client, &served),
            Some(_) => {}
            // The node is gone.
            None => return,
        }
    }
}

/// The providers of `name` a relay may forward to: not this node, not a relay.
fn origins(node: &Node, name: &str) -> Vec<NodeId> {
    let relays = node.providers(RELAY_MARK);
    node.providers(name)
        .into_iter()
        .filter(|p| *p != node.id() && !relays.contains(p))
        .collect()
}

/// Binds the names that have origin providers, unbinds those that lost theirs.
fn sync(node: &Node, client: &Client, served: &Served) {
    let wanted: BTreeSet<String> = node
        .services()
        .into_keys()
        .filter(|name| !is_reserved(name) && !origins(node, name).is_empty())
        .collect();
    for name in served.retain(|name| wanted.contains(name)) {
        say!("relay remove {name}");
    }
    for name in wanted {
        if served.contains(&name) {
            continue;
        }
        match relay_one(node, client, &name) {
            Ok(h) => {
                say!("relay add {name}");
                served.insert(name, h);
            }
            Err(e) => tracing::warn!("cannot relay {name}: {e}"),
        }
    }
}

/// Serves `name` by forwarding each request to its origin providers in turn.
fn relay_one(node: &Node, client: &Client, name: &str) -> chanserv::Result<ServeHandle> {
    let (node2, client, name2) = (node.clone(), client.clone(), name.to_owned());
    let turn = Arc::new(AtomicUsize::new(0));
    Server::new(node.clone()).listen_and_serve_async(name, move |req: Request| {
        let (node, client, name) = (node2.clone(), client.clone(), name2.clone());
        let start = turn.fetch_add(1, Ordering::Relaxed);
        async move {
            let sources = forward(&node, &client, &name, req, start).await?;
            Ok(sources.map(|r| r.map_err(origin_message)))
        }
    })
}

async fn forward(
    node: &Node,
    client: &Client,
    name: &str,
    req: Request,
    start: usize,
) -> Result<chanserv::Sources, BoxError> {
    let providers = origins(node, name);
    let mut last = format!("no provider of {name} is linked to the relay");
    for i in 0..providers.len() {
        let peer = providers[(start + i) % providers.len()];
        match client
            .post_to(peer, name, req.body.clone(), req.tags())
            .await
        {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("relay to {peer:016x}: {}", describe(&e)),
        }
    }
    Err(last.into())
}

/// The origin's failure as this relay passes it on. The library sends a failed
/// request's error in its display form (`source function failed: <message>`), and
/// the relay's server adds that prefix again: strip it here, so a client reads the
/// origin's message with one prefix, as if it had posted directly.
fn origin_message(e: Error) -> BoxError {
    const PREFIX: &str = "source function failed: ";
    match e {
        Error::RequestFailed(m) => match m.strip_prefix(PREFIX) {
            Some(inner) => inner.to_owned().into(),
            None => m.into(),
        },
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relayed_failure_reads_as_a_direct_one() {
        let direct = Error::RequestFailed("source function failed: no file".into());
        let relayed = Error::SourceFunc(origin_message(direct).to_string());
        assert_eq!(relayed.to_string(), "source function failed: no file");
        let other = origin_message(Error::RequestFailed("serving timeout".into()));
        assert_eq!(other.to_string(), "serving timeout");
    }
}
