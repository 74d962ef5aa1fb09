//! A node from the command line: the flags every subcommand shares (identity,
//! keep-alive, listen, join, spawn, stdio, TLS), the node they make, its link events as
//! lines, and the signals that stop it. It owns no service: the subcommands bind those.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chanserv::{ChildNode, Joined, LinkEvent, LinkEvents, Node, NodeConfig};
use futures::StreamExt;

use crate::stdio::StdioLink;
use crate::tls::TlsArgs;
use crate::units::{hex, parse_duration, parse_node_id};
use crate::Fail;

/// Keep-alive interval and timeout when none is given (the library's defaults).
const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(20));
/// How long a join may take (TCP connect and handshake) when none is given.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where to join the mesh.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct JoinArgs {
    /// Join the node listening on this TCP address (repeatable).
    #[arg(long = "join", value_name = "HOST:PORT")]
    pub join: Vec<String>,
    /// Join the node listening on this Unix socket (repeatable).
    #[arg(long = "join-unix", value_name = "PATH")]
    pub join_unix: Vec<PathBuf>,
    /// Run this command (with `sh -c`) and link to the node it serves on its stdin and
    /// stdout, e.g. `chanserv serve NAME --echo --stdio` or `ssh HOST chanserv node
    /// --stdio` (repeatable). The child is killed when this process exits.
    #[arg(long = "spawn", value_name = "CMD")]
    pub spawn: Vec<String>,
    /// Longest wait for each join or spawn, connect and handshake [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub connect_timeout: Option<Duration>,
}

impl JoinArgs {
    /// True when no node to link to is given.
    pub fn is_empty(&self) -> bool {
        self.join.is_empty() && self.join_unix.is_empty() && self.spawn.is_empty()
    }
}

/// Where to accept links from other nodes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ListenArgs {
    /// Accept links on this TCP address (repeatable; port 0 picks a free port, and the
    /// bound address is printed).
    #[arg(long = "listen", value_name = "HOST:PORT")]
    pub listen: Vec<String>,
    /// Accept links on this Unix socket (repeatable; removed again at exit, and one
    /// left by a killed node is taken over).
    #[arg(long = "listen-unix", value_name = "PATH")]
    pub listen_unix: Vec<PathBuf>,
    /// Serve this node on stdin and stdout: one link, to the process that started this
    /// one (another chanserv's `--spawn`). Nothing is printed then (stdout is the
    /// link; errors go to stderr), and the node stops when the link ends.
    #[arg(long)]
    pub stdio: bool,
}

/// Who this node is and how it keeps its links alive.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct IdentArgs {
    /// This node's id, 16 hex digits [default: random].
    #[arg(long, value_name = "HEX", value_parser = parse_node_id, conflicts_with = "name")]
    pub id: Option<u64>,
    /// Derive this node's id from a name (the same on every host).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// How often an idle link is pinged [default: 5s, or a quarter of
    /// --keepalive-timeout if that is shorter].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub keepalive: Option<Duration>,
    /// How long a link may stay silent before it is declared dead [default: 20s, or 4
    /// times --keepalive if that is longer].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub keepalive_timeout: Option<Duration>,
}

/// Everything needed to start a node, flags and config file merged.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub ident: IdentArgs,
    pub listen: ListenArgs,
    pub join: JoinArgs,
    pub tls: TlsArgs,
}

/// A started node: what it listens on, the joins it holds, its link events.
pub struct Mesh {
    pub node: Node,
    /// Bound addresses as printed: `127.0.0.1:7000`, `unix:/path`.
    pub listening: Vec<String>,
    /// Each joined address (as given) and its handle; dropping one leaves.
    pub joined: Vec<(String, Joined)>,
    /// Each `--spawn` command's child; dropping one kills it.
    pub spawned: Vec<ChildNode>,
    /// The node served on stdio (`--stdio`), until that link ends.
    pub stdio: Option<StdioLink>,
    /// Subscribed before the first join, so no link of ours goes unseen.
    pub events: LinkEvents,
    /// Its TLS identity (its certificate's first DNS name); `None`: plaintext links.
    pub identity: Option<String>,
    unix_paths: Vec<PathBuf>,
}

impl Plan {
    /// A client's node (`post`, `ping`): it links to the nodes of `join`, listens on
    /// nothing. `what` names the command in the usage error when `join` is empty.
    pub fn client(
        what: &str,
        ident: &IdentArgs,
        join: &JoinArgs,
        tls: &TlsArgs,
    ) -> Result<Plan, Fail> {
        if join.is_empty() {
            return Err(Fail::usage(format!(
                "{what} needs --join, --join-unix or --spawn (see --help)"
            )));
        }
        Ok(Plan {
            ident: ident.clone(),
            join: join.clone(),
            tls: tls.clone(),
            ..Plan::default()
        })
    }

