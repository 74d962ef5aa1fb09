//! `chanserv node --config FILE`: the TOML file and how it merges with the flags. A
//! flag overrides the file's value; a list given on the command line replaces the
//! file's list. Unknown keys are errors, so a typo does not go unnoticed.
//!
//! ```toml
//! name = "hub-1"                 # or id = "00000000000000a1"
//! listen = ["0.0.0.0:7000"]
//! listen_unix = ["/run/chanserv.sock"]
//! join = ["10.0.0.2:7000"]
//! join_unix = []
//! keepalive = "5s"
//! keepalive_timeout = "20s"
//! connect_timeout = "10s"
//! grace = "5s"
//! relay = true
//! tls_cert = "hub-1.pem"         # TLS: the three files together (paths as given,
//! tls_key = "hub-1.key"          # relative to the working directory)
//! tls_ca = "ca.pem"
//! tls_allow_peers = ["*.mesh"]
//! tls_allow_names = { "kv-*.mesh" = ["kv", "kv:*"] }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::mesh::Plan;
use crate::units::{parse_duration, parse_node_id};
use crate::Fail;

/// The file's keys, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeFile {
    pub id: Option<String>,
    pub name: Option<String>,
    pub listen: Vec<String>,
    pub listen_unix: Vec<PathBuf>,
    pub join: Vec<String>,
    pub join_unix: Vec<PathBuf>,
    pub keepalive: Option<String>,
    pub keepalive_timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub grace: Option<String>,
    pub relay: Option<bool>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_allow_peers: Vec<String>,
    /// Identity pattern → the name patterns it may announce.
    pub tls_allow_names: BTreeMap<String, Vec<String>>,
}

impl NodeFile {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<NodeFile, Fail> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Fail::usage(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| Fail::usage(format!("{}: {e}", path.display())))
    }

    fn parse(text: &str) -> Result<NodeFile, String> {
        toml::from_str(text).map_err(|e| e.message().to_owned())
    }

    /// Fills what the flags left empty in `plan`, `grace` and `relay`.
    pub fn merge_into(
        self,
        plan: &mut Plan,
        grace: &mut Option<Duration>,
        relay: &mut Option<bool>,
    ) -> Result<(), Fail> {
        let dur = |key: &str, v: Option<String>| -> Result<Option<Duration>, Fail> {
            v.map(|s| parse_duration(&s).map_err(|e| Fail::usage(format!("config {key}: {e}"))))
                .transpose()
        };
        let ident = &mut plan.ident;
        if ident.id.is_none() && ident.name.is_none() {
            ident.id = self
                .id
                .map(|s| parse_node_id(&s).map_err(|e| Fail::usage(format!("config id: {e}"))))
                .transpose()?;
            ident.name = self.name;
        }
        fill(&mut ident.keepalive, dur("keepalive", self.keepalive)?);
        fill(
            &mut ident.keepalive_timeout,
            dur("keepalive_timeout", self.keepalive_timeout)?,
        );
        fill(
            &mut plan.join.connect_timeout,
            dur("connect_timeout", self.connect_timeout)?,
        );
        fill(grace, dur("grace", self.grace)?);
        fill(relay, self.relay);
        fill_list(&mut plan.listen.listen, self.listen);
        fill_list(&mut plan.listen.listen_unix, self.listen_unix);
        fill_list(&mut plan.join.join, self.join);
        fill_list(&mut plan.join.join_unix, self.join_unix);
        let tls = &mut plan.tls;
        fill(&mut tls.tls_cert, self.tls_cert);
        fill(&mut tls.tls_key, self.tls_key);
        fill(&mut tls.tls_ca, self.tls_ca);
        fill_list(&mut tls.allow_peers, self.tls_allow_peers);
        fill_list(
            &mut tls.allow_names,
            self.tls_allow_names.into_iter().collect(),
        );
        Ok(())
    }
}

fn fill<T>(flag: &mut Option<T>, file: Option<T>) {
    if flag.is_none() {
        *flag = file;
    }
}

fn fill_list<T>(flag: &mut Vec<T>, file: Vec<T>) {
    if flag.is_empty() {
        *flag = file;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_and_lists_replace() {
        let file = NodeFile::parse(
            r#"
            name = "hub"
            listen = ["127.0.0.1:7000"]
            join = ["10.0.0.2:7000"]
            keepalive = "1s"
            grace = "2s"
            relay = false
            tls_cert = "file.pem"
            tls_key = "file.key"
            tls_ca = "ca.pem"
            tls_allow_names = { "kv-*.mesh" = ["kv", "kv:*"] }
            "#,
        )
        .unwrap();
        let mut plan = Plan::default();
        plan.listen.listen = vec!["127.0.0.1:0".into()];
        plan.ident.keepalive = Some(Duration::from_millis(500));
        plan.tls.tls_cert = Some("flag.pem".into());
        let (mut grace, mut relay) = (None, None);
        file.merge_into(&mut plan, &mut grace, &mut relay).unwrap();
        assert_eq!(plan.listen.listen, ["127.0.0.1:0"]);
        assert_eq!(plan.join.join, ["10.0.0.2:7000"]);
        assert_eq!(plan.ident.name.as_deref(), Some("hub"));
        assert_eq!(plan.ident.keepalive, Some(Duration::from_millis(500)));
        assert_eq!(grace, Some(Duration::from_secs(2)));
        assert_eq!(relay, Some(false));
        let tls = &plan.tls;
        assert_eq!(tls.tls_cert.as_deref(), Some(Path::new("flag.pem")));
        assert_eq!(tls.tls_key.as_deref(), Some(Path::new("file.key")));
        assert_eq!(tls.tls_ca.as_deref(), Some(Path::new("ca.pem")));
        assert_eq!(
            tls.allow_names,
            [(
                "kv-*.mesh".to_owned(),
                vec!["kv".to_owned(), "kv:*".to_owned()]
            )]
        );
    }

    #[test]
    fn an_id_flag_beats_a_name_in_the_file() {
        let file = NodeFile::parse(r#"name = "hub""#).unwrap();
        let mut plan = Plan::default();
        plan.ident.id = Some(7);
        file.merge_into(&mut plan, &mut None, &mut None).unwrap();
        assert_eq!((plan.ident.id, plan.ident.name), (Some(7), None));
    }

    #[test]
    fn typos_and_bad_values_are_errors() {
        assert!(NodeFile::parse("lisen = []").is_err());
        assert!(NodeFile::parse("listen = 7").is_err());
        let file = NodeFile::parse(r#"grace = "soon""#).unwrap();
        assert!(file
            .merge_into(&mut Plan::default(), &mut None, &mut None)
            .is_err());
    }
}
