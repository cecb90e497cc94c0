//! The mesh CA: issues short-lived certificates whose only name is a
//! SPIFFE ID (a URI SAN), for nodes and for enrolled workloads.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::Identity;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("issuing a certificate for {id}: {message}")]
    Issue { id: String, message: String },
}

/// A certificate chain and its key, with when it was issued and expires.
pub struct Issued {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Counts issues for this identity: a new one means a renewed cert.
    pub serial: u64,
}

impl Issued {
    /// Whether 70% of the lifetime has passed: time to renew.
    pub fn due(&self, now: SystemTime) -> bool {
        self.due_at(now, 0.7)
    }

    /// Whether the share `at` of the lifetime has passed.
    pub fn due_at(&self, now: SystemTime, at: f64) -> bool {
        let life = self.not_after.duration_since(self.not_before).unwrap_or_default();
        now.duration_since(self.not_before).unwrap_or_default() >= life.mul_f64(at)
    }
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path)
        .map_err(|e| CertError::File { path: path.display().to_string(), message: e.to_string() })
}

impl Ca {
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, CertError> {
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        let bad = |p: &Path, m: String| CertError::File { path: p.display().to_string(), message: m };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(key, format!("not a PEM private key: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| bad(cert, format!("not a PEM CA certificate: {e}")))?;
        let ca_der = rustls::pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| bad(cert, format!("not a PEM certificate: {e:?}")))?;
        Ok(Self { issuer, ca_der })
    }

    /// A new self-signed CA for `trust_domain`: (certificate PEM, key PEM).
    pub fn generate(trust_domain: &str, lifetime: Duration) -> Result<(String, String), CertError> {
        let err = |e: rcgen::Error| CertError::Issue { id: trust_domain.to_owned(), message: e.to_string() };
        let key = KeyPair::generate().map_err(err)?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, format!("mesh CA {trust_domain}"));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(5);
        p.not_after = now + lifetime;
        let cert = p.self_signed(&key).map_err(err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A certificate for `id`, valid from a minute ago for `lifetime`
    /// (`not_before` in the past tolerates small clock skew).
    pub fn issue(&self, id: &Identity, lifetime: Duration, serial: u64) -> Result<Arc<Issued>, CertError> {
        self.issue_at(id, SystemTime::now(), lifetime, serial)
    }

    /// As [`Ca::issue`], as if issued at `at` (tests make expired certs).
    pub fn issue_at(
        &self,
        id: &Identity,
        at: SystemTime,
        lifetime: Duration,
        serial: u64,
    ) -> Result<Arc<Issued>, CertError> {
        let err = |m: String| CertError::Issue { id: id.to_string(), message: m };
        let key = KeyPair::generate().map_err(|e| err(e.to_string()))?;
        let (p, not_after) = leaf_params(id, at, lifetime)?;
        let cert = p.signed_by(&key, &self.issuer).map_err(|e| err(e.to_string()))?;
        Ok(Arc::new(Issued {
            chain: vec![cert.der().clone(), self.ca_der.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before: at,
            not_after,
            serial,
        }))
    }
}

/// The parameters of a leaf certificate for `id`: its SPIFFE ID as the
/// only name, client and server use, valid from a minute before `at`.
fn leaf_params(
    id: &Identity,
    at: SystemTime,
    lifetime: Duration,
) -> Result<(CertificateParams, SystemTime), CertError> {
    let err = |m: String| CertError::Issue { id: id.to_string(), message: m };
    let mut p = CertificateParams::default();
    let uri = id.to_string().try_into().map_err(|e: rcgen::Error| err(e.to_string()))?;
    p.subject_alt_names = vec![SanType::URI(uri)];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let not_after = at + lifetime;
    p.not_before = time::OffsetDateTime::from(at - Duration::from_secs(60));
    p.not_after = time::OffsetDateTime::from(not_after);
    Ok((p, not_after))
}

/// A new key pair and a CSR (PEM) for `id`: what a node sends the issuer;
/// the key never leaves the node.
pub fn request(id: &Identity) -> Result<(KeyPair, String), CertError> {
    let err = |m: String| CertError::Issue { id: id.to_string(), message: m };
    let key = KeyPair::generate().map_err(|e| err(e.to_string()))?;
    let (p, _) = leaf_params(id, SystemTime::now(), Duration::from_secs(60))?;
    let csr = p.serialize_request(&key).map_err(|e| err(e.to_string()))?;
    Ok((key, csr.pem().map_err(|e| err(e.to_string()))?))
}

impl Ca {
    /// Signs `csr` (PEM) for `id`, which must be the CSR's only name: the
    /// chain (leaf, CA) in DER and when it expires. Only the CSR's public
    /// key is taken; validity and usage are the CA's.
    pub fn sign(
        &self,
        csr: &str,
        id: &Identity,
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, SystemTime), CertError> {
        let err = |m: String| CertError::Issue { id: id.to_string(), message: m };
        let req = rcgen::CertificateSigningRequestParams::from_pem(csr).map_err(|e| err(format!("bad CSR: {e}")))?;
        let want = id.to_string();
        let names: Vec<String> = req
            .params
            .subject_alt_names
            .iter()
            .map(|n| match n {
                SanType::URI(u) => u.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        if names != [want.clone()] {
            return Err(err(format!("the CSR names {names:?}, not only {want}")));
        }
        let (params, not_after) = leaf_params(id, SystemTime::now(), lifetime)?;
        let signed = rcgen::CertificateSigningRequestParams { params, public_key: req.public_key }
            .signed_by(&self.issuer)
            .map_err(|e| err(e.to_string()))?;
        Ok((vec![signed.der().clone(), self.ca_der.clone()], not_after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_csr_is_signed_only_for_the_identity_it_names() {
        let dir = std::env::temp_dir().join(format!("mesh-ca-csr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (c, k) = Ca::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        std::fs::write(dir.join("ca.pem"), c).unwrap();
        std::fs::write(dir.join("ca.key"), k).unwrap();
        let ca = Ca::from_files(&dir.join("ca.pem"), &dir.join("ca.key")).unwrap();
        let web = Identity::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
        let (_key, csr) = request(&web).unwrap();
        let (chain, _) = ca.sign(&csr, &web, Duration::from_secs(600)).unwrap();
        assert_eq!(crate::identity::tls::identity_of(&chain[0]), Some(web));
        let other = Identity::parse("spiffe://cluster.local/ns/default/sa/admin").unwrap();
        let e = ca.sign(&csr, &other, Duration::from_secs(600)).err().unwrap().to_string();
        assert!(e.contains("not only spiffe://cluster.local/ns/default/sa/admin"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn renewal_is_due_at_70_percent() {
        let (c, k) = Ca::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let dir = std::env::temp_dir().join(format!("mesh-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), c).unwrap();
        std::fs::write(dir.join("ca.key"), k).unwrap();
        let ca = Ca::from_files(&dir.join("ca.pem"), &dir.join("ca.key")).unwrap();
        let id = Identity::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
        let t0 = SystemTime::now();
        let issued = ca.issue_at(&id, t0, Duration::from_secs(100), 1).unwrap();
        assert_eq!(issued.chain.len(), 2);
        assert!(!issued.due(t0 + Duration::from_secs(69)));
        assert!(issued.due(t0 + Duration::from_secs(70)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
