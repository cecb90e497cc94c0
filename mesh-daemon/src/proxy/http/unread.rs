//! A request body that can be taken back while nothing has read it. A
//! request whose connect failed was never written, so it may go to
//! another endpoint whatever its size, without buffering a byte.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::upstream::Body;

/// Where the body waits until a try first reads it.
#[derive(Clone)]
pub struct Unread {
    slot: Arc<Mutex<Option<Body>>>,
    hint: SizeHint,
}

impl Unread {
    pub fn new(body: Body) -> Self {
        let hint = body.size_hint();
        Self { slot: Arc::new(Mutex::new(Some(body))), hint }
    }

    /// The body for one try: it takes the body from the slot on its first read.
    pub fn body(&self) -> Body {
        http_body_util::BodyExt::boxed_unsync(Try { unread: self.clone(), inner: None })
    }

    /// Whether no try has read the body yet (so another may send it).
    pub fn still_unread(&self) -> bool {
        self.slot.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

struct Try {
    unread: Unread,
    inner: Option<Body>,
}

impl HttpBody for Try {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.inner.is_none() {
            let taken = self.unread.slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            self.inner = taken;
        }
        match self.inner.as_mut() {
            Some(b) => Pin::new(b).poll_frame(cx),
            // Another try read it: never the case for tries made one after
            // the other, but then this one ends rather than sending half.
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_some_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| self.unread.hint, |b| b.size_hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    fn body(s: &'static str) -> Body {
        Full::new(Bytes::from_static(s.as_bytes())).map_err(|never| match never {}).boxed_unsync()
    }

    #[tokio::test]
    async fn a_try_that_never_read_leaves_the_whole_body_to_the_next() {
        let u = Unread::new(body("hello"));
        let first = u.body();
        assert_eq!(first.size_hint().exact(), Some(5), "the length is known before the read");
        drop(first);
        assert!(u.still_unread());
        let got = u.body().collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"hello");
        assert!(!u.still_unread(), "read once: no other try may send it");
        assert!(u.body().collect().await.unwrap().to_bytes().is_empty());
    }
}
