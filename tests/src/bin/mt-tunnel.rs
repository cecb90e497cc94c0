//! A client of a node's tunnel port, as anyone holding a certificate of the
//! trust domain could write one: TLS with that certificate, HTTP/2, one
//! CONNECT to TARGET naming SERVICE (or no service). Prints
//! `status=CODE deny=REASON`, and after a 200 sends an HTTP/1.0 GET
//! through the stream and prints `reply=FIRST-LINE`.
//!
//! usage: mt-tunnel TUNNEL-ADDR CERT-DIR TARGET [SERVICE]
//!        mt-tunnel hold TUNNEL-ADDR CERT-DIR COUNT SECS
//! (CERT-DIR holds cert.pem and key.pem, as `mesh-daemon ca issue` writes them)
//!
//! `hold` opens COUNT connections one after another (TLS and HTTP/2, no
//! stream), keeps them SECS seconds, and prints `held=H closed=C`: how many
//! stayed open and how many the node closed.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The attacker does not care who the server is.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn e(what: &str, err: impl std::fmt::Display) -> String {
    format!("{what}: {err}")
}

/// One tunnel connection with the certificate in `dir`: its request
/// sender, and a task that ends when the connection does.
async fn open(
    tunnel: SocketAddr,
    dir: &Path,
) -> Result<(hyper::client::conn::http2::SendRequest<Empty<Bytes>>, tokio::task::JoinHandle<()>), String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("cert.pem"))
        .map_err(|x| e("cert.pem", x))?
        .collect::<Result<_, _>>()
        .map_err(|x| e("cert.pem", x))?;
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).map_err(|x| e("key.pem", x))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|x| e("tls", x))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(chain, key)
        .map_err(|x| e("client certificate", x))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(tunnel).await.map_err(|x| e("connect", x))?;
    let name = ServerName::IpAddress(tunnel.ip().into());
    let tls =
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.map_err(|x| e("handshake", x))?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|x| e("http2", x))?;
    let running = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, running))
}

/// `hold`: COUNT connections kept SECS seconds; how many stayed open. A
/// connection the node closed while it was being opened counts as closed
/// (each such error goes to stderr).
async fn hold(tunnel: SocketAddr, dir: &Path, count: usize, secs: u64) -> Result<String, String> {
    let mut conns = Vec::with_capacity(count);
    let mut failed = 0;
    for _ in 0..count {
        match open(tunnel, dir).await {
            Ok(c) => conns.push(c),
            Err(err) => {
                eprintln!("mt-tunnel: {err}");
                failed += 1;
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let closed = failed + conns.iter().filter(|(_, running)| running.is_finished()).count();
    Ok(format!("held={} closed={closed}", count - closed))
}

async fn probe(tunnel: SocketAddr, dir: &Path, target: &str, service: Option<&str>) -> Result<String, String> {
    let (mut sender, _conn) = open(tunnel, dir).await?;
    let mut req = Request::builder().method(Method::CONNECT).uri(target);
    if let Some(s) = service {
        req = req.header("mesh-service", s);
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|x| e("request", x))?;
    let resp = sender.send_request(req).await.map_err(|x| e("CONNECT", x))?;
    let status = resp.status().as_u16();
    let deny = resp.headers().get("mesh-deny").and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
    let mut out = format!("status={status} deny={deny}");
    if status == 200 {
        let mut up = TokioIo::new(hyper::upgrade::on(resp).await.map_err(|x| e("upgrade", x))?);
        up.write_all(b"GET / HTTP/1.0\r\n\r\n").await.map_err(|x| e("write", x))?;
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), up.read(&mut buf))
            .await
            .map_err(|x| e("read", x))?
            .map_err(|x| e("read", x))?;
        let text = String::from_utf8_lossy(&buf[..n]);
        out += &format!(" reply={}", text.lines().next().unwrap_or("").replace(' ', "_"));
    }
    Ok(out)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    const USAGE: &str =
        "usage: mt-tunnel TUNNEL-ADDR CERT-DIR TARGET [SERVICE]\n       mt-tunnel hold TUNNEL-ADDR CERT-DIR COUNT SECS";
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mt-tunnel: {e}");
            return ExitCode::FAILURE;
        }
    };
    let work: std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>>>>;
    let limit;
    if args.first().map(String::as_str) == Some("hold") {
        let num = |i: usize| args.get(i).and_then(|a| a.parse::<u64>().ok());
        let (Some(tunnel), Some(dir), Some(count), Some(secs)) =
            (args.get(1).and_then(|a| a.parse().ok()), args.get(2), num(3), num(4))
        else {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        };
        limit = Duration::from_secs(secs + 10 + count);
        work = Box::pin(hold(tunnel, Path::new(dir), count as usize, secs));
    } else {
        let (Some(tunnel), Some(dir), Some(target)) =
            (args.first().and_then(|a| a.parse().ok()), args.get(1), args.get(2))
        else {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        };
        limit = Duration::from_secs(10);
        work = Box::pin(probe(tunnel, Path::new(dir), target, args.get(3).map(String::as_str)));
    }
    match rt.block_on(async { tokio::time::timeout(limit, work).await }) {
        Ok(Ok(line)) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("mt-tunnel: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("mt-tunnel: timed out");
            ExitCode::FAILURE
        }
    }
}