    /// The node's settings; a keep-alive interval not shorter than its timeout is a
    /// usage error here, not a panic in the library.
    pub fn node_config(&self) -> Result<NodeConfig, Fail> {
        let i = &self.ident;
        // One given alone sets the other: a timeout of 4 pings, at least the default.
        let (interval, timeout) = match (i.keepalive, i.keepalive_timeout) {
            (Some(i), Some(t)) => (i, t),
            (Some(i), None) => (i, KEEPALIVE.1.max(i * 4)),
            (None, Some(t)) => (KEEPALIVE.0.min(t / 4), t),
            (None, None) => KEEPALIVE,
        };
        if interval.is_zero() || interval >= timeout {
            return Err(Fail::usage(format!(
                "--keepalive ({interval:?}) must be above 0 and shorter than --keepalive-timeout ({timeout:?})"
            )));
        }
        let mut cfg = NodeConfig::default().keepalive(interval, timeout);
        if let Some(id) = i.id {
            cfg = cfg.node_id(id);
        } else if let Some(name) = &i.name {
            cfg = cfg.node_name(name);
        }
        Ok(cfg)
    }

    /// Makes the node, listens, then joins: any failure is a one-line [`Fail`].
    pub async fn start(&self) -> Result<Mesh, Fail> {
        let tls = self.tls.load()?;
        let mut cfg = self.node_config()?;
        let identity = tls.as_ref().map(|t| t.identity().to_owned());
        if let Some(tls) = tls {
            cfg = cfg.tls(tls);
        }
        let node = Node::with_config(cfg);
        let events = node.subscribe();
        let mut mesh = Mesh {
            node,
            listening: Vec::new(),
            joined: Vec::new(),
            spawned: Vec::new(),
            stdio: None,
            events,
            identity,
            unix_paths: Vec::new(),
        };
        for addr in &self.listen.listen {
            let bound =
                mesh.node.listen(addr.as_str()).await.map_err(|e| {
                    Fail::usage(format!("cannot listen on {addr}: {}", describe(&e)))
                })?;
            mesh.listening.push(bound.to_string());
        }
        for path in &self.listen.listen_unix {
            remove_stale_socket(path);
            mesh.node.listen_unix(path).await.map_err(|e| {
                Fail::usage(format!(
                    "cannot listen on {}: {}",
                    path.display(),
                    describe(&e)
                ))
            })?;
            mesh.unix_paths.push(path.clone());
            mesh.listening.push(format!("unix:{}", path.display()));
        }
        let within = self.join.connect_timeout.unwrap_or(CONNECT_TIMEOUT);
        for addr in &self.join.join {
            let j = join_tcp(&mesh.node, addr, within).await?;
            mesh.joined.push((addr.clone(), j));
        }
        for path in &self.join.join_unix {
            let shown = format!("unix:{}", path.display());
            let j = bounded(within, "join", &shown, mesh.node.join_unix(path)).await?;
            mesh.joined.push((shown, j));
        }
        for cmd in &self.join.spawn {
            let child = crate::stdio::spawn(&mesh.node, cmd, within).await?;
            mesh.spawned.push(child);
        }
        if self.listen.stdio {
            mesh.stdio = Some(crate::stdio::start(&mesh.node));
        }
        Ok(mesh)
    }
}

/// Removes a Unix socket nobody listens on (left by a node that was killed), so a
/// restart can bind it again. A live one is left alone: the bind then says it is in
/// use. Anything but a socket is never touched.
fn remove_stale_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if !is_socket {
        return;
    }
    if let Err(e) = std::os::unix::net::UnixStream::connect(path) {
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            // If it fails, the bind says why.
            drop(std::fs::remove_file(path));
        }
    }
}

/// Joins a `HOST:PORT`, trying each address it resolves to.
async fn join_tcp(node: &Node, addr: &str, within: Duration) -> Result<Joined, Fail> {
    let resolved: Vec<SocketAddr> = tokio::time::timeout(within, tokio::net::lookup_host(addr))
        .await
        .map_err(|_| Fail::usage(format!("cannot join {addr}: name lookup timed out")))?
        .map_err(|e| Fail::usage(format!("cannot join {addr}: {e}")))?
        .collect();
    let mut last = Fail::usage(format!("cannot join {addr}: it resolves to no address"));
    for sa in resolved {
        match bounded(within, "join", addr, node.join(sa)).await {
            Ok(j) => return Ok(j),
            Err(f) => last = f,
        }
    }
    Err(last)
}

/// `link` (a join or a spawn, `verb` says which), its failure or its taking longer
/// than `within` as one line.
pub async fn bounded<T>(
    within: Duration,
    verb: &str,
    shown: &str,
    link: impl std::future::Future<Output = chanserv::Result<T>>,
) -> Result<T, Fail> {
    match tokio::time::timeout(within, link).await {
        Ok(Ok(j)) => Ok(j),
        Ok(Err(e)) => Err(Fail::usage(format!(
            "cannot {verb} {shown}: {}",
            describe(&e)
        ))),
        Err(_) => Err(Fail::usage(format!(
            "cannot {verb} {shown}: no link within {within:?} (--connect-timeout)"
        ))),
    }
}

