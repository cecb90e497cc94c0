//! The header limit a client is told over HTTP/2.
//!
//! The request path answers 431 itself past `--max-request-headers` (and
//! counts and logs it), so h2 is set to decode header blocks up to four
//! times the limit: set to the limit, h2 would answer those 431s out of our
//! sight, and close the connection with a GOAWAY for a block split over
//! more CONTINUATION frames than its flood guard allows (about 1.25x the
//! limit over 16 KiB frames). But a client must be told the real limit, so
//! that a conforming one (Go's, for one) does not send what will be
//! refused: [`Advertise`] rewrites SETTINGS_MAX_HEADER_LIST_SIZE in the
//! server's first frame, its SETTINGS, as it is written. Nothing else is
//! touched; h2 still applies its own value when the client acknowledges.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// RFC 9113 §6.5: the frame type and the setting's identifier.
const SETTINGS: u8 = 0x4;
const MAX_HEADER_LIST_SIZE: u16 = 0x6;
const FRAME_HEADER: usize = 9;

/// An HTTP/2 server connection's IO whose first frame written, if it is a
/// SETTINGS frame carrying SETTINGS_MAX_HEADER_LIST_SIZE, says `limit`.
pub struct Advertise<T> {
    io: T,
    first: First,
}

enum First {
    /// Nothing written yet.
    Ahead(u32),
    /// The rewritten first frame and how much of it is written.
    Writing {
        frame: Vec<u8>,
        written: usize,
    },
    Done,
}

impl<T> Advertise<T> {
    pub fn new(io: T, limit: u32) -> Self {
        Self { io, first: First::Ahead(limit) }
    }
}

/// `frame` (the first bytes written, a whole frame) with the header-list
/// setting's value replaced by `limit`; `None` if it is no SETTINGS frame
/// or carries no such setting.
fn rewritten(bytes: &[u8], limit: u32) -> Option<Vec<u8>> {
    let head = bytes.get(..FRAME_HEADER)?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    if head[3] != SETTINGS || head[4] & 0x1 != 0 || !len.is_multiple_of(6) {
        return None;
    }
    let mut frame = bytes.get(..FRAME_HEADER + len)?.to_vec();
    let mut found = false;
    for entry in frame[FRAME_HEADER..].chunks_exact_mut(6) {
        if u16::from_be_bytes([entry[0], entry[1]]) == MAX_HEADER_LIST_SIZE {
            entry[2..].copy_from_slice(&limit.to_be_bytes());
            found = true;
        }
    }
    found.then_some(frame)
}

impl<T: AsyncWrite + Unpin> Advertise<T> {
    /// The bytes to write for `b`, what h2 asked to write: while the first
    /// frame is being written, its rewritten copy at the same offset.
    fn poll_first(&mut self, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        if let First::Ahead(limit) = self.first {
            // h2 writes its SETTINGS whole in its first write; anything
            // else is passed on as it is.
            self.first = match rewritten(b, limit) {
                Some(frame) => First::Writing { frame, written: 0 },
                None => First::Done,
            };
        }
        let First::Writing { frame, written } = &mut self.first else {
            return Pin::new(&mut self.io).poll_write(cx, b);
        };
        let rest = &frame[*written..];
        // h2 offers the same bytes again after a short write; the rewritten
        // frame is at most as long as what it offers.
        let n = rest.len().min(b.len());
        let r = Pin::new(&mut self.io).poll_write(cx, &rest[..n]);
        if let Poll::Ready(Ok(k)) = r {
            *written += k;
            if *written == frame.len() {
                self.first = First::Done;
            }
        }
        r
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Advertise<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Advertise<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        if matches!(self.first, First::Done) {
            return Pin::new(&mut self.io).poll_write(cx, b);
        }
        self.poll_first(cx, b)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if matches!(self.first, First::Done) {
            return Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        }
        // Until the first frame is out, one slice at a time (a vectored
        // write may write less than it is given).
        let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
        self.poll_first(cx, first)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A SETTINGS frame with MAX_CONCURRENT_STREAMS 1024 and
    /// MAX_HEADER_LIST_SIZE `size`, then a WINDOW_UPDATE.
    fn preface(size: u32) -> Vec<u8> {
        let mut v = vec![0, 0, 12, SETTINGS, 0, 0, 0, 0, 0];
        v.extend([0, 3]);
        v.extend(1024u32.to_be_bytes());
        v.extend(MAX_HEADER_LIST_SIZE.to_be_bytes());
        v.extend(size.to_be_bytes());
        v.extend([0, 0, 4, 0x8, 0, 0, 0, 0, 0, 0, 0, 0x10, 0]);
        v
    }

    /// A writer that takes at most `step` bytes per call.
    struct Short {
        out: Vec<u8>,
        step: usize,
    }

    impl AsyncWrite for Short {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
            let n = b.len().min(self.step);
            self.out.extend_from_slice(&b[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn the_first_settings_frame_says_the_limit_whatever_the_write_sizes() {
        for step in [1, 5, 9, 20, 1000] {
            let mut w = Advertise::new(Short { out: Vec::new(), step }, 65536);
            w.write_all(&preface(262144)).await.unwrap();
            w.write_all(&preface(262144)).await.unwrap();
            let out = &w.io.out;
            assert_eq!(&out[..preface(0).len()], &preface(65536)[..], "step {step}: the first frame rewritten");
            assert_eq!(&out[preface(0).len()..], &preface(262144)[..], "step {step}: later frames untouched");
        }
    }

    #[test]
    fn other_first_frames_pass_unchanged() {
        let mut ack = preface(1);
        ack[4] = 0x1;
        assert_eq!(rewritten(&ack, 7), None, "a SETTINGS ack");
        let mut data = preface(1);
        data[3] = 0x0;
        assert_eq!(rewritten(&data, 7), None, "not SETTINGS");
        assert_eq!(rewritten(&preface(1)[..14], 7), None, "not whole");
        let without = [0, 0, 6, SETTINGS, 0, 0, 0, 0, 0, 0, 3, 0, 0, 4, 0];
        assert_eq!(rewritten(&without, 7), None, "no header-list setting");
    }
}
