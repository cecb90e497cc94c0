//! Entry points of the fuzz targets (`fuzz/`, `cargo xtask fuzz`): each
//! takes arbitrary bytes and must neither panic nor hang, and checks an
//! invariant of what it drove. Not part of the daemon's interface.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::control::Control;
use crate::identity::Identity;
use crate::model::{self, State};
use crate::telemetry::Metrics;
use crate::tunnel::server::{PeerLimits, PerPeer, Refusal, StreamHandler, StreamRequest};
use crate::tunnel::TunnelCounters;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime"))
}

fn metrics() -> Arc<Metrics> {
    static M: OnceLock<Arc<Metrics>> = OnceLock::new();
    M.get_or_init(|| Arc::new(Metrics::new())).clone()
}

/// The state document parser and validator: a document that parses
/// validates the same after a JSON round trip (what the daemon saves is
/// what it reads back).
pub fn state_document(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(doc) = model::parse_document(text) else { return };
    let first = State::from_document(&doc);
    let json = serde_json::to_string(&doc).expect("a parsed document serializes");
    let again = model::parse_document(&json).expect("a serialized document parses");
    let second = State::from_document(&again);
    match (&first, &second) {
        (Ok(_), Ok(_)) => {}
        (Err(a), Err(b)) => assert_eq!(a.0.len(), b.0.len(), "errors differ after a round trip: {a:?} / {b:?}"),
        _ => panic!("validation differs after a JSON round trip: {:?} / {:?}", first.err(), second.err()),
    }
}

/// Requests the fuzzer's first byte picks from (method, path); the rest
/// of the input is the body.
const REQUESTS: [(&str, &str); 14] = [
    ("PUT", "/v1/state"),
    ("PUT", "/v1/services/default/web"),
    ("PUT", "/v1/services/default/new"),
    ("PUT", "/v1/nodes/c"),
    ("PUT", "/v1/workloads/default/client"),
    ("PATCH", "/v1/services/default/web/endpoints/10.244.1.4"),
    ("PATCH", "/v1/services/default/fast/endpoints/10.244.1.5"),
    ("DELETE", "/v1/services/default/web"),
    ("DELETE", "/v1/nodes/b"),
    ("DELETE", "/v1/workloads/default/client"),
    ("GET", "/v1/state"),
    ("GET", "/v1/services/default/web"),
    ("GET", "/v1/endpoints"),
    ("GET", "/v1/status"),
];

static DIR: OnceLock<PathBuf> = OnceLock::new();

/// Removes what [`api_request`] wrote (its state dir).
pub fn cleanup() {
    if let Some(d) = DIR.get() {
        let _ = std::fs::remove_dir_all(d);
    }
}

fn detached_control() -> Control {
    let dir = DIR.get_or_init(|| {
        // tmpfs where there is one: every write is fsynced.
        let base = ["/dev/shm", "/tmp"].iter().map(PathBuf::from).find(|d| d.is_dir()).expect("a temp dir");
        base.join(format!("mesh-fuzz-api-{}", std::process::id()))
    });
    crate::control::testing::detached(dir, metrics(), None)
}

/// The control API's request handling: up to four requests (split at
/// 0xff bytes) against a daemon without a kernel datapath. Whatever they
/// are, the state the daemon then holds validates whole, as a restart
/// would check it: incremental validation lets nothing through that
/// whole validation refuses.
pub fn api_request(data: &[u8]) {
    let control = Arc::new(detached_control());
    for part in data.split(|b| *b == 0xff).take(4) {
        let Some((&pick, rest)) = part.split_first() else { continue };
        let request = if pick >= 0xf0 {
            // Raw bytes: the HTTP parser and the router see anything.
            rest.to_vec()
        } else {
            let (method, path) = REQUESTS[usize::from(pick) % REQUESTS.len()];
            let mut r = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n", rest.len());
            if pick & 0x40 != 0 {
                r.push_str("If-Match: 1\r\n");
            }
            r.push_str("Connection: close\r\n\r\n");
            let mut r = r.into_bytes();
            r.extend_from_slice(rest);
            r
        };
        let c = control.clone();
        runtime().block_on(async move {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let served = tokio::spawn(crate::control::api::serve_connection(server, c, Ok(()), Duration::from_secs(2)));
            let _ = client.write_all(&request).await;
            let _ = client.shutdown().await;
            let mut answer = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answer)).await;
            assert!(read.is_ok(), "the API did not answer within 5 s");
            let _ = served.await;
        });
        let snap = control.snapshot();
        if let Err(e) = State::from_document(&snap.state) {
            panic!("the API accepted a state that does not validate (generation {}): {e:?}", snap.generation);
        }
    }
}

/// A stream handler that refuses port 0 and carries nothing.
struct Refuser;

