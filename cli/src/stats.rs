//! `chanserv stats`: what a node's links carry and what the services it knows have
//! done, with the sources a slow consumer holds back now.
//!
//! How services report: each CLI process keeps the handles of the services it serves
//! (`admin::Served`: `chanserv serve`'s service, `chanserv node`'s relayed ones). The
//! admin request `stats` answers with the node's links, its own services, and the
//! services of every linked peer that binds the admin service, which it asks for
//! `services` (each peer within [`PEER_TIMEOUT`]; one that does not answer is listed
//! under `unanswered`). So `chanserv stats --join HUB` shows the hub's links and
//! every `chanserv serve` joined to it; asked of a `serve` process, it shows that
//! process's links and services (and those of the hub, its relayed ones).
//!
//! Text output, a line each:
//! - `node <id>`
//! - `link <peer> <addr> <active|draining> rtt=<d|-> age=<d> in=<bytes> out=<bytes>
//!   streams=<open> opened=<total> [identity=<name>]`
//! - `service <name> node=<id> [relay] requests=<n> active=<n> failed=<n>
//!   sources=<n> sending=<n> completed=<n> source_failed=<n> cut=<n> frames=<n>
//!   bytes=<n> waited=<d>`
//! - `blocked <name> node=<id> request=<id> source=<id> client=<node> waiting=<d>`:
//!   a source of that service waiting for its consumer on node `client`
//! - `unanswered <node>: <why>`
//!
//! `--json`: the node's answer, one JSON object ([`StatsReply`]); durations in
//! seconds.

use std::time::Duration;

use chanserv::{BlockedSource, Client, LinkState, LinkStats, Node, ServiceStats};
use serde::{Deserialize, Serialize};

use crate::admin::{admin_peers, ask_peer_json, AdminInfo};
use crate::query::{ask, Args};
use crate::units::hex;
use crate::Fail;

/// How long the admin service's `stats` waits for each peer's `services`.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// The answer to `stats`.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatsReply {
    /// The answering node's id.
    pub node: String,
    /// Links established since it started (reconnects and rotations included).
    pub links_established: u64,
    /// Its links, by peer, oldest first.
    pub links: Vec<LinkReport>,
    /// Its services and those of its peers that answered.
    pub services: Vec<ServiceReport>,
    /// The peers that bind the admin service but did not answer `services`.
    pub unanswered: Vec<Unanswered>,
}

/// The answer to `services`: a process's own services (relayed ones included).
#[derive(Debug, Serialize, Deserialize)]
pub struct ServicesReply {
    pub node: String,
    pub services: Vec<ServiceReport>,
}

/// One link (see `chanserv::LinkStats`).
#[derive(Debug, Serialize, Deserialize)]
pub struct LinkReport {
    pub peer: String,
    pub identity: Option<String>,
    pub addr: String,
    /// True when this node opened the link.
    pub dialed: bool,
    /// `active` or `draining`.
    pub state: String,
    pub age_secs: f64,
    /// The last keep-alive round trip; `null` until the first.
    pub rtt_secs: Option<f64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub streams_open: u64,
    pub streams_total: u64,
}

/// One service's counters (see `chanserv::ServiceStats`).
#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceReport {
    pub name: String,
    /// The node serving it.
    pub node: String,
    /// True for a service a `chanserv node` relays for its peers.
    pub relay: bool,
    pub requests_active: u64,
    pub requests_total: u64,
    pub requests_failed: u64,
    pub sources_active: u64,
    pub sources_total: u64,
    pub sources_completed: u64,
    pub sources_failed: u64,
    pub sources_cut: u64,
    pub frames_sent: u64,
    pub bytes_sent: u64,
    pub backpressure_wait_secs: f64,
    /// Its sources waiting for their consumer now, longest wait first.
    pub blocked: Vec<BlockedReport>,
}

/// A source waiting for its consumer.
#[derive(Debug, Serialize, Deserialize)]
pub struct BlockedReport {
    /// The request's id, as the client numbered it.
    pub request: u64,
    /// The source's id within the request.
    pub source: u32,
    /// The node the consumer is on.
    pub client: String,
    pub waiting_secs: f64,
}

/// A peer whose `services` did not come.
#[derive(Debug, Serialize, Deserialize)]
pub struct Unanswered {
    pub node: String,
    pub error: String,
}

fn link_report(l: &LinkStats) -> LinkReport {
    LinkReport {
        peer: hex(l.peer),
        identity: l.identity.clone(),
        addr: l.addr.clone(),
        dialed: l.dialed,
        state: match l.state {
            LinkState::Active => "active",
            LinkState::Draining => "draining",
            _ => "other",
        }
        .to_owned(),
        age_secs: l.age.as_secs_f64(),
        rtt_secs: l.rtt.map(|d| d.as_secs_f64()),
        bytes_in: l.bytes_in,
        bytes_out: l.bytes_out,
        streams_open: l.streams_open,
        streams_total: l.streams_total,
    }
}

