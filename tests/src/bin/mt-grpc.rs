//! A real gRPC server and client (tonic, prost messages written by hand,
//! so no protoc is needed): service `mesh.test.Echo` with a unary `Say`
//! and a server-streaming `Count`.
//!
//! usage: mt-grpc serve --name NAME --port PORT [--unavailable] [--delay-ms MS]
//!        (`--unavailable`: `Say` fails with UNAVAILABLE; `--delay-ms`: it
//!        answers that late)
//!        mt-grpc call URL N [--header K=V]...
//!                              (N unary calls on one channel, with the
//!                               headers as metadata, then one stream of
//!                               5; prints who answered; a server says
//!                               back an `x-header-set`/`-add` it got)

use std::convert::Infallible;
use std::pin::Pin;
use std::process::ExitCode;
use std::task::{Context, Poll};

use http::uri::PathAndQuery;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service};
use tonic::server::{Grpc, NamedService, ServerStreamingService, UnaryService};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    #[prost(string, tag = "1")]
    pub name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Reply {
    #[prost(string, tag = "1")]
    pub backend: String,
    #[prost(uint32, tag = "2")]
    pub seq: u32,
}

#[derive(Clone)]
struct Echo {
    name: String,
    unavailable: bool,
    delay: std::time::Duration,
}

impl NamedService for Echo {
    const NAME: &'static str = "mesh.test.Echo";
}

struct Say(Echo);

impl UnaryService<Hello> for Say {
    type Response = Reply;
    type Future = BoxFuture<Response<Reply>, Status>;
    fn call(&mut self, req: Request<Hello>) -> Self::Future {
        let mut echo = self.0.clone();
        // The metadata a route's filter set is said back after the name.
        for h in ["x-header-set", "x-header-add"] {
            if let Some(v) = req.metadata().get(h).and_then(|v| v.to_str().ok()) {
                echo.name = format!("{} {h}={v}", echo.name);
            }
        }
        Box::pin(async move {
            tokio::time::sleep(echo.delay).await;
            if echo.unavailable {
                return Err(Status::unavailable(format!("{} is unavailable", echo.name)));
            }
            Ok(Response::new(Reply { backend: echo.name, seq: 0 }))
        })
    }
}

type Replies = Pin<Box<dyn futures_core::Stream<Item = Result<Reply, Status>> + Send>>;

struct Count(String);

impl ServerStreamingService<Hello> for Count {
    type Response = Reply;
    type ResponseStream = Replies;
    type Future = BoxFuture<Response<Replies>, Status>;
    fn call(&mut self, _: Request<Hello>) -> Self::Future {
        let backend = self.0.clone();
        Box::pin(async move {
            let items: Vec<Result<Reply, Status>> =
                (1..=5).map(|seq| Ok(Reply { backend: backend.clone(), seq })).collect();
            let s: Replies = Box::pin(tokio_stream_iter(items));
            Ok(Response::new(s))
        })
    }
}

/// A stream of ready items (no extra crate for it).
fn tokio_stream_iter<T: Send + Unpin + 'static>(items: Vec<T>) -> impl futures_core::Stream<Item = T> + Send {
    struct Iter<T>(std::vec::IntoIter<T>);
    impl<T: Unpin> futures_core::Stream for Iter<T> {
        type Item = T;
        fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<T>> {
            Poll::Ready(self.get_mut().0.next())
        }
    }
    Iter(items.into_iter())
}

