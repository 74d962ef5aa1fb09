//! TLS 1.3 under a link: [`TlsConfig`] (a node's CA, certificate, key and policy),
//! what a node builds from it (`TlsLinks`: acceptor, connector, verifiers), how a
//! peer's identity is read from its certificate, and how TLS failures become
//! [`Error::Tls`]. It turns a socket into an authenticated byte stream and stops
//! there: the chanserv handshake and yamux above it are `link`'s, and what an
//! authenticated peer may do is `authz`'s.
//!
//! Choices, and why (`PROTOCOL.md`, "Security"):
//! - **Mutual TLS 1.3 only**, with ring: both ends present a certificate chained to
//!   the configured CA, and both verify the other's (chain, validity period, key
//!   usage).
//! - **No server name.** Nodes dial IP addresses and socket paths while their
//!   certificates name identities (`kv-1.mesh`), not addresses. So neither side
//!   checks a name against an address: each verifies the peer's chain against the CA
//!   and takes the peer's *identity* from its certificate's first DNS
//!   subjectAltName. A certificate without one (or whose first is a wildcard) is
//!   refused. [`TlsConfig::allow_peers`] narrows which identities may link; no SNI is
//!   sent.
//! - **No session resumption**: every link runs a full handshake, so an expired
//!   certificate or a changed CA is seen on the next link. Links are long-lived.
//! - AES-128-GCM first (the fastest suite where the CPU has AES instructions).
//! - rustls runs the handshake; the records after it are sealed and opened by
//!   `tls_io`, in place in its own buffers, which spares the copies of rustls' record
//!   layer (see there).

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::client::UnbufferedClientConnection;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::UnbufferedServerConnection;
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    AlertDescription, CertificateError, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite};

use super::authz::Policy;
use super::join::LinkOwner;
use super::link::Established;
use super::node::Inner;
use super::tls_handshake::Handshaking;
use super::tls_io::TlsIo;
use crate::error::{Error, Result, Timeout};

