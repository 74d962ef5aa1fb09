//! Certificates made at run time with rcgen, for `tests/tls.rs` and
//! `examples/bench.rs --tls` (included with `#[path]`): a CA, and node certificates it
//! issues for an identity (the first DNS name), valid for TLS server and client use.
#![allow(dead_code)] // each includer uses its part

use chanserv::TlsConfig;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A certificate authority.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    /// A fresh self-signed CA called `name`.
    pub fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = p.self_signed(&key).expect("CA certificate");
        Ca { cert, key }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA certificate, DER.
    pub fn der(&self) -> rustls::pki_types::CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// A node certificate for `identity`: `(certificate PEM, key PEM)`. `edit` may
    /// change its parameters (validity, names) before it is signed.
    pub fn issue_with(
        &self,
        identity: &str,
        edit: impl FnOnce(&mut CertificateParams),
    ) -> (String, String) {
        let mut p = CertificateParams::new(vec![identity.to_owned()]).expect("params");
        p.distinguished_name.push(DnType::CommonName, identity);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        edit(&mut p);
        let key = KeyPair::generate().expect("node key");
        let cert = p
            .signed_by(&key, &self.cert, &self.key)
            .expect("node certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// A node's TLS settings: this CA, and a certificate it issued for `identity`.
    pub fn node(&self, identity: &str) -> TlsConfig {
        let (cert, key) = self.issue_with(identity, |_| {});
        TlsConfig::from_pem(self.pem(), cert, key).expect("TLS config")
    }
}
