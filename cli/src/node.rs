//! `chanserv node`: a mesh node as a process. It prints its identity and link events
//! as lines, answers the admin service, relays its peers' services (see `relay`),
//! and on SIGINT/SIGTERM shuts down within the grace period.
//!
//! Lines on stdout, one event each: `node <id>`, `identity <name>` (its TLS
//! identity, with TLS only), `listen <addr>`, `joined <addr> <peer>`, `metrics
//! <addr>` (with `--metrics`), `ready`, then `link up|down <peer>`, `relay add|remove
//! <name>`, and at the end `shutdown <signal>` and `stopped`. With `--stdio`, none:
//! stdout is the link, and the node stops when it ends (`shutdown stdio-closed`).

use std::path::PathBuf;
use std::time::Duration;

use crate::admin::{self, AdminInfo};
use crate::config::NodeFile;
use crate::mesh::{self, IdentArgs, JoinArgs, ListenArgs, Plan, Signals};
use crate::prom::{self, MetricsArgs};
use crate::relay::Relay;
use crate::tls::TlsArgs;
use crate::units::parse_duration;
use crate::Fail;

/// How long a graceful shutdown may take when `--grace` is not given.
const GRACE: Duration = Duration::from_secs(5);

const EXAMPLES: &str = "\
Examples:
  chanserv node --listen 127.0.0.1:7000
  chanserv node --listen 0.0.0.0:7000 --name hub-1 --join 10.0.0.2:7000
  chanserv node --listen 127.0.0.1:0 --listen-unix /tmp/chanserv.sock --grace 2s
  chanserv node --listen 127.0.0.1:7000 --metrics 127.0.0.1:9100   # GET /metrics
  chanserv node --listen 127.0.0.1:7000 --spawn 'ssh host-2 chanserv node --stdio'
  chanserv node --listen 0.0.0.0:7000 --tls-cert hub-1.pem --tls-key hub-1.key --tls-ca ca.pem
  chanserv node --config node.toml     # keys: id name listen listen_unix join join_unix
                                       # keepalive keepalive_timeout connect_timeout grace relay
                                       # tls_cert tls_key tls_ca tls_allow_peers tls_allow_names

A flag overrides the config file; a list flag (--listen, --join, ...) replaces the file's list.
Every service on the mesh is reachable from here, through the nodes between (chanserv routes
shows the paths). This node also binds its peers' services and forwards their requests (the
CLI's relay, one hop at most); --no-relay leaves that to the mesh. Admin requests `names`,
`peers`, `routes` and `stats` go to the name chanserv.admin (chanserv names / peers / routes /
stats ask them).";

/// `chanserv node` flags.
#[derive(clap::Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    /// Read settings from a TOML file (flags override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    listen: ListenArgs,
    #[command(flatten)]
    join: JoinArgs,
    #[command(flatten)]
    ident: IdentArgs,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
    /// On SIGINT/SIGTERM, how long requests in flight may take to finish [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    grace: Option<Duration>,
    /// Do not relay the services of joined nodes.
    #[arg(long)]
    no_relay: bool,
}

/// Runs the node until a signal.
pub async fn run(args: Args) -> Result<u8, Fail> {
    let mut plan = Plan {
        ident: args.ident,
        listen: args.listen,
        join: args.join,
        tls: args.tls,
    };
    let mut grace = args.grace;
    let mut relay = args.no_relay.then_some(false);
    if let Some(path) = &args.config {
        NodeFile::load(path)?.merge_into(&mut plan, &mut grace, &mut relay)?;
    }
    let grace = grace.unwrap_or(GRACE);
    let mut signals = Signals::new()?;
    let mut mesh = plan.start().await?;
    let info = AdminInfo {
        listen: mesh.listening.clone(),
        ..AdminInfo::default()
    };
    let relayed = info.relayed.clone();
    let metrics = prom::start(&args.metrics, &mesh.node, &info).await?;
    let admin = admin::serve(&mesh.node, info)?;
    let relay = match relay.unwrap_or(true) {
        true => Some(Relay::start(mesh.node.clone(), relayed)?),
        false => None,
    };
    mesh.print_identity();
    if let Some(m) = &metrics {
        say!("metrics {}", m.addr);
    }
    say!("ready");
    let sig = mesh::until_signal(&mut mesh, &mut signals).await;
    say!("shutdown {sig}");
    let deadline = tokio::time::Instant::now() + grace;
    let stop = async {
        let relay = async {
            if let Some(r) = relay {
                r.stop(grace).await;
            }
        };
        tokio::join!(relay, admin.shutdown(grace));
        mesh.shutdown(left(deadline)).await;
    };
    mesh::stop_or_second_signal(&mut signals, stop).await;
    say!("stopped");
    Ok(0)
}

/// What is left until `deadline`, but a moment at least: the links' goodbyes.
pub fn left(deadline: tokio::time::Instant) -> Duration {
    deadline
        .saturating_duration_since(tokio::time::Instant::now())
        .max(Duration::from_millis(200))
}