/// TLS settings of a node ([`NodeConfig::tls`](super::NodeConfig::tls)): the CA that
/// issues the mesh's node certificates, this node's certificate chain and key, and
/// who may do what. With it, every link the node makes or accepts on
/// [`Node::listen`](super::Node::listen), `listen_unix`, `join` and `join_unix` runs
/// over mutually authenticated TLS 1.3; without it, links are plaintext (loopback,
/// tests, trusted networks). [`Node::attach`](super::Node::attach) always runs over
/// the stream it is given.
///
/// A node certificate names the node's *identity* in its first DNS subjectAltName
/// (`kv-1.mesh`); it must be valid for both TLS server and client use (extended key
/// usages `serverAuth` and `clientAuth`, or none). A peer is refused when it presents
/// no certificate, one not issued by the CA, an expired one, one without a DNS name,
/// or one whose identity [`allow_peers`](Self::allow_peers) does not list. Once
/// linked, what it may announce is up to [`allow_names`](Self::allow_names) and
/// [`authorize_names`](Self::authorize_names); [`Node::peer_identity`](super::Node::peer_identity)
/// tells who it is.
///
/// A value: cheap to clone (the certificates and key are shared), and dropping it
/// changes nothing for the nodes configured with it, which keep what
/// [`NodeConfig::tls`](super::NodeConfig::tls) built from it.
///
/// ```no_run
/// # fn main() -> chanserv::Result<()> {
/// use chanserv::{Node, NodeConfig, TlsConfig};
/// let tls = TlsConfig::from_files("ca.pem", "kv-1.pem", "kv-1.key")?
///     .allow_names("kv-*.mesh", ["kv", "kv:*"]);
/// let node = Node::with_config(NodeConfig::default().tls(tls));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TlsConfig {
    roots: Arc<RootCertStore>,
    key: Arc<CertifiedKey>,
    identity: String,
    policy: Policy,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("identity", &self.identity)
            .field("ca_certificates", &self.roots.len())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Loads PEM text: `ca` holds the CA certificate(s) peers must chain to,
    /// `cert_chain` this node's certificate then any intermediates, `key` its private
    /// key (PKCS#8, PKCS#1 or SEC1). [`Error::Tls`] when one is missing or malformed,
    /// the key does not match the certificate, or the certificate has no DNS name.
    /// A certificate that does not verify against `ca` now (expired, another CA) is
    /// loaded with a warning: every peer will refuse it.
    pub fn from_pem(
        ca: impl AsRef<[u8]>,
        cert_chain: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
    ) -> Result<TlsConfig> {
        let bad = |what: &str, e: &dyn fmt::Display| Error::Tls(format!("{what}: {e}"));
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca.as_ref()) {
            let c = c.map_err(|e| bad("CA PEM", &e))?;
            roots.add(c).map_err(|e| bad("CA certificate", &e))?;
        }
        if roots.is_empty() {
            return Err(Error::Tls("CA PEM: no certificate".into()));
        }
        let chain = CertificateDer::pem_slice_iter(cert_chain.as_ref())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| bad("certificate PEM", &e))?;
        let Some(leaf) = chain.first() else {
            return Err(Error::Tls("certificate PEM: no certificate".into()));
        };
        let identity = identity_of(leaf).map_err(|e| bad("this node's certificate", &e))?;
        let key = PrivateKeyDer::from_pem_slice(key.as_ref()).map_err(|e| bad("key PEM", &e))?;
        let key = CertifiedKey::from_der(chain, key, &provider())
            .map_err(|e| bad("certificate and key", &e))?;
        let cfg = TlsConfig {
            roots: Arc::new(roots),
            key: Arc::new(key),
            identity,
            policy: Policy::default(),
        };
        cfg.build()?;
        cfg.warn_if_unverifiable();
        Ok(cfg)
    }

    /// [`from_pem`](Self::from_pem) with the PEM read from files; an unreadable file
    /// is [`Error::Io`].
    pub fn from_files(
        ca: impl AsRef<Path>,
        cert_chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<TlsConfig> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| {
                Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("{}: {e}", p.display()),
                ))
            })
        };
        Self::from_pem(
            read(ca.as_ref())?,
            read(cert_chain.as_ref())?,
            read(key.as_ref())?,
        )
    }

    /// This node's identity: its certificate's first DNS name.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Only peers whose identity matches one of `patterns` may link, in either
    /// direction (the others are refused during the TLS handshake, with an
    /// `access_denied` alert). Without this, every certificate the CA issued may.
    /// Calls add patterns; in a pattern `*` matches any run of characters.
    #[must_use]
    pub fn allow_peers<S: Into<String>>(mut self, patterns: impl IntoIterator<Item = S>) -> Self {
        self.policy
            .allow_peers(patterns.into_iter().map(Into::into));
        self
    }

    /// Lets peers whose identity matches `identity` announce the service names that
    /// match `names` (`*` matches any run of characters). As soon as one rule (or an
    /// [`authorize_names`](Self::authorize_names) callback) is set, a peer may announce
    /// only what some rule lets it: this node does not route the other names to it,
    /// logs a warning naming the peer and the names, and tells the peer, which logs
    /// it too. Without any, every authenticated peer may announce every name.
    #[must_use]
    pub fn allow_names<S: Into<String>>(
        mut self,
        identity: impl Into<String>,
        names: impl IntoIterator<Item = S>,
    ) -> Self {
        let names = names.into_iter().map(Into::into).collect();
        self.policy.allow_names(identity.into(), names);
        self
    }

    /// Decides, besides the [`allow_names`](Self::allow_names) rules, whether a peer
    /// may announce a name: a name is allowed when a rule or `check(identity, name)`
    /// allows it. Called on the link's control task whenever the peer announces its
    /// names: it must be quick and must not block. A later call replaces the callback.
    #[must_use]
    pub fn authorize_names(
        mut self,
        check: impl Fn(&str, &str) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.policy.authorize_names(Arc::new(check));
        self
    }

    /// What a node uses: rustls configurations with this policy in their verifiers.
    pub(super) fn build(&self) -> Result<TlsLinks> {
        let policy = Arc::new(self.policy.clone());
        let provider = Arc::new(provider());
        let tls13 = [&rustls::version::TLS13];
        let failed = |e: &dyn fmt::Display| Error::Tls(format!("configuration: {e}"));
        let webpki =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .build()
                .map_err(|e| failed(&e))?;
        let verifier = Arc::new(PeerVerifier {
            clients: webpki,
            roots: self.roots.clone(),
            algs: provider.signature_verification_algorithms,
            policy: policy.clone(),
        });
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&tls13)
            .map_err(|e| failed(&e))?
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(self.key.clone())));
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        // `tls_io` takes the traffic keys over after the handshake.
        server.enable_secret_extraction = true;
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&tls13)
            .map_err(|e| failed(&e))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(self.key.clone())));
        client.resumption = Resumption::disabled();
        client.enable_sni = false;
        client.enable_secret_extraction = true;
        Ok(TlsLinks {
            server: Arc::new(server),
            client: Arc::new(client),
            // Any name will do: it is neither sent (no SNI) nor checked (module docs).
            name: ServerName::try_from("chanserv").map_err(|e| failed(&e))?,
            identity: self.identity.clone(),
            policy,
        })
    }

    fn warn_if_unverifiable(&self) {
        let Some(leaf) = self.key.cert.first() else {
            return;
        };
        let algs = provider().signature_verification_algorithms;
        let r = ParsedCertificate::try_from(leaf).and_then(|c| {
            let rest = &self.key.cert[1..];
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &c,
                &self.roots,
                rest,
                UnixTime::now(),
                algs.all,
            )
        });
        if let Err(e) = r {
            tracing::warn!(
                identity = %self.identity,
                "this node's certificate does not verify against the CA ({e}): peers will refuse it"
            );
        }
    }
}

