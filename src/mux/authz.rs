//! What an authenticated peer may do: link at all (`allow_peers`), announce which
//! service names (`allow_names`, `authorize_names`), and hold which node id. The
//! [`Policy`] is pure decisions; the hooks below it apply them to a link's NAMES
//! message and registration. Authentication itself (certificates, the handshake) is
//! `tls`'s; links without an identity (plaintext, or `Node::attach`ed) are not
//! checked here: whoever made them vouches for them.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::link::{hex, Link};
use super::node::Inner;
use super::registry::State;
use crate::error::{Error, Result};
use crate::proto::link::Control;

/// A caller's decision on one name: `(peer identity, service name) -> allowed`.
pub(super) type NameCheck = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// Who may link and who may announce what. The default allows every peer whose
/// certificate the CA issued to link and to announce any name.
#[derive(Clone, Default)]
pub(super) struct Policy {
    /// Identity patterns allowed to link; empty: every identity.
    peers: Vec<String>,
    /// `(identity pattern, name patterns)`: who may announce which names.
    names: Vec<(String, Vec<String>)>,
    /// Consulted after the rules: a name is allowed if a rule or this allows it.
    check: Option<NameCheck>,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("peers", &self.peers)
            .field("names", &self.names)
            .field("check", &self.check.as_ref().map(|_| "Fn(identity, name)"))
            .finish()
    }
}

impl Policy {
    pub(super) fn allow_peers(&mut self, patterns: impl IntoIterator<Item = String>) {
        self.peers.extend(patterns);
    }

    pub(super) fn allow_names(&mut self, identity: String, names: Vec<String>) {
        self.names.push((identity, names));
    }

    pub(super) fn authorize_names(&mut self, check: NameCheck) {
        self.check = Some(check);
    }

    /// May a peer with this identity link to this node?
    pub(super) fn may_link(&self, identity: &str) -> bool {
        self.peers.is_empty() || self.peers.iter().any(|p| glob(p, identity))
    }

    /// May a peer with this identity announce `name`? Without rules or a callback,
    /// yes; with any, only what one of them allows.
    pub(super) fn may_announce(&self, identity: &str, name: &str) -> bool {
        if self.names.is_empty() && self.check.is_none() {
            return true;
        }
        let by_rule = self
            .names
            .iter()
            .any(|(who, names)| glob(who, identity) && names.iter().any(|n| glob(n, name)));
        by_rule || self.check.as_ref().is_some_and(|f| f(identity, name))
    }
}

/// Shell-style match where `*` stands for any run of characters (none included) and
/// every other character for itself: `"kv-*"`, `"*.mesh"`, `"*"`.
pub(super) fn glob(pattern: &str, s: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), s.as_bytes());
    let (mut i, mut j) = (0, 0);
    // Where the last `*` was, and the position in `s` it currently swallows up to.
    let mut star: Option<(usize, usize)> = None;
    while j < s.len() {
        if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && p[i] == s[j] {
            i += 1;
            j += 1;
        } else if let Some((si, sj)) = star {
            // Let the last `*` swallow one more character and retry after it.
            star = Some((si, sj + 1));
            (i, j) = (si + 1, sj + 1);
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == b'*')
}

/// The REFUSED control message (a whole frame) for `names`.
fn refused_message(names: BTreeSet<String>) -> Bytes {
    let mut m = BytesMut::new();
    // Names came from a NAMES message: each is at most 255 bytes, and they were
    // fewer than a control frame holds.
    if let Err(e) = Control::Refused(names).encode(&mut m) {
        tracing::error!("REFUSED not sent: {e}");
    }
    m.freeze()
}

