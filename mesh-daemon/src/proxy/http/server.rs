//! The HTTP/2 client side, on the `h2` crate directly: every stream of a
//! client connection is served in that connection's own task (its request
//! routed by [`super::handle`], its answer's body pumped back), where
//! hyper's server spawned a task per stream. A connection's streams share
//! one worker thread, as they do in Envoy and HAProxy; connections spread
//! over the workers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::{Connection, SendResponse};
use h2::{Reason, RecvStream};
use hyper::body::Body as _;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};

use super::pump::pump;
use super::upstream::UpstreamBody;
use super::Conn;

/// The server side of a client connection: hyper's defaults for its
/// windows (1 MiB per stream and per connection), frames (16 KiB) and
/// send buffer (400 KiB per stream), at most 1024 streams at once, and
/// header blocks decoded up to `decoded` bytes.
pub(super) fn builder(decoded: u32) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 20)
        .max_frame_size(16 << 10)
        .max_send_buffer_size(400 << 10)
        .max_concurrent_streams(1024)
        .max_header_list_size(decoded)
        .max_local_error_reset_streams(Some(1024));
    b
}

type Stream<'c> = Pin<Box<dyn Future<Output = ()> + Send + 'c>>;

/// A client connection being served: it ends when the client closes it,
/// or after [`Served::graceful_shutdown`] once its open streams are done.
pub(super) struct Served<'c, T> {
    connection: Connection<T, Bytes>,
    streams: FuturesUnordered<Stream<'c>>,
    conn: &'c Conn,
}

impl<'c, T: AsyncRead + AsyncWrite + Unpin> Served<'c, T> {
    pub(super) fn new(connection: Connection<T, Bytes>, conn: &'c Conn) -> Self {
        Self { connection, streams: FuturesUnordered::new(), conn }
    }

    /// A GOAWAY to the client: no new stream, those open finish.
    pub(super) fn graceful_shutdown(self: Pin<&mut Self>) {
        self.get_mut().connection.graceful_shutdown();
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Future for Served<'_, T> {
    type Output = Result<(), h2::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            // The streams first: what they send is then written by the
            // connection's poll below, in this same turn.
            while let Poll::Ready(Some(())) = this.streams.poll_next_unpin(cx) {}
            let mut accepted = false;
            loop {
                match this.connection.poll_accept(cx) {
                    Poll::Ready(Some(Ok((req, respond)))) => {
                        this.streams.push(Box::pin(stream(req, respond, this.conn)));
                        accepted = true;
                    }
                    // The connection failed: its streams go with it.
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    // Closed, its streams done (h2 ends a connection only
                    // once none is open).
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => break,
                }
            }
            if !accepted {
                return Poll::Pending;
            }
        }
    }
}

