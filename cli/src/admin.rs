//! The admin service every node the CLI runs (`chanserv node`, `chanserv serve`)
//! binds under the reserved name [`ADMIN`]: a request `names` or `peers` gets one
//! source (header: the request) with one frame, a JSON object ([`NamesReply`],
//! [`PeersReply`]). `chanserv names` / `chanserv peers` post it to one node with
//! `Client::post_to`, since every CLI node binds the same name.
//!
//! Names beginning with `chanserv.` are reserved for the CLI: never relayed, hidden
//! by `chanserv names` unless `--all`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use chanserv::{Bytes, Node, ServeHandle, Server, Source};
use futures::stream;
use serde::{Deserialize, Serialize};

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

/// What the admin service knows beyond the node itself.
#[derive(Debug, Clone, Default)]
pub struct AdminInfo {
    pub listen: Vec<String>,
    /// Kept up to date by the relay.
    pub relayed: Arc<Mutex<BTreeSet<String>>>,
}

/// Binds [`ADMIN`] on `node`.
pub fn serve(node: &Node, info: AdminInfo) -> Result<ServeHandle, Fail> {
    let n = node.clone();
    Server::new(node.clone())
        .listen_and_serve(ADMIN, move |req| {
            let answer = answer(&n, &info, &req.body);
            stream::iter([answer.map(|json| Source::new(req.body.clone(), stream::iter([json])))])
        })
        .map_err(|e| Fail::usage(format!("cannot bind {ADMIN}: {e}")))
}

fn answer(node: &Node, info: &AdminInfo, what: &[u8]) -> Result<Bytes, String> {
    let json = match what {
        b"names" => serde_json::to_vec(&NamesReply {
            node: hex(node.id()),
            services: node
                .services()
                .into_iter()
                .map(|(name, ids)| (name, ids.into_iter().map(hex).collect()))
                .collect(),
            relayed: info.relayed.lock().unwrap().iter().cloned().collect(),
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
        other => {
            return Err(format!(
                "unknown admin request {:?}: ask names or peers",
                String::from_utf8_lossy(other)
            ))
        }
    };
    json.map(Bytes::from).map_err(|e| e.to_string())
}
