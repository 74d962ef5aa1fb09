//! The admin service every node the CLI runs (`chanserv node`, `chanserv serve`)
//! binds under the reserved name [`ADMIN`]: a request `names`, `peers`, `routes`,
//! `stats` or `services` gets one source (header: the request) with one frame, a JSON
//! object ([`NamesReply`], [`PeersReply`], [`RoutesReply`], and in `stats`:
//! `StatsReply`, `ServicesReply`). `chanserv names` / `peers` / `routes` / `stats`
//! post it to one node with `Client::post_to`,
//! since every CLI node binds the same name.
//!
//! `stats` is the node's links and the stats of every service served by the CLI
//! processes it knows: its own, and those of each linked peer that binds [`ADMIN`],
//! which it asks for `services` (their own services only, so nothing loops).
//! Names beginning with `chanserv.` are reserved for the CLI: never relayed, hidden
//! by `chanserv names` unless `--all`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chanserv::{BoxError, Bytes, Client, Node, NodeId, ServeHandle, Server, ServiceStats, Source};
use futures::{stream, StreamExt};
use serde::{Deserialize, Serialize};

use crate::mesh::describe;
use crate::stats;
use crate::units::hex;
use crate::Fail;

/// The admin service's name, the same on every CLI node.
pub const ADMIN: &str = "chanserv.admin";
/// Bound by nodes that relay the names of their peers (see `relay`): a relay never
/// forwards to another relay, so requests cannot loop.
pub const RELAY_MARK: &str = "chanserv.relay";

/// True for the names the CLI reserves.
pub fn is_reserved(name: &str) -> bool {
    name.starts_with("chanserv.")
}

/// The answer to `names`: every service name the node can route, with its providers.
#[derive(Debug, Serialize, Deserialize)]
pub struct NamesReply {
    /// The answering node's id (16 hex digits).
    pub node: String,
    /// Name → ids of the nodes that provide it (this node included).
    pub services: BTreeMap<String, Vec<String>>,
    /// The names this node provides only as a relay for its peers.
    pub relayed: Vec<String>,
}

/// The answer to `peers`: the node's links.
#[derive(Debug, Serialize, Deserialize)]
pub struct PeersReply {
    /// The answering node's id.
    pub node: String,
    /// Where it accepts links.
    pub listen: Vec<String>,
    /// Links established since it started (reconnects and rotations included).
    pub links_established: u64,
    /// Linked peers, by id.
    pub peers: Vec<PeerInfo>,
}

/// One linked peer.
#[derive(Debug, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The peer's id.
    pub id: String,
    /// Links to it (more than one while a link drains after a rotation).
    pub links: usize,
}

/// The answer to `routes`: every node the answering node reaches through the mesh.
#[derive(Debug, Serialize, Deserialize)]
pub struct RoutesReply {
    /// The answering node's id.
    pub node: String,
    /// One per node reached, by id.
    pub routes: Vec<RouteLine>,
}

/// The route to one node, as [`Node::routes`] gives it.
#[derive(Debug, Serialize, Deserialize)]
pub struct RouteLine {
    /// The node reached.
    pub id: String,
    /// The nodes a stream to it passes: the linked peer first, `id` last.
    pub path: Vec<String>,
    /// The service names it provides (none when of another environment).
    pub names: Vec<String>,
}

impl RoutesReply {
    /// `node`'s routes now.
    pub fn of(node: &Node) -> Self {
        RoutesReply {
            node: hex(node.id()),
            routes: node
                .routes()
                .into_iter()
                .map(|r| RouteLine {
                    id: hex(r.node),
                    path: r.path.into_iter().map(hex).collect(),
                    names: r.names,
                })
                .collect(),
        }
    }
}

/// Services a process serves, by name: shared by the code that binds them, the
/// admin service (`stats`) and the metrics endpoint (`prom`).
#[derive(Debug, Clone, Default)]
pub struct Served(Arc<Mutex<BTreeMap<String, ServeHandle>>>);

impl Served {
    pub fn insert(&self, name: String, handle: ServeHandle) {
        self.0.lock().unwrap().insert(name, handle);
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.lock().unwrap().contains_key(name)
    }

    pub fn names(&self) -> Vec<String> {
        self.0.lock().unwrap().keys().cloned().collect()
    }

    /// Each service's stats now, by name.
    pub fn stats(&self) -> Vec<(String, ServiceStats)> {
        let map = self.0.lock().unwrap();
        map.iter().map(|(n, h)| (n.clone(), h.stats())).collect()
    }

    /// Keeps the services `keep` says yes to; the others stop at once (their handles
    /// drop). Returns the names removed.
    pub fn retain(&self, mut keep: impl FnMut(&str) -> bool) -> Vec<String> {
        let mut map = self.0.lock().unwrap();
        let gone: Vec<String> = map.keys().filter(|n| !keep(n)).cloned().collect();
        for n in &gone {
            map.remove(n);
        }
        gone
    }

