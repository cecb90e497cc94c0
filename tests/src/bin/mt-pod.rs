//! Tools that run inside a pod of the mini cluster: an HTTP + echo server
//! for backends and a few clients. Plain std, one thread per connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

fn usage() -> ExitCode {
    eprintln!(
        "usage:\n  mt-pod serve --name NAME [--http PORT] [--echo PORT] [--delay-ms MS]\n  \
         mt-pod bulk ADDR BYTES [SECONDS]\n  mt-pod concurrent ADDR N\n  mt-pod tally ADDR N\n  \
         mt-pod load ADDR TOTAL CONCURRENCY PAUSE_MS\n  mt-pod stream ADDR SECONDS\n  \
         mt-pod hold ADDR N SECONDS\n  mt-pod late ADDR MS\n  mt-pod upgrade ADDR\n  \
         mt-pod h2idle ADDR PING_MS SECONDS"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("bulk") if args.len() == 3 => bulk(&args[1], &args[2], "0"),
        Some("bulk") if args.len() == 4 => bulk(&args[1], &args[2], &args[3]),
        Some("concurrent") if args.len() == 3 => concurrent(&args[1], &args[2]),
        Some("tally") if args.len() == 3 => tally(&args[1], &args[2]),
        Some("load") if args.len() == 5 => load(&args[1], &args[2], &args[3], &args[4]),
        Some("stream") if args.len() == 3 => stream(&args[1], &args[2]),
        Some("hold") if args.len() == 4 => hold(&args[1], &args[2], &args[3]),
        Some("late") if args.len() == 3 => late(&args[1], &args[2]),
        Some("upgrade") if args.len() == 2 => upgrade(&args[1]),
        Some("h2idle") if args.len() == 4 => h2idle(&args[1], &args[2], &args[3]),
        _ => usage(),
    }
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

static TERM: AtomicBool = AtomicBool::new(false);
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
}

