//! The issuer: the only process that holds the mesh CA's key. Node daemons
//! send it certificate signing requests over TLS (their private keys never
//! travel) with a bearer credential bound to one node; it signs a node's
//! own identity only for that node, and a workload identity only when the
//! state places an enrolled workload of that namespace and service account
//! on that node. Everything else is refused, counted and logged with the
//! caller.
//!
//! Outside Kubernetes a node's credential is a random token made by
//! `mesh-daemon ca bootstrap`; the issuer keeps only its SHA-256.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::RootCertStore;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use super::binding::{authorize, Refused};
use super::certs::{request, Ca, CertError, Issued};
use super::parsed::ParsedFile;
use super::tls::{self, SwapCert};
use super::Identity;
use crate::model::Invalid;
use crate::model::NodeName;

/// What the issuer's files, flags and start-up can get wrong.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("no randomness from the system")]
    NoRandomness,
    #[error("{0:?}: give HOST:PORT (e.g. 10.0.0.5:15012 or mesh-issuer.mesh-system.svc:15012)")]
    Address(String),
    #[error("--listen {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("the issuer's own certificate: {0}")]
    Certificate(#[from] CertError),
    #[error("the issuer's TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// Where nodes send CSRs.
pub const PATH: &str = "/v1/certificates";

/// The issuer's own identity, which nodes expect its certificate to name.
pub fn identity(trust_domain: &str) -> Identity {
    Identity::from_parts(trust_domain, "ns/mesh-system/sa/mesh-issuer")
}

/// The node credentials the issuer accepts: node name -> SHA-256 of its
/// token, in hex.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Credentials {
    pub nodes: BTreeMap<String, String>,
}

