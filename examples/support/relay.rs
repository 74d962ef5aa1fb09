//! `bench --relay`: the relay node in a process of its own, so its peak RSS is its
//! own. The bench runs itself as `bench relay-node`, which listens on loopback,
//! prints `listening <addr>`, relays until its stdin closes, then prints
//! `rss_mib=<peak RSS> cpu_s=<CPU seconds used>` and exits.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use chanserv::Node;

/// Runs as the relay node (the `relay-node` workload) on `rt` (the bench gives it 2
/// workers, as the direct run's shared runtime has).
pub fn serve(
    rt: &tokio::runtime::Runtime,
    vm_hwm_mib: fn() -> f64,
    cpu_secs: fn() -> f64,
) -> Result<(), String> {
    let node = Node::new();
    let addr = rt
        .block_on(node.listen("127.0.0.1:0"))
        .map_err(|e| e.to_string())?;
    println!("listening {addr}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    // Until the bench closes our stdin (or dies): what is read does not matter.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(node);
    println!("rss_mib={:.1} cpu_s={:.2}", vm_hwm_mib(), cpu_secs());
    Ok(())
}

/// The relay process, as the bench sees it.
pub struct Relay {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Relay {
    /// Starts `bench relay-node` and waits for its address.
    pub fn start() -> Result<Relay, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .arg("relay-node")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("relay: {e}"))?;
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().ok_or("relay: no stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line).map_err(|e| e.to_string())?;
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("relay said {line:?}"))?;
        Ok(Relay {
            child,
            stdin,
            stdout,
            addr,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the relay: its peak RSS in MiB and the CPU seconds it used, as
    /// `relay_rss_mib=… relay_cpu_s=…`.
    pub fn finish(mut self) -> Result<String, String> {
        drop(self.stdin.take());
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        // Its exit status says nothing the line did not.
        let _ = self.child.wait();
        match line.trim().strip_prefix("rss_mib=") {
            Some(rest) => Ok(format!(
                "relay_rss_mib={}",
                rest.replace("cpu_s", "relay_cpu_s")
            )),
            None => Err(format!("relay said {line:?}")),
        }
    }
}