/// Serves until SIGTERM, then shuts down gracefully as a real server does:
/// accepts what is queued, closes the listeners (new connects are
/// refused), finishes the connections it has, and exits.
fn serve(args: &[String]) -> ExitCode {
    let name = flag(args, "--name").unwrap_or("backend").to_owned();
    let delay = Duration::from_millis(flag(args, "--delay-ms").and_then(|d| d.parse().ok()).unwrap_or(0));
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
    }
    let mut listeners = Vec::new();
    for (port, kind) in
        [(flag(args, "--http"), "http"), (flag(args, "--echo"), "echo"), (flag(args, "--echo-now"), "echo-now")]
    {
        let Some(port) = port else { continue };
        // [::] takes both families (IPv4 as mapped addresses); 0.0.0.0
        // where the pod has no IPv6.
        let bound = TcpListener::bind(format!("[::]:{port}")).or_else(|_| TcpListener::bind(format!("0.0.0.0:{port}")));
        match bound.and_then(|l| l.set_nonblocking(true).map(|_| l)) {
            Ok(l) => listeners.push((l, kind)),
            Err(e) => {
                eprintln!("mt-pod: listen on {port}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if listeners.is_empty() {
        return usage();
    }
    eprintln!("mt-pod: {name} serving");
    let name: Arc<str> = name.into();
    let accept_all = |listeners: &[(TcpListener, &str)]| {
        let mut got = false;
        for (l, kind) in listeners {
            while let Ok((s, _)) = l.accept() {
                got = true;
                let _ = s.set_nonblocking(false);
                let (kind, name) = (kind.to_string(), name.clone());
                ACTIVE.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    match kind.as_str() {
                        "http" => http(s, &name, delay),
                        "echo" => echo_after_eof(s),
                        _ => echo_now(s),
                    }
                    ACTIVE.fetch_sub(1, Ordering::SeqCst);
                });
            }
        }
        got
    };
    while !TERM.load(Ordering::SeqCst) {
        if !accept_all(&listeners) {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    accept_all(&listeners);
    drop(listeners);
    while ACTIVE.load(Ordering::SeqCst) > 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    eprintln!("mt-pod: {name} stopped");
    ExitCode::SUCCESS
}

/// HTTP/1.1 with keep-alive; every GET is answered with
/// `backend=NAME peer=IP:PORT` so a client sees who answered and from where
/// the connection came.
fn http(s: TcpStream, name: &str, delay: Duration) {
    // An IPv4 client seen through the dual-stack socket, as IPv4.
    let peer = s.peer_addr().map(|p| SocketAddr::new(p.ip().to_canonical(), p.port()).to_string()).unwrap_or_default();
    let _ = s.set_nodelay(true);
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(s);
    loop {
        let mut close = false;
        let mut line = String::new();
        let mut first = true;
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if first {
                first = false;
                close = line.ends_with("HTTP/1.0\r\n");
            }
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
        }
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let body = format!("backend={name} peer={peer}\n");
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if w.write_all(head.as_bytes()).and_then(|_| w.write_all(body.as_bytes())).is_err() || close {
            return;
        }
    }
}

/// Reads until the client shuts down its write side, then sends everything
/// back and closes: a client only gets its bytes if half-close works.
fn echo_after_eof(mut s: TcpStream) {
    let mut buf = Vec::new();
    if s.read_to_end(&mut buf).is_ok() {
        let _ = s.write_all(&buf);
    }
    let _ = s.shutdown(Shutdown::Write);
}

/// Sends back whatever arrives, as it arrives.
fn echo_now(mut s: TcpStream) {
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let _ = std::io::copy(&mut s, &mut w);
}

/// Deterministic, incompressible-looking bytes.
fn pattern(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// Sends BYTES to an echo server (spread over SECONDS, when given),
/// shuts down the write side, reads the echo to EOF, and prints both
/// sizes and checksums.
fn bulk(addr: &str, bytes: &str, seconds: &str) -> ExitCode {
    let (Ok(addr), Ok(n), Ok(secs)) = (addr.parse::<SocketAddr>(), bytes.parse::<usize>(), seconds.parse::<f64>())
    else {
        return usage();
    };
    const CHUNK: usize = 64 * 1024;
    let pause = Duration::from_secs_f64(secs / n.div_ceil(CHUNK).max(1) as f64);
    let data = pattern(n);
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            println!("error: connect {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(e) => {
            println!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let sent_sum = fnv1a(&data);
    let writer = std::thread::spawn(move || {
        let r = data.chunks(CHUNK).try_for_each(|c| {
            std::thread::sleep(pause);
            w.write_all(c)
        });
        let _ = w.shutdown(Shutdown::Write);
        r
    });
    let mut got = Vec::with_capacity(n);
    let read = s.read_to_end(&mut got);
    let wrote = writer.join().unwrap_or_else(|_| Err(std::io::Error::other("writer panicked")));
    println!("sent={n} sent_sum={sent_sum:016x} recv={} recv_sum={:016x}", got.len(), fnv1a(&got));
    match (wrote, read) {
        (Ok(()), Ok(_)) => ExitCode::SUCCESS,
        (w, r) => {
            println!("error: write {w:?} read {r:?}");
            ExitCode::FAILURE
        }
    }
}

/// Opens N connections, waits until all are open, then sends one HTTP
/// request on each; prints `ok=K failed=F` and exits 0 only if all passed.
fn concurrent(addr: &str, n: &str) -> ExitCode {
    let (Ok(addr), Ok(n)) = (addr.parse::<SocketAddr>(), n.parse::<usize>()) else {
        return usage();
    };
    let barrier = Arc::new(Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || -> Result<String, String> {
                let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10));
                barrier.wait();
                let mut s = s.map_err(|e| format!("connect: {e}"))?;
                s.set_read_timeout(Some(Duration::from_secs(20))).map_err(|e| e.to_string())?;
                s.write_all(b"GET / HTTP/1.1\r\nHost: mesh\r\nConnection: close\r\n\r\n")
                    .map_err(|e| format!("write: {e}"))?;
                let mut out = String::new();
                s.read_to_string(&mut out).map_err(|e| format!("read: {e}"))?;
                if out.starts_with("HTTP/1.1 200 OK") {
                    Ok(out.lines().last().unwrap_or_default().to_owned())
                } else {
                    Err(format!("bad response {out:?}"))
                }
            })
        })
        .collect();
    let mut ok = 0;
    let mut errors = Vec::new();
    for t in threads {
        match t.join() {
            Ok(Ok(_)) => ok += 1,
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("thread panicked".into()),
        }
    }
    println!("ok={ok} failed={}", errors.len());
    for e in errors.iter().take(5) {
        println!("error: {e}");
    }
    if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// One HTTP GET on a new connection: (backend name, the address
/// getpeername gave, the peer the backend saw).
fn one_request(addr: SocketAddr) -> Result<(String, SocketAddr, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
    let peer = s.peer_addr().map_err(|e| format!("getpeername: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: mesh\r\nConnection: close\r\n\r\n").map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| format!("read: {e}"))?;
    let body = out.lines().last().unwrap_or_default();
    let field = |k: &str| body.split_whitespace().find_map(|kv| kv.strip_prefix(k)).unwrap_or_default().to_owned();
    Ok((field("backend="), peer, field("peer=")))
}