impl Mesh {
    /// Prints who this node is: `node <id>`, `identity <name>` (its TLS identity,
    /// with TLS only), a `listen <addr>` per address, a `joined <addr> <peer id>`
    /// per join and a `spawned child:<pid> <peer id>` per spawned child.
    pub fn print_identity(&self) {
        say!("node {}", hex(self.node.id()));
        if let Some(identity) = &self.identity {
            say!("identity {identity}");
        }
        for l in &self.listening {
            say!("listen {l}");
        }
        for (addr, j) in &self.joined {
            say!("joined {addr} {}", hex(j.peer()));
        }
        for c in &self.spawned {
            say!("spawned child:{} {}", c.pid(), hex(c.peer()));
        }
    }

    /// Waits for the next link event and prints it: `link up <peer> <addr>
    /// [<identity>]`, `link down <peer> <addr> [<identity>]`, `names <node> +<added>
    /// -<removed>...`, `link missed <count>`. Pending forever once the node is gone.
    pub async fn print_next_event(&mut self) {
        let who = |p: &chanserv::PeerInfo| {
            let id = p.identity.as_deref().map(|i| format!(" {i}"));
            format!("{} {}{}", hex(p.node), p.addr, id.unwrap_or_default())
        };
        match self.events.next().await {
            Some(LinkEvent::Up(p)) => say!("link up {}", who(&p)),
            Some(LinkEvent::Down(p)) => say!("link down {}", who(&p)),
            Some(LinkEvent::Names {
                node,
                added,
                removed,
                ..
            }) => {
                let added = added.iter().map(|n| format!(" +{n}"));
                let removed = removed.iter().map(|n| format!(" -{n}"));
                let changes: String = added.chain(removed).collect();
                say!("names {}{changes}", hex(node));
            }
            Some(LinkEvent::Missed(n)) => say!("link missed {n}"),
            Some(other) => say!("link {other:?}"),
            None => std::future::pending().await,
        }
    }

    /// Closes every link and listener, waiting at most `within`, and removes the Unix
    /// sockets this node listened on. Spawned children, whose links closed, have
    /// what is left of `within` to exit; then they are killed.
    pub async fn shutdown(self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        drop(self.joined);
        if tokio::time::timeout(within, self.node.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("the node did not shut down within {within:?}");
        }
        for mut child in self.spawned {
            let pid = child.pid();
            match tokio::time::timeout_at(deadline, child.wait()).await {
                Ok(Ok(status)) => tracing::debug!(pid, "child exited: {status}"),
                Ok(Err(e)) => tracing::warn!(pid, "waiting for the child: {e}"),
                Err(_) => tracing::warn!(pid, "the child did not exit in time: killed"),
            }
        }
        for p in &self.unix_paths {
            // Gone already is fine.
            drop(std::fs::remove_file(p));
        }
    }
}

/// A library error as one line: an I/O error without the library's `i/o:` prefix.
pub fn describe(e: &chanserv::Error) -> String {
    match e {
        chanserv::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// SIGINT and SIGTERM.
pub struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers (from now on these signals no longer kill the process).
    pub fn new() -> Result<Signals, Fail> {
        use tokio::signal::unix::{signal, SignalKind};
        let err = |e: std::io::Error| Fail::usage(format!("cannot handle signals: {e}"));
        Ok(Signals {
            int: signal(SignalKind::interrupt()).map_err(err)?,
            term: signal(SignalKind::terminate()).map_err(err)?,
        })
    }

    /// The next SIGINT or SIGTERM, by name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

/// Runs `mesh` until a signal, or until its stdio link ends (`--stdio`): prints its
/// link events meanwhile. Returns the signal, or `stdio-closed`.
pub async fn until_signal(mesh: &mut Mesh, signals: &mut Signals) -> &'static str {
    let mut stdio = mesh.stdio.take();
    let why = loop {
        tokio::select! {
            sig = signals.recv() => break sig,
            () = crate::stdio::ended(&mut stdio) => break "stdio-closed",
            () = mesh.print_next_event() => {}
        }
    };
    mesh.stdio = stdio;
    why
}

/// Runs `stop` (a graceful shutdown), unless a second signal comes first: then the
/// process exits at once with status 130.
pub async fn stop_or_second_signal(
    signals: &mut Signals,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::select! {
        () = stop => {}
        sig = signals.recv() => {
            eprintln!("chanserv: second {sig}, exiting now");
            std::process::exit(130);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keepalive(i: Option<u64>, t: Option<u64>) -> Result<NodeConfig, Fail> {
        let ms = |v: Option<u64>| v.map(Duration::from_millis);
        let mut plan = Plan::default();
        plan.ident.keepalive = ms(i);
        plan.ident.keepalive_timeout = ms(t);
        plan.node_config()
    }

    #[test]
    fn one_keepalive_setting_implies_the_other_and_bad_pairs_are_usage_errors() {
        for (i, t) in [
            (None, None),
            (Some(200), None),
            (None, Some(1000)),
            (Some(30_000), None),
        ] {
            assert!(keepalive(i, t).is_ok(), "{i:?} {t:?}");
        }
        for (i, t) in [(Some(5000), Some(1000)), (Some(0), None), (None, Some(0))] {
            assert_eq!(
                keepalive(i, t).map(|_| ()).unwrap_err().code,
                1,
                "{i:?} {t:?}"
            );
        }
    }
}