impl Service<http::Request<Body>> for Echo {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let (name, echo) = (self.name.clone(), self.clone());
        match req.uri().path() {
            "/mesh.test.Echo/Say" => Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::<Reply, Hello>::default());
                Ok(grpc.unary(Say(echo), req).await)
            }),
            "/mesh.test.Echo/Count" => Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::<Reply, Hello>::default());
                Ok(grpc.server_streaming(Count(name), req).await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

/// Serves HTTP/2 (prior knowledge) with hyper, each request handed to the
/// tonic service.
async fn serve(echo: Echo, port: u16) -> Result<(), String> {
    // [::] takes both families; 0.0.0.0 where the pod has no IPv6.
    let l = match tokio::net::TcpListener::bind(("::", port)).await {
        Ok(l) => l,
        Err(_) => tokio::net::TcpListener::bind(("0.0.0.0", port)).await.map_err(|e| e.to_string())?,
    };
    eprintln!("mt-grpc: {} serving on {port}", echo.name);
    loop {
        let (s, _) = l.accept().await.map_err(|e| e.to_string())?;
        let echo = echo.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let mut echo = echo.clone();
                async move { echo.call(req.map(Body::new)).await }
            });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                .await;
        });
    }
}

async fn call(url: &str, n: u32, headers: &[(String, String)]) -> Result<(), String> {
    let ch = tonic::transport::Channel::from_shared(url.to_owned())
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut grpc = tonic::client::Grpc::new(ch);
    let mut failed = 0;
    for _ in 0..n {
        grpc.ready().await.map_err(|e| e.to_string())?;
        let mut req = Request::new(Hello { name: "client".into() });
        for (k, v) in headers {
            let k = tonic::metadata::MetadataKey::from_bytes(k.as_bytes()).map_err(|e| e.to_string())?;
            req.metadata_mut().insert(k, v.parse().map_err(|_| format!("{v:?} is not a metadata value"))?);
        }
        let r = grpc
            .unary(req, PathAndQuery::from_static("/mesh.test.Echo/Say"), ProstCodec::<Hello, Reply>::default())
            .await;
        match r {
            Ok(r) => println!("unary backend={}", r.into_inner().backend),
            Err(s) => {
                failed += 1;
                println!("unary status={:?} message={}", s.code(), s.message());
            }
        }
    }
    grpc.ready().await.map_err(|e| e.to_string())?;
    let mut stream = grpc
        .server_streaming(
            Request::new(Hello { name: "client".into() }),
            PathAndQuery::from_static("/mesh.test.Echo/Count"),
            ProstCodec::<Hello, Reply>::default(),
        )
        .await
        .map_err(|s| format!("stream: {:?} {}", s.code(), s.message()))?
        .into_inner();
    let mut seqs = Vec::new();
    let mut from = String::new();
    while let Some(r) = stream.message().await.map_err(|s| format!("stream: {:?} {}", s.code(), s.message()))? {
        seqs.push(r.seq.to_string());
        from = r.backend;
    }
    println!("stream backend={from} seqs={}", seqs.join(","));
    println!("failed={failed}");
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mt-grpc: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = match args.first().map(String::as_str) {
        Some("serve") => match (flag(&args, "--name"), flag(&args, "--port").and_then(|p| p.parse().ok())) {
            (Some(name), Some(port)) => {
                let delay = flag(&args, "--delay-ms").and_then(|d| d.parse().ok()).unwrap_or(0);
                let echo = Echo {
                    name: name.to_owned(),
                    unavailable: args.iter().any(|a| a == "--unavailable"),
                    delay: std::time::Duration::from_millis(delay),
                };
                rt.block_on(serve(echo, port))
            }
            _ => Err("usage: mt-grpc serve --name NAME --port PORT".into()),
        },
        Some("call") if args.len() >= 3 => {
            let headers: Vec<(String, String)> = args[3..]
                .chunks(2)
                .filter(|c| c[0] == "--header" && c.len() == 2)
                .filter_map(|c| c[1].split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
                .collect();
            match args[2].parse() {
                Ok(n) if headers.len() * 2 == args.len() - 3 => rt.block_on(call(&args[1], n, &headers)),
                _ => Err("usage: mt-grpc call URL N [--header K=V]...".into()),
            }
        }
        _ => Err("usage: mt-grpc serve --name NAME --port PORT | mt-grpc call URL N".into()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mt-grpc: {e}");
            ExitCode::FAILURE
        }
    }
}
