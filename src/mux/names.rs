//! The registry as a [`Node`]'s users see it: the names, providers and routes of the
//! mesh, and waiting for them. Snapshots taken under the node's lock; the bookkeeping
//! is `registry`'s and `routing`'s.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::{timeout_at, Instant};

use super::{DialOptions, Node, NodeId, Provider, RouteInfo, VAddr};
use crate::error::{Error, Result};

impl Node {
    /// Waits until a dial to `name` can be routed (bound here, or by a node of the
    /// mesh), up to `within`: names bound elsewhere reach a node a moment after the
    /// links are up or the bind happened (a moment per hop). [`Error::NoSuchAddress`]
    /// when the time is up, [`Error::InvalidAddress`] for a malformed name.
    pub async fn wait_for_name(&self, name: &str, within: Duration) -> Result<()> {
        let v = VAddr::parse(name)?;
        if self
            .wait_until(within, || {
                self.inner.route(&v, &DialOptions::new(within)).is_ok()
            })
            .await
        {
            Ok(())
        } else {
            Err(Error::NoSuchAddress(name.to_owned()))
        }
    }

    /// The nodes a dial to the service `name` may reach: this node if it binds the
    /// name, and every node of its environment that the mesh routes to and that
    /// binds it, however far (see [`NodeConfig::environment`]). Sorted by node id.
    ///
    /// [`NodeConfig::environment`]: super::NodeConfig::environment
    pub fn providers(&self, name: &str) -> Vec<NodeId> {
        let st = self.inner.state.lock().unwrap();
        let mut v: Vec<NodeId> = st.providers_of(name).into_iter().map(|p| p.0).collect();
        if st.binds.contains_key(name) {
            v.push(self.inner.id);
        }
        v.sort_unstable();
        v
    }

    /// Every service name this node can route, with its providers (as
    /// [`providers`](Node::providers) gives them) and how far each is. A snapshot;
    /// [`Node::subscribe`] tells when names appear or disappear.
    pub fn services(&self) -> BTreeMap<String, Vec<Provider>> {
        let all = self.inner.state.lock().unwrap().services(self.inner.id);
        let provider = |(node, hops)| Provider { node, hops };
        all.into_iter()
            .map(|(name, v)| (name, v.into_iter().map(provider).collect()))
            .collect()
    }

    /// Every node this node reaches through the mesh, its linked peers included, by
    /// node id: the path a stream to it takes and the names it provides. A snapshot;
    /// routes change as links come and go.
    pub fn routes(&self) -> Vec<RouteInfo> {
        let st = self.inner.state.lock().unwrap();
        let best = st.routing.best().iter();
        best.map(|(node, r)| RouteInfo {
            node: *node,
            path: r.path.clone(),
            environment: r.env.clone(),
            // Names of another environment are not this node's to see.
            names: match r.env == st.env {
                true => r.names.iter().cloned().collect(),
                false => Vec::new(),
            },
        })
        .collect()
    }

    /// Waits until at least `count` nodes provide the service `name` (see
    /// [`providers`](Node::providers)), up to `within`. [`Error::NoSuchAddress`] when
    /// the time is up with fewer.
    pub async fn wait_for_providers(
        &self,
        name: &str,
        count: usize,
        within: Duration,
    ) -> Result<()> {
        if self
            .wait_until(within, || self.providers(name).len() >= count)
            .await
        {
            Ok(())
        } else {
            Err(Error::NoSuchAddress(format!(
                "{name} (fewer than {count} providers)"
            )))
        }
    }

    async fn wait_until(&self, within: Duration, mut ready: impl FnMut() -> bool) -> bool {
        let until = Instant::now() + within;
        loop {
            let changed = self.inner.names_changed.notified();
            if ready() {
                return true;
            }
            if timeout_at(until, changed).await.is_err() {
                return false;
            }
        }
    }
}
