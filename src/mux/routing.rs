//! The routing table (`PROTOCOL.md`, "Routing"): a path vector. Each linked peer
//! tells this node every node it reaches, with the path it takes and the names and
//! environment of that node (ROUTES); this node keeps, per destination, the shortest
//! path that is loop-free and within [`HOP_LIMIT`], and tells its own peers what it
//! keeps. Pure bookkeeping under the node's lock: no I/O, no clocks.
//!
//! Loops: a node drops every entry whose path holds its own id, and does not
//! advertise to a peer a route that goes through that peer. A withdrawn route is
//! simply missing from the peer's next ROUTES (each replaces the last), and every
//! route learnt from a peer goes with its last link, so a link that goes down
//! withdraws, hop by hop, every route through it.
//!
//! Names of a linked peer come from its NAMES (filtered by `authz`), never from its
//! ROUTES: a peer relays the names of nodes beyond it, but cannot claim for its own
//! node a name this node does not admit from it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::NodeId;
use crate::proto::link::RouteAd;

/// The most hops a route may take (and a relayed stream: its `ttl`).
pub(crate) const HOP_LIMIT: usize = 16;

/// What this node knows of one node it reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reach {
    /// The linked peer the route starts with, then each node after it, the
    /// destination last: its length is the number of hops.
    pub(super) path: Vec<NodeId>,
    /// The destination's environment.
    pub(super) env: String,
    /// The service names the destination binds.
    pub(super) names: BTreeSet<String>,
}

impl Reach {
    /// The linked peer a stream to the destination goes to first.
    pub(super) fn next(&self) -> NodeId {
        self.path[0]
    }

    /// Hops to the destination (1 for a linked peer).
    pub(super) fn hops(&self) -> usize {
        self.path.len()
    }
}

/// The routes a node learnt from its linked peers, and the best one per node.
#[derive(Debug, Default)]
pub(super) struct Routing {
    /// The last ROUTES of each linked peer.
    ads: HashMap<NodeId, Vec<RouteAd>>,
    /// The best route to every node reached (never this node).
    best: BTreeMap<NodeId, Reach>,
}

impl Routing {
    /// Records a linked peer's ROUTES (replacing its last).
    pub(super) fn set_ads(&mut self, peer: NodeId, ads: Vec<RouteAd>) {
        self.ads.insert(peer, ads);
    }

    /// Forgets what a peer advertised (its last link went down).
    pub(super) fn forget(&mut self, peer: NodeId) {
        self.ads.remove(&peer);
    }

    /// The best route to every node, by destination.
    pub(super) fn best(&self) -> &BTreeMap<NodeId, Reach> {
        &self.best
    }

    /// The best route to `node`, if it is reached.
    pub(super) fn to(&self, node: NodeId) -> Option<&Reach> {
        self.best.get(&node)
    }

    /// Computes the best routes again from the linked peers (`linked`: each with the
    /// names of its NAMES) and their last ROUTES. True when they changed.
    pub(super) fn recompute(
        &mut self,
        here: NodeId,
        linked: &BTreeMap<NodeId, BTreeSet<String>>,
    ) -> bool {
        let mut best: BTreeMap<NodeId, Reach> = BTreeMap::new();
        for (peer, names) in linked {
            let env = self.peer_env(*peer);
            best.insert(
                *peer,
                Reach {
                    path: vec![*peer],
                    env,
                    names: names.clone(),
                },
            );
        }
        for (peer, ads) in &self.ads {
            if !linked.contains_key(peer) {
                continue;
            }
            for ad in ads.iter().filter(|ad| usable(ad, *peer, here)) {
                let dest = *ad.path.last().expect("usable paths are not empty");
                let better = match best.get(&dest) {
                    None => true,
                    Some(r) => (ad.path.len(), ad.path[0]) < (r.hops(), r.next()),
                };
                if better {
                    let reach = Reach {
                        path: ad.path.clone(),
                        env: ad.env.clone(),
                        names: ad.names.clone(),
                    };
                    best.insert(dest, reach);
                }
            }
        }
        let changed = best != self.best;
        self.best = best;
        changed
    }

    /// The environment a linked peer declared for itself in its ROUTES (`""` until
    /// it did, or if it never does).
    fn peer_env(&self, peer: NodeId) -> String {
        let own = self.ads.get(&peer).into_iter().flatten();
        own.into_iter()
            .find(|ad| ad.path == [peer])
            .map(|ad| ad.env.clone())
            .unwrap_or_default()
    }

    /// The ROUTES this node sends `to`: itself first (its environment; its names go in
    /// NAMES), then every best route that does not go through `to`, each one hop
    /// longer, within the hop limit.
    pub(super) fn ads_for(&self, here: NodeId, env: &str, to: NodeId) -> Vec<RouteAd> {
        let mut ads = vec![RouteAd {
            path: vec![here],
            env: env.to_owned(),
            names: BTreeSet::new(),
        }];
        for r in self.best.values() {
            if r.path.contains(&to) || r.hops() >= HOP_LIMIT {
                continue;
            }
            let mut path = Vec::with_capacity(r.hops() + 1);
            path.push(here);
            path.extend_from_slice(&r.path);
            ads.push(RouteAd {
                path,
                env: r.env.clone(),
                names: r.names.clone(),
            });
        }
        ads
    }

    /// The names each reached node of environment `env` provides (nodes of other
    /// environments provide none here).
    pub(super) fn names_in(&self, env: &str) -> BTreeMap<NodeId, BTreeSet<String>> {
        self.best
            .iter()
            .filter(|(_, r)| r.env == env && !r.names.is_empty())
            .map(|(n, r)| (*n, r.names.clone()))
            .collect()
    }
}

/// An entry of `peer`'s ROUTES this node may use: it starts at `peer`, ends at
/// another node, visits no node twice (this one not at all), and fits the limit.
fn usable(ad: &RouteAd, peer: NodeId, here: NodeId) -> bool {
    if ad.path.len() < 2 || ad.path.len() > HOP_LIMIT || ad.path[0] != peer {
        return false;
    }
    let mut seen = BTreeSet::new();
    ad.path.iter().all(|n| *n != here && seen.insert(*n))
}

#[cfg(test)]
#[path = "routing_tests.rs"]
mod tests;