fn blocked_report(b: &BlockedSource) -> BlockedReport {
    BlockedReport {
        request: b.request,
        source: b.source,
        client: hex(b.client.node()),
        waiting_secs: b.waiting.as_secs_f64(),
    }
}

fn service_report(node: &Node, name: String, relay: bool, st: &ServiceStats) -> ServiceReport {
    ServiceReport {
        name,
        node: hex(node.id()),
        relay,
        requests_active: st.requests_active,
        requests_total: st.requests_total,
        requests_failed: st.requests_failed,
        sources_active: st.sources_active,
        sources_total: st.sources_total,
        sources_completed: st.sources_completed,
        sources_failed: st.sources_failed,
        sources_cut: st.sources_cut,
        frames_sent: st.frames_sent,
        bytes_sent: st.bytes_sent,
        backpressure_wait_secs: st.backpressure_wait.as_secs_f64(),
        blocked: st.blocked.iter().map(blocked_report).collect(),
    }
}

/// The admin service's answer to `services`.
pub fn services_reply(node: &Node, info: &AdminInfo) -> ServicesReply {
    let own = info.served.stats().into_iter().map(|s| (s, false));
    let relayed = info.relayed.stats().into_iter().map(|s| (s, true));
    ServicesReply {
        node: hex(node.id()),
        services: own
            .chain(relayed)
            .map(|((name, st), relay)| service_report(node, name, relay, &st))
            .collect(),
    }
}

/// The admin service's answer to `stats`: asks the peers that bind the admin service
/// for their `services`, all at once.
pub async fn gather(node: &Node, client: &Client, info: &AdminInfo) -> StatsReply {
    let peers = admin_peers(node);
    let asks = peers
        .iter()
        .map(|&p| ask_peer_json::<ServicesReply>(client, p, "services", PEER_TIMEOUT));
    let answers = futures::future::join_all(asks).await;
    let st = node.stats();
    let mut reply = StatsReply {
        node: hex(node.id()),
        links_established: st.links_established,
        links: st.links.iter().map(link_report).collect(),
        services: services_reply(node, info).services,
        unanswered: Vec::new(),
    };
    for (peer, answer) in peers.into_iter().zip(answers) {
        match answer {
            Ok(r) => reply.services.extend(r.services),
            Err(error) => reply.unanswered.push(Unanswered {
                node: hex(peer),
                error,
            }),
        }
    }
    reply
}

/// `chanserv stats`: the answer as text lines, or as JSON (`--json`).
pub async fn run(args: Args) -> Result<u8, Fail> {
    let (json, reply) = ask::<StatsReply>(&args, "stats").await?;
    if args.json {
        println!("{json}");
    } else {
        print!("{}", text(&reply));
    }
    Ok(0)
}

/// A duration as text: `850us`, `12.3ms`, `4.50s`.
fn secs(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.0}us", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1}ms", s * 1e3)
    } else {
        format!("{s:.2}s")
    }
}

fn text(r: &StatsReply) -> String {
    let mut out = format!("node {}\n", r.node);
    for l in &r.links {
        let rtt = l.rtt_secs.map_or("-".to_owned(), secs);
        let identity = l.identity.as_ref().map(|i| format!(" identity={i}"));
        out += &format!(
            "link {} {} {} rtt={rtt} age={} in={} out={} streams={} opened={}{}\n",
            l.peer,
            l.addr,
            l.state,
            secs(l.age_secs),
            l.bytes_in,
            l.bytes_out,
            l.streams_open,
            l.streams_total,
            identity.unwrap_or_default(),
        );
    }
    for s in &r.services {
        out += &service_text(s);
    }
    for u in &r.unanswered {
        out += &format!("unanswered {}: {}\n", u.node, crate::one_line(&u.error));
    }
    out
}

fn service_text(s: &ServiceReport) -> String {
    let relay = if s.relay { " relay" } else { "" };
    let mut out = format!(
        "service {} node={}{relay} requests={} active={} failed={} sources={} sending={} \
         completed={} source_failed={} cut={} frames={} bytes={} waited={}\n",
        s.name,
        s.node,
        s.requests_total,
        s.requests_active,
        s.requests_failed,
        s.sources_total,
        s.sources_active,
        s.sources_completed,
        s.sources_failed,
        s.sources_cut,
        s.frames_sent,
        s.bytes_sent,
        secs(s.backpressure_wait_secs),
    );
    for b in &s.blocked {
        out += &format!(
            "blocked {} node={} request={} source={} client={} waiting={}\n",
            s.name,
            s.node,
            b.request,
            b.source,
            b.client,
            secs(b.waiting_secs)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(secs(0.000_25), "250us");
        assert_eq!(secs(0.0123), "12.3ms");
        assert_eq!(secs(4.5), "4.50s");
    }
}