/// ring, TLS 1.3 suites only, AES-128-GCM first.
fn provider() -> CryptoProvider {
    use rustls::crypto::ring::cipher_suite as cs;
    CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    }
}

/// A node's built TLS: what its listeners accept with and its joins connect with.
pub(crate) struct TlsLinks {
    pub(super) server: Arc<rustls::ServerConfig>,
    pub(super) client: Arc<rustls::ClientConfig>,
    pub(super) name: ServerName<'static>,
    identity: String,
    pub(super) policy: Arc<Policy>,
}

impl fmt::Debug for TlsLinks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsLinks")
            .field("identity", &self.identity)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl TlsLinks {
    /// Runs the TLS handshake on `io` within `within`: the encrypted stream and the
    /// peer's identity.
    async fn handshake<IO>(
        &self,
        io: IO,
        initiator: bool,
        within: Duration,
    ) -> Result<(TlsIo<IO>, String)>
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let conn = if initiator {
            UnbufferedClientConnection::new(self.client.clone(), self.name.clone())
                .map(Handshaking::Client)
        } else {
            UnbufferedServerConnection::new(self.server.clone()).map(Handshaking::Server)
        };
        let conn = conn.map_err(|e| Error::Tls(describe(&e)))?;
        let (s, leaf) = match tokio::time::timeout(within, conn.run(io)).await {
            Err(_) => return Err(Error::Timeout(Timeout::Handshake)),
            Ok(r) => r.map_err(|e| classify(Error::Io(e)))?,
        };
        // The verifiers refused every certificate without an identity already.
        let identity = leaf
            .as_ref()
            .map(identity_of)
            .ok_or_else(|| Error::Tls(describe(&rustls::Error::NoCertificatesPresented)))?
            .map_err(|e| Error::Tls(describe(&e)))?;
        Ok((s, identity))
    }
}

