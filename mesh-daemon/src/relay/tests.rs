use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::test(start_paused = true)]
async fn a_watched_stream_is_idle_once_no_byte_moved_either_way_for_the_timeout() {
    let (io, mut peer) = tokio::io::duplex(64);
    let (mut w, activity) = Watched::new(io);
    // Shorter than two steps: a direction not counted would be idle.
    let idle = Duration::from_millis(150);
    let waiting = tokio::spawn(async move {
        activity.idle(idle).await;
        Instant::now()
    });
    // A byte every 100 ms for 1 s, sent and received in turn: never idle.
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if i % 2 == 0 {
            w.write_all(b"x").await.unwrap();
            peer.read_exact(&mut [0u8; 1]).await.unwrap();
        } else {
            peer.write_all(b"y").await.unwrap();
            w.read_exact(&mut [0u8; 1]).await.unwrap();
        }
    }
    let last = Instant::now();
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished(), "idle while bytes moved");
    // Then nothing: idle the timeout after the last byte, not before.
    let at = waiting.await.unwrap();
    assert!(at >= last + idle && at <= last + idle + Duration::from_millis(2), "idle after {:?}", at - last);
}

/// A connected pair on loopback: (the side the test holds, the side the relay holds).
async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    (a, b)
}

#[tokio::test]
async fn a_relay_that_moves_nothing_for_the_idle_timeout_ends_and_one_that_moves_goes_on() {
    let (mut client, mut client_side) = pair().await;
    let (mut upstream_side, mut server) = pair().await;
    let idle = Duration::from_millis(300);
    let t0 = tokio::time::Instant::now();
    let relay = tokio::spawn(async move { relay(&mut client_side, &mut upstream_side, idle).await });
    // A byte every 100 ms for a second keeps it open past the timeout.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        server.read_exact(&mut b).await.unwrap();
    }
    assert!(!relay.is_finished(), "cut while bytes still moved");
    // Then silence: it ends, and both ends see the close.
    let t = relay.await.unwrap();
    assert_eq!(t.error.map(|e| e.kind()), Some(io::ErrorKind::TimedOut));
    assert_eq!((t.up, t.down), (10, 0));
    assert!(t0.elapsed() >= Duration::from_millis(1300), "{:?}", t0.elapsed());
    let mut rest = Vec::new();
    assert_eq!(server.read_to_end(&mut rest).await.unwrap(), 0);
}

