//! rustls configurations of the tunnel: TLS 1.3 only, ALPN h2, mutual
//! authentication against the trust bundle, and SPIFFE IDs (URI SANs) as
//! the names that are checked. Certificates are swapped in place on
//! renewal, so open connections are not touched.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use super::certs::{CertError, Issued};
use super::Identity;

pub const ALPN_H2: &[u8] = b"h2";

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// The CA certificates of a PEM trust bundle.
pub fn trust_bundle(path: &Path) -> Result<Arc<RootCertStore>, CertError> {
    use rustls::pki_types::pem::PemObject;
    let file = |message: String| CertError::File { path: path.display().to_string(), message };
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| file(format!("{e:?}")))?;
    for c in certs {
        let c = c.map_err(|e| file(format!("{e:?}")))?;
        roots.add(c).map_err(|e| file(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(file("no certificate in the trust bundle".into()));
    }
    Ok(Arc::new(roots))
}

pub fn certified(issued: &Issued) -> Result<Arc<CertifiedKey>, rustls::Error> {
    let key = ring::sign::any_supported_type(&issued.key)?;
    Ok(Arc::new(CertifiedKey::new(issued.chain.clone(), key)))
}

/// The SPIFFE ID in a certificate's URI SAN.
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<Identity> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = x.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Identity::parse(u).ok(),
        _ => None,
    })
}

/// A certificate that renewal swaps in place.
#[derive(Debug)]
pub struct SwapCert(ArcSwap<CertifiedKey>);

impl SwapCert {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(Self(ArcSwap::new(key)))
    }
    pub fn set(&self, key: Arc<CertifiedKey>) {
        self.0.store(key);
    }
}

impl ResolvesServerCert for SwapCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

impl ResolvesClientCert for SwapCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// The tunnel server: presents the node certificate, requires a client
/// certificate that chains to the bundle.
/// Why a rustls configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

pub fn server_config(cert: Arc<SwapCert>, roots: Arc<RootCertStore>) -> Result<ServerConfig, TlsConfigError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider()).build()?;
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    c.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(c)
}

/// The tunnel client: presents `cert`, accepts only a server chaining to
/// the bundle whose SPIFFE ID is `expected` (the endpoint's node).
pub fn client_config(
    cert: Arc<SwapCert>,
    roots: Arc<RootCertStore>,
    expected: Identity,
) -> Result<ClientConfig, TlsConfigError> {
    let verifier = Arc::new(SpiffeServerVerifier { roots, expected, provider: provider() });
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(cert);
    c.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(c)
}

/// Checks the chain against the bundle, then the SPIFFE ID instead of a
/// DNS name.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Identity,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    pub fn new(roots: Arc<RootCertStore>, expected: Identity) -> Self {
        Self { roots, expected, provider: provider() }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match identity_of(end_entity) {
            Some(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            _ => Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::super::certs::Ca;
    use super::*;
    use std::time::{Duration, SystemTime};

    fn ca(dir: &Path, name: &str) -> (Ca, Arc<RootCertStore>) {
        let (c, k) = Ca::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), &c).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), &k).unwrap();
        let ca = Ca::from_files(&dir.join(format!("{name}.pem")), &dir.join(format!("{name}.key"))).unwrap();
        (ca, trust_bundle(&dir.join(format!("{name}.pem"))).unwrap())
    }

    #[test]
    fn verifier_wants_the_right_chain_and_the_right_spiffe_id() {
        let dir = std::env::temp_dir().join(format!("mesh-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca1, roots1) = ca(&dir, "one");
        let (ca2, _) = ca(&dir, "two");
        let node_a = Identity::parse("spiffe://cluster.local/ns/mesh-system/node/node-a").unwrap();
        let node_b = Identity::parse("spiffe://cluster.local/ns/mesh-system/node/node-b").unwrap();
        let now = UnixTime::now();
        let name = ServerName::try_from("10.0.0.1").unwrap();
        let check = |issued: &Issued, expected: &Identity| {
            SpiffeServerVerifier::new(roots1.clone(), expected.clone()).verify_server_cert(
                &issued.chain[0],
                &issued.chain[1..],
                &name,
                &[],
                now,
            )
        };
        let good = ca1.issue(&node_a, Duration::from_secs(600), 1).unwrap();
        assert!(check(&good, &node_a).is_ok());
        assert_eq!(identity_of(&good.chain[0]), Some(node_a.clone()));
        let wrong_san = check(&good, &node_b).unwrap_err();
        assert!(
            wrong_san.to_string().contains("ApplicationVerificationFailure")
                || wrong_san.to_string().contains("application"),
            "{wrong_san}"
        );
        let other_ca = ca2.issue(&node_a, Duration::from_secs(600), 1).unwrap();
        assert!(check(&other_ca, &node_a).is_err(), "a chain to another CA must fail");
        let expired =
            ca1.issue_at(&node_a, SystemTime::now() - Duration::from_secs(7200), Duration::from_secs(600), 1).unwrap();
        let e = check(&expired, &node_a).unwrap_err();
        assert!(e.to_string().to_lowercase().contains("expired"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