    /// Takes every handle out, for a graceful shutdown.
    pub fn take(&self) -> Vec<ServeHandle> {
        std::mem::take(&mut *self.0.lock().unwrap())
            .into_values()
            .collect()
    }
}

/// What the admin service knows beyond the node itself.
#[derive(Debug, Clone, Default)]
pub struct AdminInfo {
    pub listen: Vec<String>,
    /// The services this process serves (`chanserv serve`'s one).
    pub served: Served,
    /// The services it relays for its peers, kept up to date by the relay.
    pub relayed: Served,
}

/// Binds [`ADMIN`] on `node`.
pub fn serve(node: &Node, info: AdminInfo) -> Result<ServeHandle, Fail> {
    let fail = |e: chanserv::Error| Fail::usage(format!("cannot bind {ADMIN}: {e}"));
    let ctx = Arc::new(Ctx {
        node: node.clone(),
        client: Client::new(node.clone()).map_err(fail)?,
        info,
    });
    Server::new(node.clone())
        .listen_and_serve_async(ADMIN, move |req| {
            let ctx = ctx.clone();
            async move {
                let json = ctx.answer(&req.body).await?;
                Ok(stream::iter([Source::new(req.body, stream::iter([json]))]))
            }
        })
        .map_err(fail)
}

/// What the admin service answers from.
struct Ctx {
    node: Node,
    /// Asks the peers for `services`.
    client: Client,
    info: AdminInfo,
}

impl Ctx {
    async fn answer(&self, what: &[u8]) -> Result<Bytes, BoxError> {
        let json = match what {
            b"stats" => {
                serde_json::to_vec(&stats::gather(&self.node, &self.client, &self.info).await)
            }
            b"services" => serde_json::to_vec(&stats::services_reply(&self.node, &self.info)),
            other => Self::answer_now(&self.node, &self.info, other)?,
        };
        Ok(Bytes::from(json?))
    }

    /// `names`, `peers` and `routes`.
    fn answer_now(
        node: &Node,
        info: &AdminInfo,
        what: &[u8],
    ) -> Result<serde_json::Result<Vec<u8>>, String> {
        Ok(match what {
            b"names" => serde_json::to_vec(&NamesReply {
                node: hex(node.id()),
                services: node
                    .services()
                    .into_iter()
                    .map(|(name, ps)| (name, ps.into_iter().map(|p| hex(p.node)).collect()))
                    .collect(),
                relayed: info.relayed.names(),
            }),
            b"peers" => {
                let mut ids = node.peers();
                ids.sort_unstable();
                serde_json::to_vec(&PeersReply {
                    node: hex(node.id()),
                    listen: info.listen.clone(),
                    links_established: node.links_established(),
                    peers: ids
                        .into_iter()
                        .map(|p| PeerInfo {
                            id: hex(p),
                            links: node.link_count(p),
                        })
                        .collect(),
                })
            }
            b"routes" => serde_json::to_vec(&RoutesReply::of(node)),
            other => {
                return Err(format!(
                    "unknown admin request {:?}: ask names, peers, routes, stats or services",
                    String::from_utf8_lossy(other)
                ))
            }
        })
    }
}

/// Posts `what` to the admin service of `peer` (linked to `client`'s node) and
/// returns its answer, the one frame of its one source.
pub async fn ask_peer(client: &Client, peer: NodeId, what: &str) -> Result<Vec<u8>, String> {
    let mut sources = client
        .post_to(peer, ADMIN, what.to_owned(), &[])
        .await
        .map_err(|e| describe(&e))?;
    let mut source = match sources.next().await {
        Some(s) => s.map_err(|e| e.to_string())?,
        None => return Err("the admin service answered nothing".to_owned()),
    };
    let mut json = Vec::new();
    while let Some(frame) = source.next().await {
        json.extend_from_slice(&frame.map_err(|e| e.to_string())?);
    }
    Ok(json)
}

/// [`ask_peer`] within `within`, its answer parsed.
pub async fn ask_peer_json<T: serde::de::DeserializeOwned>(
    client: &Client,
    peer: NodeId,
    what: &str,
    within: Duration,
) -> Result<T, String> {
    let json = tokio::time::timeout(within, ask_peer(client, peer, what))
        .await
        .map_err(|_| format!("no answer within {within:?}"))??;
    serde_json::from_slice(&json).map_err(|e| format!("bad JSON: {e}"))
}

/// The peers `stats` asks for their services: those that bind [`ADMIN`].
pub fn admin_peers(node: &Node) -> Vec<NodeId> {
    let mut peers: Vec<NodeId> = node
        .providers(ADMIN)
        .into_iter()
        .filter(|p| *p != node.id())
        .collect();
    peers.sort_unstable();
    peers
}