/// N requests, each on a new connection, four at a time. Prints
/// `NAME=COUNT` per backend, then `failed=F peer_is_dialled=P direct=D`:
/// P counts connections whose getpeername was ADDR itself, D those whose
/// backend saw this pod's own address (no proxy in between).
fn tally(addr: &str, n: &str) -> ExitCode {
    let (Ok(addr), Ok(n)) = (addr.parse::<SocketAddr>(), n.parse::<usize>()) else {
        return usage();
    };
    let workers = 4;
    let results: Vec<Result<(String, SocketAddr, String), String>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..workers)
            .map(|w| sc.spawn(move || (w..n).step_by(workers).map(|_| one_request(addr)).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });
    let mut counts = std::collections::BTreeMap::new();
    let (mut failed, mut dialled, mut direct) = (0, 0, 0);
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok((backend, peer, seen)) => {
                *counts.entry(backend).or_insert(0) += 1;
                dialled += usize::from(peer == addr);
                let seen = seen.parse::<SocketAddr>().ok().map(|s| s.ip());
                direct += usize::from(seen.is_some() && seen == local_ip(addr));
            }
            Err(e) => {
                failed += 1;
                errors.push(e);
            }
        }
    }
    for (b, c) in &counts {
        println!("{b}={c}");
    }
    println!("failed={failed} peer_is_dialled={dialled} direct={direct}");
    for e in errors.iter().take(3) {
        println!("error: {e}");
    }
    ExitCode::SUCCESS
}

/// This pod's address toward `addr` (the source the kernel picks).
fn local_ip(addr: SocketAddr) -> Option<std::net::IpAddr> {
    let u = std::net::UdpSocket::bind(if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }).ok()?;
    u.connect(addr).ok()?;
    Some(u.local_addr().ok()?.ip())
}