impl StreamHandler for Refuser {
    type Upstream = ();
    async fn open(&self, req: &StreamRequest) -> Result<(), Refusal> {
        match req.target.port() {
            0 => Err(Refusal::Denied("policy")),
            _ => Ok(()),
        }
    }
    async fn carry(&self, _req: StreamRequest, _upstream: (), _stream: crate::tunnel::client::Stream) {}
}

/// The tunnel's CONNECT handling: bytes after the HTTP/2 preface, as a
/// verified peer would send them after the TLS handshake.
pub fn tunnel_connect(data: &[u8]) {
    static COUNTERS: OnceLock<Arc<TunnelCounters>> = OnceLock::new();
    let counters = COUNTERS.get_or_init(|| Arc::new(TunnelCounters::new(&metrics()))).clone();
    let peer = Arc::new(Identity::parse("spiffe://cluster.local/ns/default/sa/client").expect("an identity"));
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend_from_slice(data);
    runtime().block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let per_peer = PerPeer::new(PeerLimits { connections: 4, streams: 8 });
        let drain = crate::drain::Drain::new();
        let from = "172.18.0.3:40000".parse().expect("an address");
        let served = tokio::spawn(crate::tunnel::server::serve_streams(
            server,
            from,
            peer,
            Arc::new(Refuser),
            counters,
            per_peer,
            drain,
        ));
        let _ = client.write_all(&bytes).await;
        let _ = client.shutdown().await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answer)).await;
        drop(client);
        let ended = tokio::time::timeout(Duration::from_secs(5), served).await;
        assert!(ended.is_ok(), "the tunnel connection did not end within 5 s of its peer's close");
    });
}

/// Reads native-endian integers off the front of the input.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u32(&mut self) -> u32 {
        u32::from_ne_bytes(self.take())
    }
    fn u16(&mut self) -> u16 {
        u16::from_ne_bytes(self.take())
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn ip(&mut self) -> mesh_common::Ip {
        mesh_common::Ip { be: [self.u32(), self.u32(), self.u32(), self.u32()] }
    }
}

/// The decoding of what the kernel maps hold (a `SERVICES` entry and its
/// slots, as another build or a damaged map may have written them): the
/// dump reads at most the slots a table can have.
pub fn kernel_structs(data: &[u8]) {
    use mesh_common::{ServiceKey, ServiceValue, SlotKey, SockAddr};
    let mut c = Cursor(data);
    let k = ServiceKey { vip: c.ip(), port_be: c.u16(), proto: c.u8(), _pad: c.u8() };
    let v = ServiceValue {
        id: c.u32(),
        mode: c.u8(),
        generation: c.u8(),
        _pad: c.u16(),
        slot_count: c.u32(),
        _pad2: c.u32(),
    };
    let slots: Vec<SockAddr> =
        c.0.chunks(20)
            .map(|b| {
                let mut c = Cursor(b);
                SockAddr { ip: c.ip(), port_be: c.u16(), _pad: 0 }
            })
            .collect();
    let mut reads = 0u32;
    let dump = crate::datapath::decode_service(&k, &v, |key: SlotKey| {
        reads += 1;
        assert_eq!((key.service_id, key.generation), (v.id, u32::from(v.generation)));
        slots.get(key.slot as usize).copied()
    });
    assert!(reads <= mesh_common::limits::MAX_SLOTS_PER_SERVICE, "read {reads} slots");
    assert_eq!(dump.slots.len() as u32, reads);
}

/// A handover message as a peer daemon (of any build) may send it.
pub fn handover_message(data: &[u8]) {
    if let Ok(m) = crate::handover::Message::parse(data) {
        let again = serde_json::to_vec(&m).expect("a message serializes");
        assert_eq!(crate::handover::Message::parse(&again).expect("a serialized message parses"), m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by `kernel_structs`: a kernel-mode entry claiming 32125 slots
    /// (a damaged map or another build's) was read slot by slot, up to 4
    /// billion times for the largest count.
    #[test]
    fn regression_a_claimed_slot_count_past_the_limit_is_read_up_to_the_limit() {
        let crash = [
            0x02, 0x02, 0x8c, 0x02, 0x02, 0x0a, 0x02, 0x02, 0x02, 0x02, 0x02, 0x20, 0x02, 0x02, 0x8c, 0x7d, 0x7d, 0x7d,
        ];
        kernel_structs(&crash);
        let mut v = [0u8; 24];
        v[12] = mesh_common::MODE_KERNEL;
        v[16..20].copy_from_slice(&u32::MAX.to_ne_bytes());
        kernel_structs(&v);
    }

    #[test]
    fn each_target_runs_on_a_plain_input() {
        state_document(crate::control::testing::SEED.as_bytes());
        api_request(b"\x00nodes: []");
        api_request(b"\x05{\"weight\": 0}\xff\x0b");
        tunnel_connect(b"");
        kernel_structs(&[0u8; 64]);
        handover_message(br#"{"ready":null}"#);
        cleanup();
    }
}