fn sha256_hex(token: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, token.trim().as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl Credentials {
    pub fn load(path: &Path) -> Result<Self, IssuerError> {
        let file = |message: String| IssuerError::File { path: path.to_owned(), message };
        match std::fs::read_to_string(path) {
            Ok(t) => Self::parse(path, Some(&t)).map_err(|e| file(e.0)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(file(e.to_string())),
        }
    }

    /// The credentials in `text`; none when the file is missing (`None`).
    pub fn parse(_: &Path, text: Option<&str>) -> Result<Self, Invalid> {
        match text {
            Some(t) => serde_json::from_str(t).map_err(|e| Invalid(e.to_string())),
            None => Ok(Self::default()),
        }
    }

    /// The node `token` belongs to.
    pub fn node_of(&self, token: &str) -> Option<&str> {
        let h = sha256_hex(token);
        // Compared without an early exit: no timing tells how much matched.
        let same =
            |a: &[u8], b: &[u8]| a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
        self.nodes.iter().find(|(_, v)| same(v.as_bytes(), h.as_bytes())).map(|(k, _)| k.as_str())
    }

    /// Makes a new token for `node` (replacing any it had), records its
    /// hash in `path`, and returns the token.
    pub fn bootstrap(path: &Path, node: &NodeName) -> Result<String, IssuerError> {
        let mut c = Self::load(path)?;
        let mut raw = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .map_err(|_| IssuerError::NoRandomness)?;
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        c.nodes.insert(node.to_string(), sha256_hex(&token));
        let file = |message: String| IssuerError::File { path: path.to_owned(), message };
        let text = serde_json::to_string_pretty(&c).map_err(|e| file(e.to_string()))?;
        std::fs::write(path, text).map_err(|e| file(e.to_string()))?;
        Ok(token)
    }
}

/// What a node sends.
#[derive(Debug, Serialize, Deserialize)]
pub struct SignRequest {
    pub identity: String,
    /// PKCS#10, PEM.
    pub csr: String,
}

/// What the issuer answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignResponse {
    /// Leaf first, PEM.
    pub chain: Vec<String>,
    /// Seconds since the epoch.
    pub not_after: u64,
}

/// Who callers are and what runs where.
pub enum Authority {
    /// Outside Kubernetes: per-node tokens (`ca bootstrap`) and the state
    /// document's workloads.
    Tokens {
        credentials: ParsedFile<Credentials>,
        /// The state document: which workloads run on which node.
        state: ParsedFile<Placement>,
    },
    /// The API server: projected service-account tokens and the pods.
    #[cfg(feature = "kubernetes")]
    Kubernetes(super::kube::Kube),
}

/// Why a request got no certificate.
enum Check {
    Refused(Refused, String),
    /// What would decide cannot be read now (the API server is down):
    /// 503, and the node asks again (or another replica).
    Unavailable(String),
}

/// Where enrolled workloads run: node -> (namespace, service account).
pub type Placement = BTreeMap<String, Vec<(String, String)>>;

impl Authority {
    /// Per-node tokens in `credentials` (made by `ca bootstrap`) and the
    /// workloads of the state document at `state`; both files are read
    /// again when they change.
    pub fn tokens(credentials: PathBuf, state: PathBuf) -> Self {
        Authority::Tokens {
            credentials: ParsedFile::new(credentials, Credentials::parse),
            state: ParsedFile::new(state, |_, text| {
                let text = text.ok_or_else(|| Invalid::from("no such file"))?;
                let doc = crate::model::parse_document(text)?;
                let s = crate::model::State::from_document(&doc).map_err(|e| Invalid(e.to_string()))?;
                let mut placed = Placement::new();
                for w in &s.workloads {
                    placed
                        .entry(w.node.to_string())
                        .or_default()
                        .push((w.namespace.to_string(), w.service_account.to_string()));
                }
                Ok(placed)
            }),
        }
    }

    /// The node `token` is the credential of.
    async fn node_of(&self, token: &str) -> Result<String, Check> {
        match self {
            Authority::Tokens { credentials, .. } => match credentials.get().await {
                Ok(c) => c
                    .node_of(token)
                    .map(str::to_owned)
                    .ok_or_else(|| Check::Refused(Refused::Unauthenticated, "a token no node has".into())),
                Err(e) => Err(Check::Unavailable(format!("cannot read the node credentials: {e}"))),
            },
            #[cfg(feature = "kubernetes")]
            Authority::Kubernetes(k) => match k.node_of(token).await {
                Ok(Ok(node)) => Ok(node),
                Ok(Err((r, why))) => Err(Check::Refused(r, why)),
                Err(e) => Err(Check::Unavailable(e)),
            },
        }
    }

    /// (namespace, service account) of the enrolled workloads of `id`'s
    /// namespace on `node`.
    async fn placed(&self, node: &str, id: &Identity) -> Result<Vec<(String, String)>, Check> {
        match self {
            Authority::Tokens { state, .. } => {
                let placed =
                    state.get().await.map_err(|e| Check::Unavailable(format!("cannot read the state: {e}")))?;
                Ok(placed
                    .get(node)
                    .into_iter()
                    .flatten()
                    .filter(|(ns, _)| Some(ns.as_str()) == id.namespace())
                    .cloned()
                    .collect())
            }
            #[cfg(feature = "kubernetes")]
            Authority::Kubernetes(k) => {
                let Some(ns) = id.namespace() else { return Ok(Vec::new()) };
                k.placed(node, ns).await.map_err(Check::Unavailable)
            }
        }
    }
}

/// The issuer's settings.
pub struct IssuerConfig {
    pub listen: SocketAddr,
    pub ca: Ca,
    pub trust_domain: String,
    pub lifetime: Duration,
    pub authority: Authority,
}

struct Issuer {
    cfg: IssuerConfig,
    issued: AtomicU64,
    refused: [AtomicU64; 5],
    unavailable: AtomicU64,
}

impl Issuer {
    fn count(&self, r: Refused) -> u64 {
        let i = Refused::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.refused[i].fetch_add(1, Ordering::Relaxed) + 1
    }

    fn metrics(&self) -> String {
        let mut s = String::from("# TYPE mesh_issuer_issued_total counter\n");
        s.push_str(&format!("mesh_issuer_issued_total {}\n", self.issued.load(Ordering::Relaxed)));
        s.push_str("# TYPE mesh_issuer_refused_total counter\n");
        for (i, r) in Refused::ALL.iter().enumerate() {
            s.push_str(&format!(
                "mesh_issuer_refused_total{{reason=\"{}\"}} {}\n",
                r.as_str(),
                self.refused[i].load(Ordering::Relaxed)
            ));
        }
        s.push_str("# TYPE mesh_issuer_unavailable_total counter\n");
        s.push_str(&format!("mesh_issuer_unavailable_total {}\n", self.unavailable.load(Ordering::Relaxed)));
        s
    }

    /// The answer to a request that got no certificate, counted and logged.
    fn refuse(&self, check: Check, peer: std::net::SocketAddr, caller: &str, id: &str) -> Response<Full<Bytes>> {
        match check {
            Check::Refused(Refused::Unauthenticated, why) => {
                let n = self.count(Refused::Unauthenticated);
                warn!(%peer, why, refused = n, "a caller without a valid node credential; refused (401)");
                Self::answer(StatusCode::UNAUTHORIZED, format!("no valid node credential: {why}\n"))
            }
            Check::Refused(r, why) => {
                let n = self.count(r);
                warn!(%peer, caller = %caller, identity = %id, reason = r.as_str(), why, refused = n, "certificate refused (403)");
                Self::answer(StatusCode::FORBIDDEN, format!("{caller} may not hold {id}: {}: {why}\n", r.as_str()))
            }
            Check::Unavailable(why) => {
                let n = self.unavailable.fetch_add(1, Ordering::Relaxed) + 1;
                warn!(%peer, caller = %caller, identity = %id, why, unavailable = n, "cannot decide now; answered 503");
                Self::answer(StatusCode::SERVICE_UNAVAILABLE, format!("cannot decide now: {why}\n"))
            }
        }
    }

    fn answer(status: StatusCode, body: String) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    }

    async fn handle(&self, req: Request<hyper::body::Incoming>, peer: std::net::SocketAddr) -> Response<Full<Bytes>> {
        if req.method() == Method::GET && req.uri().path() == "/metrics" {
            return Self::answer(StatusCode::OK, self.metrics());
        }
        if req.method() != Method::POST || req.uri().path() != PATH {
            return Self::answer(StatusCode::NOT_FOUND, format!("POST {PATH}\n"));
        }
        let token = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let node = match token {
            Some(t) => self.cfg.authority.node_of(&t).await,
            None => Err(Check::Refused(Refused::Unauthenticated, "no bearer token".into())),
        };
        let node = match node {
            Ok(n) => n,
            Err(c) => return self.refuse(c, peer, "?", "?"),
        };
        let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
            return Self::answer(StatusCode::BAD_REQUEST, "unreadable body\n".into());
        };
        let Ok(sign) = serde_json::from_slice::<SignRequest>(&body) else {
            return Self::answer(StatusCode::BAD_REQUEST, "the body is not {identity, csr}\n".into());
        };
        let id = match Identity::parse(&sign.identity) {
            Ok(id) => id,
            Err(e) => {
                return self.refuse(Check::Refused(Refused::BadIdentity, e.to_string()), peer, &node, &sign.identity)
            }
        };
        let placed = if id.node_name().is_some() {
            Vec::new()
        } else {
            match self.cfg.authority.placed(&node, &id).await {
                Ok(p) => p,
                Err(c) => return self.refuse(c, peer, &node, &sign.identity),
            }
        };
        if let Err(r) = authorize(&self.cfg.trust_domain, &node, &id, &placed) {
            let why = match r {
                Refused::OtherNode => "another node's identity",
                Refused::NotOnNode => "no enrolled workload of it runs on the caller's node",
                _ => "not a node or workload identity of this trust domain",
            };
            return self.refuse(Check::Refused(r, why.into()), peer, &node, &sign.identity);
        }
        match self.cfg.ca.sign(&sign.csr, &id, self.cfg.lifetime) {
            Ok((chain, not_after)) => {
                self.issued.fetch_add(1, Ordering::Relaxed);
                info!(caller = %node, identity = %id, "certificate issued");
                let pem = |c: &CertificateDer<'_>| pem::encode(&pem::Pem::new("CERTIFICATE", c.as_ref().to_vec()));
                let resp = SignResponse {
                    chain: chain.iter().map(pem).collect(),
                    not_after: not_after.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                };
                Self::answer(StatusCode::OK, serde_json::to_string(&resp).unwrap_or_default())
            }
            Err(e) => Self::answer(StatusCode::BAD_REQUEST, format!("{e}\n")),
        }
    }
}

