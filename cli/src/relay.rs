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
//! The library tells link changes ([`Node::subscribe`]) but not name changes, so the
//! relay also looks at [`Node::services`] every [`RESCAN`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chanserv::{BoxError, Client, Error, Multiplexer, Node, NodeId, Request, ServeHandle, Server};
use futures::StreamExt;
use tokio::sync::oneshot;

use crate::admin::{is_reserved, RELAY_MARK};
use crate::mesh::describe;
use crate::Fail;

/// How often the relay looks for names that came or went.
const RESCAN: Duration = Duration::from_millis(200);

/// A running relay; [`stop`](Relay::stop) ends it gracefully. Dropping it stops the
/// relaying at once (requests in flight are cancelled).
pub struct Relay {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<BTreeMap<String, ServeHandle>>,
    _mark: chanserv::NodeListener,
}

impl Relay {
    /// Starts relaying on `node`; `relayed` is kept up to date for the admin service.
    pub fn start(node: Node, relayed: Arc<Mutex<BTreeSet<String>>>) -> Result<Relay, Fail> {
        let mark = node
            .bind(RELAY_MARK)
            .map_err(|e| Fail::usage(format!("cannot bind {RELAY_MARK}: {e}")))?;
        let client = Client::new(node.clone())
            .map_err(|e| Fail::usage(format!("cannot start the relay: {e}")))?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(node, client, relayed, stopped));
        Ok(Relay {
            stop: Some(stop),
            task,
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
        let Ok(served) = (&mut self.task).await else {
            return;
        };
        futures::future::join_all(served.into_values().map(|h| h.shutdown(grace))).await;
    }
}

async fn run(
    node: Node,
    client: Client,
    relayed: Arc<Mutex<BTreeSet<String>>>,
    mut stop: oneshot::Receiver<()>,
) -> BTreeMap<String, ServeHandle> {
    let mut served: BTreeMap<String, ServeHandle> = BTreeMap::new();
    let mut events = node.subscribe();
    loop {
        sync(&node, &client, &mut served);
        *relayed.lock().unwrap() = served.keys().cloned().collect();
        tokio::select! {
            _ = &mut stop => return served,
            _ = tokio::time::sleep(RESCAN) => {}
            _ = events.next() => {}
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
fn sync(node: &Node, client: &Client, served: &mut BTreeMap<String, ServeHandle>) {
    let wanted: BTreeSet<String> = node
        .services()
        .into_keys()
        .filter(|name| !is_reserved(name) && !origins(node, name).is_empty())
        .collect();
    served.retain(|name, _| {
        let keep = wanted.contains(name);
        if !keep {
            println!("relay remove {name}");
        }
        keep
    });
    for name in wanted {
        if served.contains_key(&name) {
            continue;
        }
        match relay_one(node, client, &name) {
            Ok(h) => {
                println!("relay add {name}");
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
