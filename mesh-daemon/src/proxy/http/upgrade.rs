//! HTTP/1.1 upgrades (WebSocket and the like) and `CONNECT`: the request
//! is sent to one endpoint over a connection of its own (never a pooled
//! one), and once the endpoint agrees (101, or 2xx to `CONNECT`) both
//! sides are relayed as opaque bytes, as a `tcp` port would be.

use hyper::body::Incoming;
use hyper::header;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::time::Duration;
use tracing::{debug, warn};

use super::upstream::{Connector, Dial, SendError, UpstreamBody};
use crate::relay::relay;

/// Whether the client asks to leave HTTP on this connection.
pub fn wanted<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        || (req.headers().contains_key(header::UPGRADE)
            && req
                .headers()
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// Whether the endpoint agreed to leave HTTP.
fn agreed(method: &Method, status: StatusCode) -> bool {
    status == StatusCode::SWITCHING_PROTOCOLS || (method == Method::CONNECT && status.is_success())
}

/// Sends the upgrade request `req` to the endpoint `dial` names over a new
/// connection and, when it agrees, relays the two upgraded connections.
/// Returns the endpoint's answer for the client.
pub async fn forward(
    mut req: Request<UpstreamBody>,
    dial: Dial,
    connector: &Connector,
    idle: Duration,
) -> Result<Response<Incoming>, SendError> {
    let client_side = hyper::upgrade::on(&mut req);
    let io = connector.connect().await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!(error = %e, "upgrade connection to the endpoint ended");
        }
    });
    // Connection and Upgrade stay: they are what this request is about.
    let method = req.method().clone();
    let mut resp = sender.send_request(req).await?;
    if agreed(&method, resp.status()) {
        let upstream_side = hyper::upgrade::on(&mut resp);
        let target = dial.target();
        tokio::spawn(async move {
            match (client_side.await, upstream_side.await) {
                (Ok(c), Ok(u)) => {
                    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                    let t = relay(&mut c, &mut u, idle).await;
                    debug!(endpoint = %target, up = t.up, down = t.down, "upgraded connection closed");
                }
                (c, u) => warn!(endpoint = %target, client = ?c.err(), upstream = ?u.err(), "upgrade failed"),
            }
        });
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_101_or_a_connect_success_leaves_http() {
        assert!(agreed(&Method::GET, StatusCode::SWITCHING_PROTOCOLS));
        assert!(agreed(&Method::CONNECT, StatusCode::OK));
        assert!(!agreed(&Method::GET, StatusCode::OK), "a plain answer stays HTTP");
        assert!(!agreed(&Method::CONNECT, StatusCode::FORBIDDEN));
    }
}