impl Inner {
    /// A link over a fresh socket from a listener or a join: TLS first when the node
    /// has it (bounded by the handshake timeout, like the link handshake after it),
    /// then [`establish`](Inner::establish) with the peer's identity.
    pub(super) async fn establish_socket<IO>(
        self: &Arc<Self>,
        io: IO,
        initiator: bool,
        owner: Option<LinkOwner>,
        addr: String,
    ) -> Result<Established>
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let Some(tls) = self.cfg.tls.clone() else {
            return self.establish(io, initiator, owner, None, addr).await;
        };
        let within = self.cfg.handshake_timeout;
        let (io, identity) = tls.handshake(io, initiator, within).await?;
        tracing::debug!(%identity, "TLS handshake done");
        let r = self
            .establish(io, initiator, owner, Some(identity), addr)
            .await;
        r.map_err(classify)
    }
}

/// A certificate's identity: its first DNS subjectAltName, which must not be a
/// wildcard.
fn identity_of(cert: &CertificateDer<'_>) -> std::result::Result<String, rustls::Error> {
    let refuse = |why: String| {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refusal(
            why,
        )))))
    };
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| refuse(format!("unreadable certificate: {e}")))?;
    let first = ee.valid_dns_names().next();
    match first {
        Some(name) if !name.contains('*') => Ok(name.to_owned()),
        Some(name) => Err(refuse(format!(
            "the certificate's first DNS name {name:?} is a wildcard, not a node identity"
        ))),
        None => Err(refuse(
            "the certificate has no DNS subjectAltName naming the node".into(),
        )),
    }
}

/// Why this side refused a certificate, as rustls carries it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refusal(String);

/// An error whose cause is TLS, as [`Error::Tls`] with a reason a person can act on;
/// any other error unchanged. Applies to errors of a link's handshake on a TLS stream
/// (the peer's alert arrives on the first read after the TLS handshake), whoever made
/// the stream.
pub(super) fn classify(e: Error) -> Error {
    match e {
        Error::Io(io) => match io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(t) => Error::Tls(describe(t)),
            None if io.kind() == std::io::ErrorKind::UnexpectedEof => Error::Tls(format!(
                "the peer closed the connection during the TLS handshake (a plaintext node?): {io}"
            )),
            None => Error::Io(io),
        },
        other => other,
    }
}

/// A rustls error in words: who refused what.
fn describe(e: &rustls::Error) -> String {
    use AlertDescription as A;
    match e {
        rustls::Error::AlertReceived(alert) => {
            let why = match alert {
                A::CertificateRequired => "it requires a certificate and got none",
                A::UnknownCA => "our certificate is not issued by a CA it trusts",
                A::CertificateExpired => "our certificate is expired or not yet valid",
                A::AccessDenied => "our identity may not link to it",
                A::BadCertificate | A::CertificateUnknown | A::UnsupportedCertificate => {
                    "it does not accept our certificate"
                }
                _ => "it aborted the TLS handshake",
            };
            format!("the peer refused the link: {why} (alert {alert:?})")
        }
        rustls::Error::NoCertificatesPresented => {
            "refused the peer: it presented no certificate".into()
        }
        rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure) => {
            "refused the peer: its identity is not among the allowed peers".into()
        }
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "refused the peer: its certificate is not issued by the configured CA \
             (UnknownIssuer)"
                .into()
        }
        rustls::Error::InvalidCertificate(c) => format!("refused the peer's certificate: {c}"),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            format!("the peer does not speak TLS 1.3 (a plaintext node?): {e}")
        }
        other => other.to_string(),
    }
}

/// Verifies peers both ways: a dialing node with the CA's client verifier, a
/// listening node with the CA's chain check (no name: see the module docs); then
/// both read the identity and check [`Policy::may_link`].
#[derive(Debug)]
struct PeerVerifier {
    clients: Arc<dyn ClientCertVerifier>,
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
    policy: Arc<Policy>,
}

impl PeerVerifier {
    fn admit(&self, leaf: &CertificateDer<'_>) -> std::result::Result<(), rustls::Error> {
        let identity = identity_of(leaf)?;
        if self.policy.may_link(&identity) {
            return Ok(());
        }
        tracing::debug!(%identity, "identity not among the allowed peers");
        Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.clients.root_hint_subjects()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.clients
            .verify_client_cert(end_entity, intermediates, now)?;
        self.admit(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        self.admit(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