impl Inner {
    /// The names of a peer's NAMES message that this node routes to it: those its
    /// identity may announce. The others are logged and the peer is told (REFUSED).
    pub(super) fn authorize_names(&self, link: &Link, names: BTreeSet<String>) -> BTreeSet<String> {
        let (Some(tls), Some(identity)) = (&self.cfg.tls, &link.identity) else {
            return names;
        };
        let (allowed, refused): (BTreeSet<_>, BTreeSet<_>) = names
            .into_iter()
            .partition(|n| tls.policy.may_announce(identity, n));
        if !refused.is_empty() {
            tracing::warn!(
                peer = %hex(link.peer),
                identity = %identity,
                ?refused,
                "names announced by a peer that may not announce them: not routed to it"
            );
            link.send_control(refused_message(refused.clone()));
        }
        allowed
    }

    /// The peer refused to route some of the names this node announced.
    pub(super) fn on_names_refused(&self, link: &Link, names: BTreeSet<String>) {
        tracing::warn!(
            peer = %hex(link.peer),
            identity = %link.identity.as_deref().unwrap_or("-"),
            ?names,
            "the peer refused names this node announced (not authorized for this node's \
             identity): it does not route them here"
        );
    }
}

/// A node id belongs to one identity at a time: a link whose identity differs from
/// that of the links already up to the same node id is refused, so an authenticated
/// peer cannot take over another node's id (and with it the names that node may
/// announce and the dials addressed to it).
pub(super) fn check_identity(st: &State, link: &Link) -> Result<()> {
    let Some(held) = st.links.get(&link.peer).and_then(|l| l.first()) else {
        return Ok(());
    };
    if held.identity == link.identity {
        return Ok(());
    }
    let who = |i: &Option<String>| match i {
        Some(identity) => format!("as {identity}"),
        None => "without an identity".into(),
    };
    Err(Error::Tls(format!(
        "node id {} is linked already {}; refused a link claiming it {}",
        hex(link.peer),
        who(&held.identity),
        who(&link.identity)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_runs_of_characters() {
        let yes = [
            ("*", ""),
            ("*", "kv"),
            ("kv", "kv"),
            ("kv-*", "kv-"),
            ("kv-*", "kv-12"),
            ("*.mesh", "a.b.mesh"),
            ("a*b*c", "aXbYbZc"),
            ("**", "x"),
            ("search:*", "search:7"),
        ];
        for (p, s) in yes {
            assert!(glob(p, s), "{p:?} should match {s:?}");
        }
        let no = [
            ("kv", "kv2"),
            ("kv", "k"),
            ("kv-*", "kv"),
            ("*.mesh", "mesh"),
            ("a*b*c", "aXbY"),
            ("", "a"),
        ];
        for (p, s) in no {
            assert!(!glob(p, s), "{p:?} should not match {s:?}");
        }
    }

    #[test]
    fn without_rules_every_name_is_allowed_and_with_rules_only_theirs() {
        let mut p = Policy::default();
        assert!(p.may_link("anyone") && p.may_announce("anyone", "kv"));
        p.allow_names("kv-*.mesh".into(), vec!["kv".into(), "kv:*".into()]);
        assert!(p.may_announce("kv-1.mesh", "kv"));
        assert!(p.may_announce("kv-1.mesh", "kv:3"));
        assert!(!p.may_announce("kv-1.mesh", "search"));
        assert!(!p.may_announce("web.mesh", "kv"));
        p.authorize_names(Arc::new(|who, name| who == "web.mesh" && name == "www"));
        assert!(p.may_announce("web.mesh", "www"));
        assert!(!p.may_announce("web.mesh", "kv"));
        p.allow_peers(["*.mesh".to_owned()]);
        assert!(p.may_link("web.mesh") && !p.may_link("web.other"));
    }

    #[test]
    fn refused_names_use_the_names_layout() {
        let names: BTreeSet<String> = ["a".into(), "search:7".into()].into();
        let mut m = BytesMut::from(refused_message(names.clone()));
        let body = crate::proto::frame::FrameCodec::new()
            .decode(&mut m)
            .unwrap()
            .unwrap();
        assert_eq!(body[0], 5, "kind REFUSED");
        assert_eq!(Control::decode(body).unwrap(), Control::Refused(names));
    }
}