/// Serves CSRs until the process ends. Its own TLS certificate (the
/// issuer identity) comes from the CA it holds and is renewed in place.
pub async fn serve(cfg: IssuerConfig) -> Result<(), IssuerError> {
    let me = identity(&cfg.trust_domain);
    let own = cfg.ca.issue(&me, cfg.lifetime, 1)?;
    let swap = SwapCert::new(tls::certified(&own)?);
    let tls = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(swap.clone());
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener =
        TcpListener::bind(cfg.listen).await.map_err(|source| IssuerError::Listen { addr: cfg.listen, source })?;
    info!(listen = %cfg.listen, identity = %me, "issuer listening");
    let issuer = Arc::new(Issuer {
        cfg,
        issued: AtomicU64::new(0),
        refused: Default::default(),
        unavailable: AtomicU64::new(0),
    });
    let renewer = issuer.clone();
    tokio::spawn(async move {
        let every = renewer.cfg.lifetime.mul_f64(0.5).max(Duration::from_secs(1));
        loop {
            tokio::time::sleep(every).await;
            match renewer.cfg.ca.issue(&me, renewer.cfg.lifetime, 1).map(|i| tls::certified(&i)) {
                Ok(Ok(k)) => swap.set(k),
                _ => warn!("renewing the issuer's own certificate failed; will retry"),
            }
        }
    });
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, issuer) = (acceptor.clone(), issuer.clone());
        tokio::spawn(async move {
            let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await else {
                return;
            };
            let svc = hyper::service::service_fn(move |req| {
                let issuer = issuer.clone();
                async move { Ok::<_, Infallible>(issuer.handle(req, peer).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
        });
    }
}

/// An issuer's address as flags take it: `HOST:PORT`, the host an IPv4
/// address or a DNS name (a Kubernetes Service's).
pub fn host_port(s: &str) -> Result<String, IssuerError> {
    let bad = || IssuerError::Address(s.to_owned());
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    match (host_ok, port.parse::<u16>()) {
        (true, Ok(p)) if p > 0 => Ok(s.to_owned()),
        _ => Err(bad()),
    }
}

/// A node's way to its certificates: CSRs to the issuers at `addrs`
/// (replicas: one that cannot be reached is passed over for the next, and
/// the one that answered is asked first next time), whose certificates
/// must chain to `roots` and name the issuer identity.
pub struct IssuerClient {
    /// `HOST:PORT`, resolved at every request (a Service name follows its
    /// address).
    pub addrs: Vec<String>,
    /// The node's credential, read at every request: a token that is
    /// rotated in place (a projected service-account token) is picked up.
    pub token: PathBuf,
    pub roots: Arc<RootCertStore>,
    pub trust_domain: String,
    /// Index into `addrs` of the issuer that answered last.
    pub last_good: std::sync::atomic::AtomicUsize,
}

impl IssuerClient {
    pub fn new(addrs: Vec<String>, token: PathBuf, roots: Arc<RootCertStore>, trust_domain: String) -> Self {
        Self { addrs, token, roots, trust_domain, last_good: std::sync::atomic::AtomicUsize::new(0) }
    }

    /// A new key and a certificate for `id` (serial `serial`), signed by an
    /// issuer. A refusal is final (every replica decides the same); an
    /// issuer that cannot be reached is passed over for the next.
    pub async fn issue(&self, id: &Identity, serial: u64) -> Result<Arc<Issued>, CertError> {
        let err = |m: String| CertError::Issue { id: id.to_string(), message: m };
        let token = tokio::fs::read_to_string(&self.token)
            .await
            .map_err(|e| err(format!("the issuer credential {}: {e}", self.token.display())))?;
        let first = self.last_good.load(Ordering::Relaxed);
        let mut unreachable = Vec::new();
        for k in 0..self.addrs.len() {
            let i = (first + k) % self.addrs.len();
            match self.ask(&self.addrs[i], id, serial, &token).await {
                Ok(issued) => {
                    self.last_good.store(i, Ordering::Relaxed);
                    return Ok(issued);
                }
                Err(Failure::Refused(m)) => return Err(err(m)),
                Err(Failure::Unreachable(m)) => unreachable.push(m),
            }
        }
        Err(err(if unreachable.is_empty() { "no issuer given".into() } else { unreachable.join("; ") }))
    }

    async fn ask(&self, name: &str, id: &Identity, serial: u64, token: &str) -> Result<Arc<Issued>, Failure> {
        let issuer = format!("issuer {name}");
        let down = |m: String| Failure::Unreachable(format!("{issuer}: {m}"));
        let refused = |m: String| Failure::Refused(format!("{issuer}: {m}"));
        let addr = tokio::net::lookup_host(name)
            .await
            .map_err(|e| down(format!("cannot resolve it: {e}")))?
            .next()
            .ok_or_else(|| down("it resolves to no address".into()))?;
        let (key, csr) = request(id).map_err(|e| refused(e.to_string()))?;
        let body =
            serde_json::to_vec(&SignRequest { identity: id.to_string(), csr }).map_err(|e| refused(e.to_string()))?;
        let verifier = Arc::new(tls::SpiffeServerVerifier::new(self.roots.clone(), identity(&self.trust_domain)));
        let cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| refused(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        let tcp = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr))
            .await
            .map_err(|_| down("connect timed out".into()))?
            .map_err(|e| down(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .map_err(|e| down(format!("TLS: {e}")))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| down(e.to_string()))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(Method::POST)
            .uri(PATH)
            .header(hyper::header::HOST, name)
            .header(hyper::header::AUTHORIZATION, format!("Bearer {}", token.trim()))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| refused(e.to_string()))?;
        let resp = send.send_request(req).await.map_err(|e| down(e.to_string()))?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| down(e.to_string()))?.to_bytes();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            return Err(down(format!("{status}: {}", String::from_utf8_lossy(&bytes).trim())));
        }
        if status != StatusCode::OK {
            return Err(refused(format!("refused ({status}): {}", String::from_utf8_lossy(&bytes).trim())));
        }
        let r: SignResponse = serde_json::from_slice(&bytes).map_err(|e| refused(e.to_string()))?;
        let chain = r
            .chain
            .iter()
            .map(|p| {
                rustls::pki_types::pem::PemObject::from_pem_slice(p.as_bytes())
                    .map_err(|e| refused(format!("a certificate that is not PEM: {e:?}")))
            })
            .collect::<Result<Vec<CertificateDer<'static>>, _>>()?;
        if chain.first().and_then(tls::identity_of).as_ref() != Some(id) {
            return Err(refused("answered a certificate for another identity".into()));
        }
        Ok(Arc::new(Issued {
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before: SystemTime::now(),
            not_after: UNIX_EPOCH + Duration::from_secs(r.not_after),
            serial,
        }))
    }
}

/// How asking one issuer failed.
enum Failure {
    /// It could not be reached or broke off: another replica may answer.
    Unreachable(String),
    /// It answered no, or something no replica would do otherwise.
    Refused(String),
}

#[cfg(test)]
mod tests;
