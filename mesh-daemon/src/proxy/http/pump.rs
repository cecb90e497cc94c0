//! A body sent on an HTTP/2 stream of the `h2` crate: a request's to an
//! endpoint ([`super::upstream`]), an answer's to a client
//! ([`super::server`]).

use std::future::poll_fn;
use std::pin::Pin;
use std::task::Poll;

use bytes::Bytes;
use h2::{Reason, SendStream};
use hyper::body::Body;

/// Sends `body` on `stream` to its end: each chunk as soon as the stream
/// has room for a byte of it (h2 sends the rest as the peer's windows
/// open, so at most one chunk waits in h2's buffer per stream, and a peer
/// that reads slowly slows the body's source), the last chunk at once
/// with the end of the stream (no empty DATA frame after it), trailers as
/// they come. A body that fails resets the stream with `on_error`, so the
/// peer sees it cut short; a peer that resets the stream stops the pump
/// at once, and dropping the body tells its source.
pub(super) async fn pump<B>(mut body: B, mut stream: SendStream<Bytes>, on_error: Reason)
where
    B: Body<Data = Bytes> + Unpin,
{
    loop {
        // The next frame, unless the peer resets the stream meanwhile.
        let next = poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
            Poll::Pending => stream.poll_reset(cx).map(|_| None),
        })
        .await;
        let Some(frame) = next else { return };
        let frame = match frame {
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(_)) => {
                stream.send_reset(on_error);
                return;
            }
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                let eos = body.is_end_stream();
                // The last chunk does not wait for room: nothing after it
                // is held back, and h2 claims the window it needs itself.
                if !eos && !data.is_empty() && !room(&mut stream).await {
                    return;
                }
                if stream.send_data(data, eos).is_err() || eos {
                    return;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    stream.reserve_capacity(0);
                    let _ = stream.send_trailers(trailers);
                    return;
                }
            }
        }
    }
}

/// Waits until the stream has room for at least one byte; false once it
/// cannot send any more (reset, or its connection gone).
async fn room(stream: &mut SendStream<Bytes>) -> bool {
    // One byte claimed, not the chunk: a claim of the whole chunk would
    // hold the connection's window for this stream alone while others
    // wait (h2 raises the claim to what is buffered when it is sent).
    stream.reserve_capacity(1);
    loop {
        if stream.capacity() > 0 {
            return true;
        }
        match poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return false,
        }
    }
}
