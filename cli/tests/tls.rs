//! TLS on the command line, as processes: a node, a service and a client with
//! certificates of one CA link and carry every byte; a client of another CA is
//! refused with one line; incomplete or bad TLS settings are one line naming what is
//! wrong. Certificates are made with rcgen by the library's test helper.

mod support;

#[path = "../../tests/support/certs.rs"]
mod certs;

use std::path::Path;

use certs::Ca;
use support::{eventually, run, serve, Output, Proc, TempDir};

/// PEM files in a directory: `ca.pem` and, per identity, `<identity>.pem` and
/// `<identity>.key`.
struct Pki {
    dir: TempDir,
    ca: Ca,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let pki = Pki {
            dir: TempDir::new(tag),
            ca: Ca::new(tag),
        };
        std::fs::write(pki.path("ca.pem"), pki.ca.pem()).unwrap();
        pki
    }

    fn path(&self, file: &str) -> String {
        self.dir.path().join(file).to_str().unwrap().to_owned()
    }

    /// Issues a certificate for `identity`; its flags, with the CA file `ca`.
    fn flags(&self, identity: &str, ca: &str) -> Vec<String> {
        let (cert, key) = self.ca.issue_with(identity, |_| {});
        let (c, k) = (
            self.path(&format!("{identity}.pem")),
            self.path(&format!("{identity}.key")),
        );
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        ["--tls-cert", &c, "--tls-key", &k, "--tls-ca", ca]
            .map(str::to_owned)
            .to_vec()
    }

    /// Issues a certificate for `identity`, trusting this CA.
    fn member(&self, identity: &str) -> Vec<String> {
        self.flags(identity, &self.path("ca.pem"))
    }
}

fn with<'a>(args: &[&'a str], more: &'a [String]) -> Vec<&'a str> {
    let mut all = args.to_vec();
    all.extend(more.iter().map(String::as_str));
    all
}

/// A TLS `chanserv node` from a config file (so the file's TLS keys are used too),
/// ready: the process and its address.
fn tls_node(pki: &Pki) -> (Proc, String) {
    let flags = pki.member("hub.test");
    let toml = format!(
        "listen = [\"127.0.0.1:0\"]\ntls_cert = {:?}\ntls_key = {:?}\ntls_ca = {:?}\n",
        flags[1], flags[3], flags[5]
    );
    let config = pki.path("node.toml");
    std::fs::write(&config, toml).unwrap();
    let mut node = Proc::spawn(&["node", "--config", &config]);
    node.wait_line("node ");
    assert_eq!(node.wait_line("identity "), "hub.test");
    let addr = node.wait_line("listen ");
    node.wait_line("ready");
    (node, addr)
}

fn one_line_failure(got: &Output, needles: &[&str]) {
    assert_eq!(got.code, Some(1), "{got:?}");
    let lines = got.stderr_lines();
    assert_eq!(lines.len(), 1, "one line on stderr: {:?}", got.stderr);
    assert!(lines[0].starts_with("chanserv: "), "{}", lines[0]);
    for n in needles {
        assert!(lines[0].contains(n), "{:?} not in {}", n, lines[0]);
    }
}

#[test]
fn echo_over_tls_links_is_byte_for_byte() {
    let pki = Pki::new("mesh");
    let (_node, addr) = tls_node(&pki);
    let svc_tls = pki.member("echo.test");
    let svc = serve(&with(&["ping", "--echo", "--join", &addr], &svc_tls));
    assert!(
        svc.seen.contains(&"identity echo.test".to_owned()),
        "{:?}",
        svc.seen
    );
    assert!(
        svc.seen.iter().any(|l| l.starts_with("joined ")),
        "{:?}",
        svc.seen
    );
    let client = pki.member("client.test");
    let body: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let post = ["post", "ping", "-", "--join", &addr, "-o", "raw", "-q"];
    let got = run(&with(&post, &client), &body);
    assert_eq!(got.code, Some(0), "{}", got.stderr);
    assert!(
        got.stdout == body,
        "{} bytes back, {} sent",
        got.stdout.len(),
        body.len()
    );
    // names and peers link with TLS too.
    let names = run(&with(&["names", "--join", &addr], &client), b"");
    assert_eq!(names.code, Some(0), "{}", names.stderr);
    assert!(
        names.stdout_text().contains("ping "),
        "{}",
        names.stdout_text()
    );
}

#[test]
fn a_certificate_of_another_ca_is_refused() {
    let (pki, other) = (Pki::new("mesh"), Pki::new("other"));
    let (node, addr) = tls_node(&pki);
    let post = ["post", "ping", "x", "--join", &addr, "--timeout", "2s"];
    // Its CA file trusts the node, its certificate is another CA's: the node refuses.
    let rogue = other.flags("rogue.test", &pki.path("ca.pem"));
    let got = run(&with(&post, &rogue), b"");
    one_line_failure(
        &got,
        &["cannot join", "tls:", "not issued by a CA it trusts"],
    );
    // The node says whom it refused, and why.
    eventually("the node logs the refusal", || {
        node.stderr().contains("UnknownIssuer")
    });
    // Wholly another CA: the client refuses the node first.
    let got = run(&with(&post, &other.member("stranger.test")), b"");
    one_line_failure(
        &got,
        &["cannot join", "tls:", "not issued by the configured CA"],
    );
    // Without TLS at all.
    let got = run(&post, b"");
    one_line_failure(&got, &["cannot join"]);
}

#[test]
fn incomplete_or_bad_tls_settings_are_one_line() {
    let pki = Pki::new("bad");
    let good = pki.member("x.test");
    let (cert, key, ca) = (good[1].as_str(), good[3].as_str(), good[5].as_str());
    let post = ["post", "ping", "--join", "127.0.0.1:1"];
    let got = run(&with(&post, &good[..2]), b"");
    one_line_failure(&got, &["go together", "--tls-key and --tls-ca missing"]);
    let got = run(&["node", "--tls-key", key, "--tls-ca", ca], b"");
    one_line_failure(&got, &["go together", "--tls-cert missing"]);
    let got = run(
        &["names", "--join", "127.0.0.1:1", "--tls-allow-peer", "*"],
        b"",
    );
    one_line_failure(&got, &["--tls-allow-peer"]);
    // A missing file, a key that is no key, a CA that is no certificate: each named.
    let tls = |c: &str, k: &str, a: &str| {
        let args = ["--tls-cert", c, "--tls-key", k, "--tls-ca", a];
        run(&[&post[..], &args[..]].concat(), b"")
    };
    let missing = pki.path("missing.pem");
    one_line_failure(&tls(cert, key, &missing), &["cannot read TLS CA", &missing]);
    one_line_failure(&tls(cert, cert, ca), &["TLS key", cert]);
    one_line_failure(&tls(cert, key, key), &["TLS CA", key]);
    // The config file's keys are held to the same rule.
    let config = pki.path("partial.toml");
    std::fs::write(&config, format!("tls_cert = {cert:?}\ntls_key = {key:?}\n")).unwrap();
    let got = run(
        &["node", "--listen", "127.0.0.1:0", "--config", &config],
        b"",
    );
    one_line_failure(&got, &["--tls-ca missing"]);
    assert!(Path::new(cert).exists(), "the files stay");
}