/// TOTAL requests, each on a new connection, from CONCURRENCY clients that
/// pause PAUSE_MS between requests. Prints `start=<unix ms>`, then one line
/// per request, `<ms since start> <backend>` or `<ms> FAIL <error>`, then
/// `ok=K failed=F`.
fn load(addr: &str, total: &str, conc: &str, pause: &str) -> ExitCode {
    let (Ok(addr), Ok(total), Ok(conc), Ok(pause)) =
        (addr.parse::<SocketAddr>(), total.parse::<usize>(), conc.parse::<usize>(), pause.parse::<u64>())
    else {
        return usage();
    };
    let start = std::time::SystemTime::now();
    let t0 = std::time::Instant::now();
    let since_epoch = start.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let lines: Vec<String> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..conc)
            .map(|c| {
                sc.spawn(move || {
                    let mut out = Vec::new();
                    for _ in (c..total).step_by(conc) {
                        let r = one_request(addr);
                        let at = t0.elapsed().as_millis();
                        out.push(match r {
                            Ok((backend, _, _)) if !backend.is_empty() => format!("{at} {backend}"),
                            Ok(_) => format!("{at} FAIL empty response"),
                            Err(e) => format!("{at} FAIL {e}"),
                        });
                        std::thread::sleep(Duration::from_millis(pause));
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });
    println!("start={since_epoch}");
    let failed = lines.iter().filter(|l| l.contains(" FAIL ")).count();
    for l in &lines {
        println!("{l}");
    }
    println!("ok={} failed={failed}", lines.len() - failed);
    ExitCode::SUCCESS
}

/// Keeps one connection to an echo-now server for SECONDS, sending 1 KiB
/// every 100 ms and checking each comes back; prints `rounds=N` and exits
/// 0 only if every round trip was intact.
fn stream(addr: &str, seconds: &str) -> ExitCode {
    let (Ok(addr), Ok(secs)) = (addr.parse::<SocketAddr>(), seconds.parse::<u64>()) else {
        return usage();
    };
    let mut s = match connect(addr) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    let mut rounds = 0u64;
    while std::time::Instant::now() < end {
        let chunk: Vec<u8> = pattern(1024 + rounds as usize).split_off(rounds as usize);
        let mut back = vec![0u8; chunk.len()];
        if let Err(e) = s.write_all(&chunk).and_then(|_| s.read_exact(&mut back)) {
            println!("rounds={rounds}\nerror: round {rounds}: {e}");
            return ExitCode::FAILURE;
        }
        if back != chunk {
            println!("rounds={rounds}\nerror: round {rounds}: bytes changed");
            return ExitCode::FAILURE;
        }
        rounds += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("rounds={rounds}");
    ExitCode::SUCCESS
}

/// Opens N connections and keeps them open, idle, for SECONDS; prints
/// `held=N` once all are open.
fn hold(addr: &str, n: &str, seconds: &str) -> ExitCode {
    let (Ok(addr), Ok(n), Ok(secs)) = (addr.parse::<SocketAddr>(), n.parse::<usize>(), seconds.parse::<u64>()) else {
        return usage();
    };
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        // Paced, so the backend's accept queue is not flooded.
        std::thread::sleep(Duration::from_millis(1));
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => held.push(s),
            Err(e) => {
                println!("error: connection {i}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("held={}", held.len());
    let _ = std::io::stdout().flush();
    std::thread::sleep(Duration::from_secs(secs));
    ExitCode::SUCCESS
}

/// An HTTP/2 client (prior knowledge) that makes no request: sends the
/// preface and SETTINGS, then a PING every PING_MS (0: nothing more), for
/// at most SECONDS; it answers the server's PINGs, as every HTTP/2 client
/// does. Prints `closed_after_ms=N goaway=yes|no` when the
/// server closed the connection first, else `open_after_ms=N`.
fn h2idle(addr: &str, ping_ms: &str, seconds: &str) -> ExitCode {
    let (Ok(addr), Ok(ping_ms), Ok(secs)) =
        (addr.parse::<SocketAddr>(), ping_ms.parse::<u64>(), seconds.parse::<u64>())
    else {
        return usage();
    };
    let mut s = match connect(addr) {
        Ok(s) => s,
        Err(code) => return code,
    };
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
    const PING: [u8; 17] = [0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    if let Err(e) = s.write_all(PREFACE).and_then(|_| s.write_all(&SETTINGS)) {
        println!("error: {e}");
        return ExitCode::FAILURE;
    }
    let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
    let start = std::time::Instant::now();
    let mut next_ping = Duration::from_millis(ping_ms);
    // Frames as they come: a 9-byte header (24-bit length, type, ...).
    let (mut got, mut goaway) = (Vec::new(), false);
    let mut buf = [0u8; 4096];
    let closed = loop {
        let now = start.elapsed();
        if now >= Duration::from_secs(secs) {
            break false;
        }
        if ping_ms > 0 && now >= next_ping {
            if s.write_all(&PING).is_err() {
                break true;
            }
            next_ping += Duration::from_millis(ping_ms);
        }
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break true,
        }
        while got.len() >= 9 {
            let len = usize::from(got[0]) << 16 | usize::from(got[1]) << 8 | usize::from(got[2]);
            if got.len() < 9 + len {
                break;
            }
            goaway |= got[3] == 7;
            if got[3] == 6 && got[4] & 1 == 0 && len == 8 {
                let mut ack = got[..17].to_vec();
                ack[4] = 1;
                let _ = s.write_all(&ack);
            }
            got.drain(..9 + len);
        }
    };
    let ms = start.elapsed().as_millis();
    if closed {
        println!("closed_after_ms={ms} goaway={}", if goaway { "yes" } else { "no" });
    } else {
        println!("open_after_ms={ms}");
    }
    ExitCode::SUCCESS
}

/// Connects, stays silent for MS (as a client of a server-speaks-first
/// protocol would), then sends an HTTP/1.0 GET and prints the answer.
fn late(addr: &str, ms: &str) -> ExitCode {
    let (Ok(addr), Ok(ms)) = (addr.parse::<SocketAddr>(), ms.parse::<u64>()) else {
        return usage();
    };
    let mut s = match connect(addr) {
        Ok(s) => s,
        Err(code) => return code,
    };
    std::thread::sleep(Duration::from_millis(ms));
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut answer = String::new();
    match s.write_all(b"GET / HTTP/1.0\r\n\r\n").and_then(|_| s.read_to_string(&mut answer)) {
        Ok(_) => {
            print!("{answer}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Asks to upgrade an HTTP/1.1 connection to `echo`, then checks that
/// bytes come back on it; prints `upgraded echo=...`.
fn upgrade(addr: &str) -> ExitCode {
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        return usage();
    };
    let run = || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /chat HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte)? == 0 {
                break;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        if !head.starts_with("HTTP/1.1 101") {
            return Ok(format!("refused: {}", head.lines().next().unwrap_or("")));
        }
        s.write_all(b"ping-mesh")?;
        let mut back = [0u8; 9];
        s.read_exact(&mut back)?;
        Ok(format!("upgraded echo={}", String::from_utf8_lossy(&back)))
    };
    match run() {
        Ok(line) => {
            println!("{line}");
            if line.starts_with("upgraded") {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            println!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A connection to `addr` within 5 s, or the exit code after saying why.
fn connect(addr: SocketAddr) -> Result<TcpStream, ExitCode> {
    TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| {
        println!("error: connect: {e}");
        ExitCode::FAILURE
    })
}
