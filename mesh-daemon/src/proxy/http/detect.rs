//! `appProtocol: auto`: what a client speaks, from its first bytes, without
//! consuming them (`peek`). A client that says nothing within the timeout
//! (a server-speaks-first protocol) is opaque TCP.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::model::AppProtocol;

/// HTTP/2's connection preface (RFC 9113, 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest HTTP/1 method we wait for (`OPTIONS`, `CONNECT`).
const MAX_METHOD: usize = 7;

/// What the first `bytes` say, or None while they are too few to tell.
pub fn classify(bytes: &[u8]) -> Option<AppProtocol> {
    let n = bytes.len().min(PREFACE.len());
    if bytes[..n] == PREFACE[..n] {
        return (bytes.len() >= PREFACE.len()).then_some(AppProtocol::Http2);
    }
    // An HTTP/1 request line starts with a method token of upper-case
    // letters and a space.
    for (i, b) in bytes.iter().enumerate().take(MAX_METHOD + 1) {
        match b {
            b'A'..=b'Z' => continue,
            b' ' if i > 0 => return Some(AppProtocol::Http),
            _ => return Some(AppProtocol::Tcp),
        }
    }
    (bytes.len() > MAX_METHOD).then_some(AppProtocol::Tcp)
}

/// Peeks at `client` until [`classify`] decides, or `timeout` passes.
pub async fn detect(client: &TcpStream, timeout: Duration) -> AppProtocol {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; PREFACE.len()];
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, client.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => return AppProtocol::Tcp,
        };
        if n == 0 {
            return AppProtocol::Tcp;
        }
        if let Some(p) = classify(&buf[..n]) {
            return p;
        }
        // Too few bytes to tell: peek returns at once while any are
        // waiting, so wait a little for more instead of spinning.
        if n == seen {
            if Instant::now() >= deadline {
                return AppProtocol::Tcp;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        seen = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_bytes_decide() {
        assert_eq!(classify(PREFACE), Some(AppProtocol::Http2));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None, "a partial preface waits");
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(AppProtocol::Http));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1\r\n"), Some(AppProtocol::Http));
        assert_eq!(classify(b"POS"), None, "a partial method waits");
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(AppProtocol::Tcp), "TLS is opaque");
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(AppProtocol::Tcp));
        assert_eq!(classify(b"ABCDEFGHIJ"), Some(AppProtocol::Tcp), "no method is that long");
        assert_eq!(classify(b" GET"), Some(AppProtocol::Tcp));
    }

    #[tokio::test]
    async fn a_silent_client_is_tcp_after_the_timeout_and_bytes_stay_unread() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert_eq!(detect(&s, Duration::from_millis(50)).await, AppProtocol::Tcp);

        let mut talker = TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut talker, b"GE").await.unwrap();
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tokio::io::AsyncWriteExt::write_all(&mut talker, b"T / HTTP/1.1\r\n").await.unwrap();
            talker
        });
        assert_eq!(detect(&s, Duration::from_secs(5)).await, AppProtocol::Http);
        let _talker = later.await.unwrap();
        let mut buf = [0u8; 4];
        let n = s.peek(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET ", "detection consumed nothing");
    }
}
