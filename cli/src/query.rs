//! `chanserv names`, `chanserv peers`, `chanserv routes` and `chanserv stats` (its
//! printing in `stats`):
//! join one node and ask its admin service (see `admin`) what it sees. Output: text
//! lines, or the node's JSON (`--json`).

use std::time::Duration;

use chanserv::{Client, NodeId};
use serde::de::DeserializeOwned;

use crate::admin::{ask_peer, is_reserved, NamesReply, PeersReply, RoutesReply, ADMIN};
use crate::mesh::{JoinArgs, Plan};
use crate::tls::TlsArgs;
use crate::units::parse_duration;
use crate::Fail;

const EXAMPLES: &str = "\
Examples:
  chanserv names --join 127.0.0.1:7000          # NAME PROVIDER...
  chanserv names --join 127.0.0.1:7000 --all    # with the reserved chanserv.* names
  chanserv peers --join-unix /tmp/chanserv.sock --json
  chanserv routes --join 127.0.0.1:7000         # route <node> hops <n> path <peer>,...,<node>
  chanserv stats --join 127.0.0.1:7000          # links, services, blocked sources

The node must be one the CLI runs (chanserv node or chanserv serve): they answer the
admin service chanserv.admin.";

/// `chanserv peers` / `chanserv stats` flags.
#[derive(clap::Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    #[command(flatten)]
    join: JoinArgs,
    #[command(flatten)]
    tls: TlsArgs,
    /// Print the node's answer as JSON.
    #[arg(long)]
    pub json: bool,
    /// Longest wait for the node's admin service.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
}

/// `chanserv names` flags.
#[derive(clap::Args, Debug)]
pub struct NamesArgs {
    #[command(flatten)]
    common: Args,
    /// Also list the names the CLI reserves (chanserv.*).
    #[arg(long)]
    all: bool,
}

/// `chanserv names`: `node <id>`, then `NAME PROVIDER...` per service.
pub async fn names(args: NamesArgs) -> Result<u8, Fail> {
    let (json, reply) = ask::<NamesReply>(&args.common, "names").await?;
    if args.common.json {
        println!("{json}");
        return Ok(0);
    }
    println!("node {}", reply.node);
    for (name, providers) in &reply.services {
        if args.all || !is_reserved(name) {
            println!("{name} {}", providers.join(" "));
        }
    }
    Ok(0)
}

/// `chanserv peers`: `node <id>`, `listen <addr>` lines, then `peer <id> links <n>`.
pub async fn peers(args: Args) -> Result<u8, Fail> {
    let (json, reply) = ask::<PeersReply>(&args, "peers").await?;
    if args.json {
        println!("{json}");
        return Ok(0);
    }
    println!("node {}", reply.node);
    for l in &reply.listen {
        println!("listen {l}");
    }
    for p in &reply.peers {
        println!("peer {} links {}", p.id, p.links);
    }
    Ok(0)
}

/// `chanserv routes`: `node <id>`, then `route <id> hops <n> path <id>,...` per node
/// reached (the linked peer first, the node last), with ` names <name>,...` when it
/// provides names (the reserved ones left out).
pub async fn routes(args: Args) -> Result<u8, Fail> {
    let (json, reply) = ask::<RoutesReply>(&args, "routes").await?;
    if args.json {
        println!("{json}");
        return Ok(0);
    }
    println!("node {}", reply.node);
    for r in &reply.routes {
        let names: Vec<&str> = r
            .names
            .iter()
            .map(String::as_str)
            .filter(|n| !is_reserved(n))
            .collect();
        let names = match names.is_empty() {
            true => String::new(),
            false => format!(" names {}", names.join(",")),
        };
        let (hops, path) = (r.path.len(), r.path.join(","));
        println!("route {} hops {hops} path {path}{names}", r.id);
    }
    Ok(0)
}

/// Joins the one node of `args` and posts `what` to its admin service.
pub async fn ask<T: DeserializeOwned>(args: &Args, what: &str) -> Result<(String, T), Fail> {
    let j = &args.join;
    if j.join.len() + j.join_unix.len() + j.spawn.len() != 1 {
        return Err(Fail::usage(
            "give the node to ask: exactly one --join, --join-unix or --spawn",
        ));
    }
    let plan = Plan {
        join: args.join.clone(),
        tls: args.tls.clone(),
        ..Plan::default()
    };
    let mesh = plan.start().await?;
    let (shown, peer) = match (mesh.joined.first(), mesh.spawned.first()) {
        (Some((shown, j)), _) => (shown.clone(), j.peer()),
        (None, Some(c)) => (format!("child:{}", c.pid()), c.peer()),
        (None, None) => return Err(Fail::usage("no node to ask")),
    };
    let r = post_admin(&mesh.node, peer, what, args.timeout).await;
    mesh.shutdown(Duration::from_secs(1)).await;
    let json = r.map_err(|e| Fail::usage(format!("asking {shown}: {e}")))?;
    let reply = serde_json::from_slice(&json)
        .map_err(|e| Fail::usage(format!("{shown} answered {what} with bad JSON: {e}")))?;
    Ok((String::from_utf8_lossy(&json).into_owned(), reply))
}

async fn post_admin(
    node: &chanserv::Node,
    peer: NodeId,
    what: &str,
    within: Duration,
) -> Result<Vec<u8>, String> {
    node.wait_for_name(ADMIN, within)
        .await
        .map_err(|_| format!("no {ADMIN} service within {within:?}: is it a chanserv node?"))?;
    let client = Client::new(node.clone()).map_err(|e| e.to_string())?;
    tokio::time::timeout(within, ask_peer(&client, peer, what))
        .await
        .map_err(|_| format!("no answer within {within:?}"))?
}