#[tokio::test]
async fn tcp_relay_moves_every_byte_both_ways_and_passes_half_close_on() {
    let (mut client, mut client_side) = pair().await;
    let (mut upstream_side, mut server) = pair().await;
    let relay =
        tokio::spawn(async move { relay(&mut client_side, &mut upstream_side, Duration::from_secs(3600)).await });
    // 3 MiB up while the server sends 5 MiB down, then the client
    // half-closes and still receives everything.
    let up: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
    let down: Vec<u8> = (0..5 << 20).map(|i| (i % 241) as u8).collect();
    let (up2, down2) = (up.clone(), down.clone());
    let server_task = tokio::spawn(async move {
        let (mut r, mut w) = server.split();
        let send = async {
            w.write_all(&down2).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let recv = async { r.read_to_end(&mut got).await.unwrap() };
        tokio::join!(send, recv);
        assert_eq!(got, up2, "the server got every byte the client sent, then EOF");
    });
    let (mut r, mut w) = client.split();
    let send = async {
        w.write_all(&up).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let recv = async { r.read_to_end(&mut got).await.unwrap() };
    tokio::join!(send, recv);
    assert_eq!(got, down);
    server_task.await.unwrap();
    let t = relay.await.unwrap();
    assert!(t.error.is_none(), "{:?}", t.error);
    assert_eq!((t.up, t.down), (3 << 20, 5 << 20));
}

#[tokio::test]
async fn a_slow_reader_gets_every_byte_through_both_modes() {
    let (mut client, mut client_side) = pair().await;
    let (mut upstream_side, mut server) = pair().await;
    let relay =
        tokio::spawn(async move { relay(&mut client_side, &mut upstream_side, Duration::from_secs(3600)).await });
    // Small writes first (copied), then bulk (spliced), all while the
    // server does not read, so the relay must hold and wait.
    let mut sent = Vec::new();
    for i in 0..200u32 {
        sent.extend_from_slice(&i.to_be_bytes());
    }
    sent.extend((0..6 << 20).map(|i| (i % 253) as u8));
    let data = sent.clone();
    let writer = tokio::spawn(async move {
        for chunk in data[..800].chunks(4) {
            client.write_all(chunk).await.unwrap();
        }
        client.write_all(&data[800..]).await.unwrap();
        client.shutdown().await.unwrap();
        client
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.unwrap();
    assert!(got == sent, "{} bytes received of {}", got.len(), sent.len());
    drop(server);
    drop(writer.await.unwrap());
    let t = relay.await.unwrap();
    assert_eq!(t.up, sent.len() as u64);
}

#[tokio::test]
async fn small_requests_and_answers_alternate_without_stalling() {
    let (mut client, mut client_side) = pair().await;
    let (mut upstream_side, mut server) = pair().await;
    let relay =
        tokio::spawn(async move { relay(&mut client_side, &mut upstream_side, Duration::from_secs(3600)).await });
    let echo = tokio::spawn(async move {
        let mut buf = [0u8; 100];
        for _ in 0..1000 {
            server.read_exact(&mut buf).await.unwrap();
            server.write_all(&buf).await.unwrap();
        }
    });
    let mut buf = [0u8; 100];
    for i in 0..1000u32 {
        let msg = [(i % 256) as u8; 100];
        client.write_all(&msg).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), client.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(buf, msg);
    }
    echo.await.unwrap();
    drop(client);
    let t = relay.await.unwrap();
    assert_eq!((t.up, t.down), (100_000, 100_000));
}

#[tokio::test]
async fn a_reset_ends_the_relay_with_the_bytes_counted_so_far() {
    let (mut client, mut client_side) = pair().await;
    let (mut upstream_side, server) = pair().await;
    let relay =
        tokio::spawn(async move { relay(&mut client_side, &mut upstream_side, Duration::from_secs(3600)).await });
    client.write_all(b"hello").await.unwrap();
    let mut server = server;
    let mut buf = [0u8; 5];
    server.read_exact(&mut buf).await.unwrap();
    // SO_LINGER 0: close sends RST.
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    nix::sys::socket::setsockopt(&server, nix::sys::socket::sockopt::Linger, &linger).unwrap();
    drop(server);
    let t = tokio::time::timeout(std::time::Duration::from_secs(5), relay).await.unwrap().unwrap();
    assert_eq!(t.up, 5);
    assert_eq!(t.error.map(|e| e.kind()), Some(io::ErrorKind::ConnectionReset));
}

/// A byte stream that is not TCP (like a tunnel stream): copied.
impl Side for tokio::io::DuplexStream {}

#[tokio::test]
async fn a_stream_that_is_not_tcp_is_copied_with_its_bytes_counted() {
    let (mut client, mut client_side) = pair().await;
    // 4 KiB at a time, like frames of a tunnel stream.
    let (mut upstream_side, mut server) = tokio::io::duplex(4096);
    let relay =
        tokio::spawn(async move { relay(&mut client_side, &mut upstream_side, Duration::from_secs(3600)).await });
    let up: Vec<u8> = (0..1 << 20).map(|i| (i % 239) as u8).collect();
    let up2 = up.clone();
    let writer = tokio::spawn(async move {
        client.write_all(&up2).await.unwrap();
        client.shutdown().await.unwrap();
        client
    });
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.unwrap();
    assert!(got == up, "{} bytes of {}", got.len(), up.len());
    server.write_all(&[1u8; 300_000]).await.unwrap();
    server.shutdown().await.unwrap();
    let mut client = writer.await.unwrap();
    let mut back = Vec::new();
    client.read_to_end(&mut back).await.unwrap();
    assert_eq!(back.len(), 300_000);
    let t = relay.await.unwrap();
    assert_eq!((t.up, t.down), (1 << 20, 300_000));
    assert!(t.error.is_none());
}
