//! TLS from the command line: the flags every subcommand that links shares
//! (`--tls-cert`, `--tls-key`, `--tls-ca`, and who may link or announce what), and
//! the library's [`TlsConfig`] loaded from them. The three files go together; any
//! problem with them is one line that names the file. What TLS does is the library's
//! (`PROTOCOL.md`, "Security").

use std::path::{Path, PathBuf};

use chanserv::TlsConfig;

use crate::Fail;

/// The names every node of the CLI binds (`chanserv.admin`, the relay's mark): each
/// identity may announce them once any `--tls-allow-names` rule is given, or the
/// relay's loop guard would not see other relays (and every link would warn).
const RESERVED: &str = "chanserv.*";

/// TLS for this node's links: with all three files, every link it listens for or
/// joins runs over mutually authenticated TLS 1.3.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This node's certificate chain, PEM; its first DNS name is the node's TLS
    /// identity (with --tls-key and --tls-ca).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert, PEM.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The CA certificate(s) peers' certificates must chain to, PEM.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Link only with peers whose identity matches PATTERN (`*`: any run of
    /// characters; repeatable) [default: every certificate of the CA].
    #[arg(long = "tls-allow-peer", value_name = "PATTERN")]
    pub allow_peers: Vec<String>,
    /// Peers whose identity matches IDENTITY may announce these service names
    /// (`*` patterns; repeatable). Once one is given, a peer may announce only what
    /// some rule lets it (and the reserved chanserv.* names) [default: any name].
    #[arg(long = "tls-allow-names", value_name = "IDENTITY=NAME,...", value_parser = parse_allow_names)]
    pub allow_names: Vec<(String, Vec<String>)>,
}

impl TlsArgs {
    /// The node's TLS settings: `None` when no file is given, a one-line usage error
    /// when only some are, or when a file is missing, unreadable or malformed.
    pub fn load(&self) -> Result<Option<TlsConfig>, Fail> {
        let (cert, key, ca) = match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => (cert, key, ca),
            (None, None, None) => {
                if !self.allow_peers.is_empty() || !self.allow_names.is_empty() {
                    return Err(Fail::usage(
                        "--tls-allow-peer and --tls-allow-names need --tls-cert, --tls-key and --tls-ca",
                    ));
                }
                return Ok(None);
            }
            (cert, key, ca) => {
                let missing: Vec<&str> =
                    [(cert, "--tls-cert"), (key, "--tls-key"), (ca, "--tls-ca")]
                        .into_iter()
                        .filter(|(v, _)| v.is_none())
                        .map(|(_, flag)| flag)
                        .collect();
                return Err(Fail::usage(format!(
                    "--tls-cert, --tls-key and --tls-ca go together: {} missing",
                    missing.join(" and ")
                )));
            }
        };
        let read = |what: &str, p: &Path| {
            std::fs::read(p)
                .map_err(|e| Fail::usage(format!("cannot read TLS {what} {}: {e}", p.display())))
        };
        let pems = (
            read("CA", ca)?,
            read("certificate", cert)?,
            read("key", key)?,
        );
        let mut tls = TlsConfig::from_pem(pems.0, pems.1, pems.2)
            .map_err(|e| Fail::usage(blame(&e, cert, key, ca)))?;
        if !self.allow_peers.is_empty() {
            tls = tls.allow_peers(self.allow_peers.iter().cloned());
        }
        if !self.allow_names.is_empty() {
            tls = tls.allow_names("*", [RESERVED]);
        }
        for (identity, names) in &self.allow_names {
            tls = tls.allow_names(identity.clone(), names.iter().cloned());
        }
        Ok(Some(tls))
    }
}

/// A loading error with the file it concerns: the library's message says which part
/// (CA, certificate, key) it could not use, not where that came from.
fn blame(e: &chanserv::Error, cert: &Path, key: &Path, ca: &Path) -> String {
    let chanserv::Error::Tls(msg) = e else {
        return format!(
            "TLS files {}, {}, {}: {e}",
            cert.display(),
            key.display(),
            ca.display()
        );
    };
    let file = if msg.starts_with("CA ") {
        format!("TLS CA {}", ca.display())
    } else if msg.starts_with("key ") {
        format!("TLS key {}", key.display())
    } else if msg.starts_with("certificate and key") {
        format!(
            "TLS certificate {} and key {}",
            cert.display(),
            key.display()
        )
    } else if msg.starts_with("certificate ") || msg.starts_with("this node's certificate") {
        format!("TLS certificate {}", cert.display())
    } else {
        format!(
            "TLS files {}, {}, {}",
            cert.display(),
            key.display(),
            ca.display()
        )
    };
    format!("{file}: {msg}")
}

/// `IDENTITY=NAME,NAME...`: the identity pattern and its name patterns.
pub fn parse_allow_names(s: &str) -> Result<(String, Vec<String>), String> {
    let (identity, names) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not IDENTITY=NAME,..."))?;
    let names: Vec<String> = names
        .split(',')
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    if identity.is_empty() || names.is_empty() {
        return Err(format!("{s:?} is not IDENTITY=NAME,..."));
    }
    Ok((identity.to_owned(), names))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_names_flags_parse() {
        assert_eq!(
            parse_allow_names("kv-*.mesh=kv,kv:*").unwrap(),
            (
                "kv-*.mesh".to_owned(),
                vec!["kv".to_owned(), "kv:*".to_owned()]
            )
        );
        for bad in ["kv", "=kv", "kv-1.mesh=", "kv-1.mesh=,"] {
            assert!(parse_allow_names(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_partial_set_says_what_is_missing() {
        let args = TlsArgs {
            tls_cert: Some("c.pem".into()),
            ..TlsArgs::default()
        };
        let e = args.load().unwrap_err();
        assert_eq!(e.code, 1);
        assert!(
            e.msg.contains("--tls-key and --tls-ca missing"),
            "{}",
            e.msg
        );
        let rules_alone = TlsArgs {
            allow_peers: vec!["kv-*".into()],
            ..TlsArgs::default()
        };
        assert!(rules_alone.load().is_err());
        assert!(TlsArgs::default().load().unwrap().is_none());
    }

    #[test]
    fn each_library_complaint_names_its_file() {
        let (cert, key, ca) = (Path::new("c.pem"), Path::new("k.pem"), Path::new("a.pem"));
        let blamed = |msg: &str| blame(&chanserv::Error::Tls(msg.into()), cert, key, ca);
        assert!(blamed("CA PEM: no certificate").starts_with("TLS CA a.pem: "));
        assert!(blamed("key PEM: no items").starts_with("TLS key k.pem: "));
        assert!(blamed("certificate PEM: bad").starts_with("TLS certificate c.pem: "));
        assert!(blamed("this node's certificate: x").starts_with("TLS certificate c.pem: "));
        assert!(blamed("certificate and key: x").contains("c.pem and key k.pem"));
    }
}