/// One stream: its request routed while the client may still reset it
/// (which drops the request, and with it its upstream stream), then the
/// answer's head and body sent back.
async fn stream(req: Request<RecvStream>, mut respond: SendResponse<Bytes>, conn: &Conn) {
    let req = req.map(|recv| UpstreamBody::H2 { recv, data_done: false });
    let handled = super::handle(req, conn);
    tokio::pin!(handled);
    let answer = std::future::poll_fn(|cx| match handled.as_mut().poll(cx) {
        Poll::Ready(answer) => Poll::Ready(Some(answer)),
        Poll::Pending => respond.poll_reset(cx).map(|_| None),
    })
    .await;
    let Some(answer) = answer else { return };
    let (mut head, body) = answer.into_parts();
    let eos = body.is_end_stream();
    if !eos && !head.headers.contains_key(header::CONTENT_LENGTH) {
        if let Some(len) = body.size_hint().exact() {
            head.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
    }
    match respond.send_response(Response::from_parts(head, ()), eos) {
        Ok(send) if !eos => pump(body, send, Reason::INTERNAL_ERROR).await,
        Ok(_) => {}
        // The stream was reset meanwhile, or its head was refused (a
        // header HTTP/2 forbids): the client sees the stream reset.
        Err(_) => respond.send_reset(Reason::INTERNAL_ERROR),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use arc_swap::ArcSwap;
    use bytes::Bytes;
    use h2::server::SendResponse;
    use h2::{Reason, RecvStream};
    use hyper::{HeaderMap, Request, Response};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;
    use tokio::task::JoinHandle;

    use crate::drain::Drain;
    use crate::model::AppProtocol;
    use crate::proxy::http::{Accepted, Conn};
    use crate::proxy::routes::testing::table_on;
    use crate::proxy::ProxyCounters;
    use crate::telemetry::otlp::Spans;
    use crate::telemetry::Metrics;

    const WAIT: Duration = Duration::from_secs(10);

    /// An HTTP/2 endpoint on loopback whose every stream `answer` serves.
    async fn endpoint<F, Fut>(answer: F) -> SocketAddr
    where
        F: Fn(Request<RecvStream>, SendResponse<Bytes>) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(s).await else { return };
                    // Streams in tasks of their own, the connection polled here.
                    while let Some(Ok((req, respond))) = conn.accept().await {
                        tokio::spawn(answer(req, respond));
                    }
                });
            }
        });
        addr
    }

    /// A client connection from `client` to service `web`, whose one
    /// endpoint is 127.0.0.1:`port`.
    fn conn_to(port: u16, client: SocketAddr) -> Conn {
        conn_on(port, ONE, client, &crate::env::Live, AppProtocol::Http2)
    }

    const ONE: &str = "   endpoints: [{ip: 127.0.0.1, node: a}]\n";

    /// As [`conn_to`], with the endpoints `endpoints` (YAML) listening on
    /// `port`, `env`'s clock and draws, and `proto`'s requests.
    fn conn_on(
        port: u16,
        endpoints: &str,
        client: SocketAddr,
        env: &'static dyn crate::env::Env,
        proto: AppProtocol,
    ) -> Conn {
        let metrics = Arc::new(Metrics::new());
        let (table, _) = table_on(port, endpoints, &metrics);
        conn_of(table, &metrics, client, env, proto)
    }

    /// A client connection from `client` to service `web` of `table`.
    fn conn_of(
        table: crate::proxy::routes::RouteTable,
        metrics: &Arc<Metrics>,
        client: SocketAddr,
        env: &'static dyn crate::env::Env,
        proto: AppProtocol,
    ) -> Conn {
        let routes = Arc::new(ArcSwap::from_pointee(table));
        let route = routes.load().route(1).unwrap().clone();
        let at = Accepted { routes, service_id: 1, route, source: None, client, proto, max_headers: 65536 };
        let counters = Arc::new(ProxyCounters::new(metrics));
        Conn::new(at, Arc::default(), None, counters, Arc::new(Spans::disabled()), Duration::from_secs(60), env)
    }

    /// The proxy serving one HTTP/2 client connection to service `web`,
    /// whose one endpoint is `endpoint`; the client's side of it, and the
    /// task serving it.
    async fn proxy(endpoint: SocketAddr, drain: &Drain) -> (h2::client::SendRequest<Bytes>, JoinHandle<()>) {
        let (client, _, served) = served(|peer| conn_to(endpoint.port(), peer), drain).await;
        let (tx, connection) = h2::client::handshake(client).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        (tx, served)
    }

    /// A client connection on loopback, the proxy serving it with the
    /// connection `conn` makes of the client's address, and the task.
    async fn served(conn: impl FnOnce(SocketAddr) -> Conn, drain: &Drain) -> (TcpStream, Arc<Conn>, JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, peer) = l.accept().await.unwrap();
        let conn = Arc::new(conn(peer));
        let task = tokio::spawn(super::super::serve(server, conn.clone(), drain.clone()));
        (client, conn, task)
    }

    /// An HTTP/2 endpoint answering every stream `backend=web`.
    async fn web_endpoint() -> SocketAddr {
        endpoint(|_req, mut respond| async move {
            let mut send = respond.send_response(Response::new(()), false).unwrap();
            send.send_data(Bytes::from_static(b"backend=web\n"), true).unwrap();
        })
        .await
    }

    /// The requests of a fixed load: `MESH_LOAD_REQUESTS`, 200 by default.
    fn load_requests() -> usize {
        std::env::var("MESH_LOAD_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200)
    }

    fn get() -> Request<()> {
        Request::get("http://web.default:80/x").body(()).unwrap()
    }

    /// Reads a body to its end, giving its window back: its bytes, or the
    /// error that cut it short.
    async fn read(mut body: RecvStream) -> Result<Vec<u8>, h2::Error> {
        let mut all = Vec::new();
        while let Some(d) = body.data().await {
            let d = d?;
            let _ = body.flow_control().release_capacity(d.len());
            all.extend_from_slice(&d);
        }
        Ok(all)
    }

    /// A fixed load through the proxy (one HTTP/2 client connection, 32
    /// streams at a time, `MESH_LOAD_REQUESTS` requests in all, 200 by
    /// default), each answered whole: what `cargo xtask bench
    /// --instructions` counts the instructions of under callgrind.
    #[tokio::test]
    async fn a_fixed_load_for_callgrind() {
        fixed_h2_load(ONE).await;
    }

    /// The same with the bench's routes on service `web` (50 HTTPRoutes
    /// of 16 rules no request matches, and a catch-all), the second
    /// HTTP/2 load `cargo xtask bench --instructions` counts.
    #[tokio::test]
    async fn a_fixed_routed_load_for_callgrind() {
        let routes = mesh_tests::fixtures::bench_routes(&[("web", "web")]);
        let metrics = fixed_h2_load(&format!("{ONE}{routes}")).await;
        // What is counted went through the router, every request to the
        // catch-all.
        let routed: Vec<_> = metrics.route_rows().into_iter().filter(|r| r.requests > 0).collect();
        assert_eq!(routed.len(), 1, "{routed:?}");
        assert_eq!((routed[0].route.as_str(), routed[0].requests), ("default/web-all", load_requests() as u64));
    }

    /// The same with the bench's policies on service `web` (19 DENY
    /// policies of 10 rules no request matches, and an ALLOW policy whose
    /// last rule matches every request), the third HTTP/2 load.
    #[tokio::test]
    async fn a_fixed_authorized_load_for_callgrind() {
        let policies = mesh_tests::fixtures::bench_policies(&["web"]);
        let metrics = fixed_h2_load(&format!("{ONE}{policies}")).await;
        // What is counted went through the policies: every request
        // allowed by the ALLOW policy's last rule.
        let text = metrics.encode();
        let allowed = text
            .lines()
            .find(|l| l.starts_with("mesh_authz_decisions_total{") && l.contains("decision=\"allow\""))
            .unwrap_or_else(|| panic!("no allow decision counted:\n{text}"));
        assert!(
            allowed.contains("default/bench-19") && allowed.ends_with(&format!(" {}", load_requests())),
            "{allowed}"
        );
    }

    /// The fixed HTTP/2 load through service `web` with `extra` (YAML)
    /// after its `ports`: its endpoints, and routes or policies. The
    /// proxy's metrics, to see what the requests went through.
    async fn fixed_h2_load(extra: &str) -> Arc<Metrics> {
        let n = load_requests();
        let drain = Drain::new();
        let ep = web_endpoint().await;
        let metrics = Arc::new(Metrics::new());
        let port = format!("port: 80, targetPort: {}, appProtocol: http2", ep.port());
        let (table, _) = crate::proxy::routes::testing::table_of(&port, extra, &metrics);
        let conn = |peer| conn_of(table, &metrics, peer, &crate::env::Live, AppProtocol::Http2);
        let (client, _, _served) = served(conn, &drain).await;
        let (client, connection) = h2::client::handshake(client).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let streams: Vec<_> = (0..32)
            .map(|s| {
                let client = client.clone();
                tokio::spawn(async move {
                    for _ in (s..n).step_by(32) {
                        let mut c = client.clone().ready().await.unwrap();
                        let req = Request::get("http://web.default:80/")
                            .header("user-agent", "h2load nghttp2/1.52.0")
                            .body(())
                            .unwrap();
                        let (answer, _) = c.send_request(req, true).unwrap();
                        let answer = answer.await.unwrap();
                        assert_eq!(answer.status(), 200);
                        read(answer.into_body()).await.unwrap();
                    }
                })
            })
            .collect();
        for s in streams {
            s.await.unwrap();
        }
        metrics
    }

    /// The same over HTTP/1.1 (what `cargo xtask bench --instructions`
    /// counts second): one keep-alive client connection, one request at a
    /// time, through the proxy to an HTTP/1.1 endpoint.
    #[tokio::test]
    async fn a_fixed_http1_load_for_callgrind() {
        use http_body_util::{BodyExt, Empty, Full};
        use hyper_util::rt::TokioIo;
        let n = load_requests();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ep = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"backend=web\n"))))
                });
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc));
            }
        });
        let drain = Drain::new();
        let http1 = |peer| conn_on(ep.port(), ONE, peer, &crate::env::Live, AppProtocol::Http);
        let (client, _, _served) = served(http1, &drain).await;
        let (mut tx, connection) = hyper::client::conn::http1::handshake(TokioIo::new(client)).await.unwrap();
        tokio::spawn(connection);
        for i in 0..n {
            let req = Request::get("/")
                .header("host", "web.default")
                .header("user-agent", "wrk")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let answer = tx.send_request(req).await.unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(answer.status(), 200, "request {i}");
            assert_eq!(&answer.into_body().collect().await.unwrap().to_bytes()[..], b"backend=web\n");
        }
    }

    #[tokio::test]
    async fn streams_one_after_another_on_one_connection_are_each_answered() {
        let drain = Drain::new();
        let (client, _served) = proxy(web_endpoint().await, &drain).await;
        for i in 0..5 {
            let mut c = client.clone().ready().await.unwrap();
            let (answer, _) = c.send_request(get(), true).unwrap();
            let answer =
                tokio::time::timeout(WAIT, answer).await.unwrap().unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(read(answer.into_body()).await.unwrap(), b"backend=web\n", "request {i}");
        }
    }

    /// A request without a retry policy is not copied for its tries: one
    /// that met an endpoint refusing connections goes to the other one as
    /// it came (the pool gives it back unsent), every time.
    #[tokio::test]
    async fn a_request_an_endpoint_refused_goes_to_another_as_it_came() {
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let ep = endpoint(move |req, mut respond| {
            let seen = seen_tx.clone();
            async move {
                seen.send((req.uri().clone(), req.headers().clone())).unwrap();
                respond.send_response(Response::new(()), true).unwrap();
            }
        })
        .await;
        // 127.0.0.2 is loopback too, with nothing listening on the port;
        // draws of 0 pick it first, until its breaker ejects it.
        let env = Box::leak(Box::new(crate::env::Scripted::new(&[0.0])));
        let two = "   endpoints: [{ip: 127.0.0.2, node: a}, {ip: 127.0.0.1, node: a}]\n";
        let drain = Drain::new();
        let (client, conn, _served) =
            served(|peer| conn_on(ep.port(), two, peer, env, AppProtocol::Http2), &drain).await;
        let (tx, connection) = h2::client::handshake(client).await.unwrap();
        tokio::spawn(connection);
        for i in 0..8 {
            let mut c = tx.clone().ready().await.unwrap();
            let req = Request::get("http://web.default:80/x?y=1").header("x-probe", "p").body(()).unwrap();
            let (answer, _) = c.send_request(req, true).unwrap();
            let answer = tokio::time::timeout(WAIT, answer).await.unwrap().unwrap();
            assert_eq!(answer.status(), 200, "request {i}");
            let (uri, headers) = seen.recv().await.unwrap();
            assert_eq!(uri.to_string(), "http://web.default:80/x?y=1", "request {i}");
            assert_eq!(headers.get("x-probe").map(|v| v.as_bytes()), Some(&b"p"[..]), "request {i}");
            let names: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
            assert_eq!(names, ["x-probe"], "request {i}: nothing added on its way");
        }
        assert!(conn.counters.retries.get() >= 1, "some request met the refusing endpoint first");
    }

    #[tokio::test]
    async fn a_stream_the_client_resets_cancels_its_request_at_the_endpoint() {
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let ep = endpoint(move |_req, mut respond| {
            let seen = seen_tx.clone();
            async move {
                seen.send(None).unwrap();
                // Never answers: waits for the proxy to give the stream up.
                let reason = std::future::poll_fn(|cx| respond.poll_reset(cx)).await.ok();
                seen.send(reason).unwrap();
            }
        })
        .await;
        let drain = Drain::new();
        let (mut client, _served) = proxy(ep, &drain).await;
        let (_answer, mut stream) = client.send_request(get(), true).unwrap();
        assert_eq!(tokio::time::timeout(WAIT, seen.recv()).await.unwrap(), Some(None), "the request reached it");
        stream.send_reset(Reason::CANCEL);
        let reset = tokio::time::timeout(WAIT, seen.recv()).await.expect("the endpoint's stream is reset too");
        assert!(matches!(reset, Some(Some(_))), "{reset:?}");
    }

    #[tokio::test]
    async fn an_answer_the_endpoint_cuts_short_reaches_the_client_reset_never_whole() {
        let ep = endpoint(|_req, mut respond| async move {
            let mut send = respond.send_response(Response::new(()), false).unwrap();
            send.send_data(Bytes::from_static(b"part"), false).unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            send.send_reset(Reason::INTERNAL_ERROR);
        })
        .await;
        let drain = Drain::new();
        let (mut client, _served) = proxy(ep, &drain).await;
        let (answer, _) = client.send_request(get(), true).unwrap();
        let answer = tokio::time::timeout(WAIT, answer).await.unwrap().unwrap();
        assert_eq!(answer.status(), 200);
        let read = tokio::time::timeout(WAIT, read(answer.into_body())).await.unwrap();
        assert!(read.is_err(), "a body cut short must not end as if whole: {read:?}");
    }

    /// A request body past the proxy's windows goes whole to the endpoint;
    /// an answer past the client's (65535 bytes) comes back whole, with
    /// its trailers, as the client reads it.
    #[tokio::test]
    async fn bodies_past_the_windows_go_whole_both_ways_with_the_trailers() {
        const UP: usize = 3 << 20;
        const DOWN: usize = 5 << 20;
        let ep = endpoint(|req, mut respond| async move {
            let got = read(req.into_body()).await.unwrap();
            let mut send = respond.send_response(Response::new(()), false).unwrap();
            let data = Bytes::from(vec![7u8; DOWN]);
            for chunk in data.chunks(100_000) {
                send.reserve_capacity(chunk.len());
                send.send_data(data.slice_ref(chunk), false).unwrap();
            }
            let mut trailers = HeaderMap::new();
            trailers.insert("x-got", got.len().into());
            send.send_trailers(trailers).unwrap();
        })
        .await;
        let drain = Drain::new();
        let (mut client, _served) = proxy(ep, &drain).await;
        let (answer, mut up) =
            client.send_request(Request::post("http://web.default/x").body(()).unwrap(), false).unwrap();
        tokio::spawn(async move {
            let body = Bytes::from(vec![1u8; UP]);
            for chunk in body.chunks(64 << 10) {
                up.reserve_capacity(chunk.len());
                let _ = std::future::poll_fn(|cx| up.poll_capacity(cx)).await;
                up.send_data(body.slice_ref(chunk), false).unwrap();
            }
            up.send_data(Bytes::new(), true).unwrap();
        });
        let answer = tokio::time::timeout(WAIT, answer).await.unwrap().unwrap();
        let mut body = answer.into_body();
        let mut n = 0;
        while let Some(d) = tokio::time::timeout(WAIT, body.data()).await.unwrap() {
            let d = d.unwrap();
            let _ = body.flow_control().release_capacity(d.len());
            assert!(d.iter().all(|b| *b == 7));
            n += d.len();
        }
        assert_eq!(n, DOWN);
        let trailers = body.trailers().await.unwrap().expect("the endpoint's trailers");
        assert_eq!(trailers["x-got"], UP.to_string().as_str(), "the request body went whole");
    }

    /// An answer past the client's window (65535 bytes) that ends with a
    /// data frame comes whole: its last chunk goes to h2 without waiting
    /// for room, and h2 sends it as the client's window opens.
    #[tokio::test]
    async fn an_answer_ending_past_the_clients_window_comes_whole() {
        const DOWN: usize = 200_000;
        let ep = endpoint(|_req, mut respond| async move {
            let mut send = respond.send_response(Response::new(()), false).unwrap();
            send.reserve_capacity(DOWN);
            send.send_data(Bytes::from(vec![9u8; DOWN]), true).unwrap();
        })
        .await;
        let drain = Drain::new();
        let (mut client, _served) = proxy(ep, &drain).await;
        let (answer, _) = client.send_request(get(), true).unwrap();
        let answer = tokio::time::timeout(WAIT, answer).await.unwrap().unwrap();
        // Read late: the proxy holds what the client's window does not take.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let body = tokio::time::timeout(WAIT, read(answer.into_body())).await.unwrap().unwrap();
        assert_eq!(body.len(), DOWN);
        assert!(body.iter().all(|b| *b == 9));
    }

    /// A drain sends a GOAWAY: the stream open finishes whole, no new one
    /// is taken, and the connection ends once it is done.
    #[tokio::test]
    async fn a_drain_lets_the_open_stream_finish_then_ends_the_connection() {
        let go = Arc::new(tokio::sync::watch::channel(false).0);
        let go_tx = go.clone();
        let ep = endpoint(move |_req, mut respond| {
            let mut go = go_tx.subscribe();
            async move {
                let _ = go.wait_for(|g| *g).await;
                let mut send = respond.send_response(Response::new(()), false).unwrap();
                send.send_data(Bytes::from_static(b"whole"), true).unwrap();
            }
        })
        .await;
        let drain = Drain::new();
        let (mut client, served) = proxy(ep, &drain).await;
        let (answer, _) = client.send_request(get(), true).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drain.start();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!served.is_finished(), "a stream is still open");
        // Refused at once, never left waiting with the first.
        let another = async {
            match client.clone().ready().await {
                Ok(mut c) => match c.send_request(get(), true) {
                    Ok((r, _)) => r.await.err(),
                    Err(e) => Some(e),
                },
                Err(e) => Some(e),
            }
        };
        let refused = tokio::time::timeout(Duration::from_secs(2), another).await;
        assert!(matches!(refused, Ok(Some(_))), "no new stream after the GOAWAY");
        let _ = go.send(true);
        let answer = tokio::time::timeout(WAIT, answer).await.unwrap().unwrap();
        assert_eq!(read(answer.into_body()).await.unwrap(), b"whole");
        tokio::time::timeout(WAIT, served).await.expect("the connection ends once its streams are done").unwrap();
    }

    /// The size of what `f` returns.
    fn returned<A, R>(_: &impl FnOnce(A) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Each stream's future is made and moved into its box, and each
    /// future it awaits into its slot: copied whole every time. Connecting
    /// (TCP, the tunnel's TLS and CONNECT, the HTTP/2 handshake) happens
    /// once per connection, so it is boxed and the per-request futures do
    /// not carry it (they were 12 KiB, and `memmove` a tenth of an HTTP/2
    /// request's CPU). The bounds fail with either box taken out (the
    /// handshake alone adds 424 bytes to each).
    #[tokio::test]
    async fn a_request_future_carries_no_connect() {
        let conn = conn_to(80, "127.0.0.1:1".parse().unwrap());
        let stream =
            returned(&|(req, respond): (Request<RecvStream>, SendResponse<Bytes>)| super::stream(req, respond, &conn));
        let handle =
            returned(&|req: Request<crate::proxy::http::upstream::UpstreamBody>| super::super::handle(req, &conn));
        let upstreams = crate::proxy::http::upstream::Upstreams::default();
        let dial = crate::proxy::http::upstream::Dial::Direct("127.0.0.1:1".parse().unwrap());
        let ep = upstreams.endpoint(dial, true, None, WAIT);
        let request = returned(&|req: Request<crate::proxy::http::upstream::Body>| ep.send(req));
        assert!(request <= 1024, "an endpoint's request future is {request} bytes");
        assert!(handle <= 5120, "a request's future is {handle} bytes");
        assert!(stream <= 6144, "an HTTP/2 stream's future is {stream} bytes");
    }
}
