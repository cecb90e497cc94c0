//! A request body that another try can send again. Each try reads the
//! frames the earlier ones read (kept, up to a limit) and then goes on from
//! the client's body where they left off, keeping what it reads too; so a
//! try whose endpoint answered before reading the whole body leaves the
//! rest for the next. Past the limit nothing is kept and the request can
//! be sent again only if no try read anything (its connect failed: no
//! byte of it was sent, whatever its size).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::HeaderMap;

use super::upstream::{Body, BodyError};

struct Shared {
    /// The client's body, where the last try left it.
    inner: Body,
    /// Data frames read so far, while under the limit.
    kept: Vec<Bytes>,
    kept_bytes: u64,
    trailers: Option<HeaderMap>,
    /// The client's body ended.
    ended: bool,
    /// More than `limit` was read: what was kept is gone.
    overflowed: bool,
    /// Some try read a frame.
    started: bool,
}

/// Where every try of one request gets its body.
#[derive(Clone)]
pub struct Replay {
    shared: Arc<Mutex<Shared>>,
    hint: SizeHint,
    limit: u64,
}

impl Replay {
    /// Keeps up to `limit` bytes of `body` to send again.
    pub fn new(body: Body, limit: u64) -> Self {
        let hint = body.size_hint();
        let shared = Shared {
            inner: body,
            kept: Vec::new(),
            kept_bytes: 0,
            trailers: None,
            ended: false,
            overflowed: false,
            started: false,
        };
        Self { shared: Arc::new(Mutex::new(shared)), hint, limit }
    }

    /// Whether another try can send the whole body.
    pub fn replayable(&self) -> bool {
        let s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        !s.overflowed || !s.started
    }

    /// Whether the whole body was read and is kept: a copy of it can be
    /// sent without touching the client's body.
    pub fn whole(&self) -> bool {
        let s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        // A try of a body of known length stops reading at its last byte,
        // without the end that would set `ended`.
        (s.ended || s.inner.is_end_stream()) && !s.overflowed
    }

    /// The body of one try.
    pub fn body(&self) -> Body {
        http_body_util::BodyExt::boxed_unsync(Try { replay: self.clone(), next: 0, live: false, trailers_sent: false })
    }
}

struct Try {
    replay: Replay,
    /// Index of the next kept frame to send.
    next: usize,
    /// This try has sent every kept frame and reads the client's body.
    live: bool,
    trailers_sent: bool,
}

impl HttpBody for Try {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let mut s = this.replay.shared.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = s.kept.get(this.next) {
            let b = b.clone();
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if s.overflowed && this.next > 0 && !this.live {
            // What this try was sending is gone: end it short rather than
            // send a body with a hole (never the case: such a request is
            // not tried again).
            return Poll::Ready(None);
        }
        if s.ended {
            return Poll::Ready(match (&s.trailers, this.trailers_sent) {
                (Some(t), false) => {
                    this.trailers_sent = true;
                    Some(Ok(Frame::trailers(t.clone())))
                }
                _ => None,
            });
        }
        this.live = true;
        let polled = Pin::new(&mut s.inner).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                s.started = true;
                if let Some(data) = frame.data_ref() {
                    if !s.overflowed {
                        s.kept_bytes += data.len() as u64;
                        if s.kept_bytes > this.replay.limit {
                            s.overflowed = true;
                            s.kept = Vec::new();
                        } else {
                            s.kept.push(data.clone());
                            this.next = s.kept.len();
                        }
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    s.ended = true;
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                s.ended = true;
                Poll::Ready(None)
            }
            other => other,
        }
    }

    /// Exact, so that the last data frame carries END_STREAM rather than
    /// an empty frame after it (a peer may have answered and reset the
    /// stream by then, and counts frames on reset streams against us).
    fn is_end_stream(&self) -> bool {
        let s = self.replay.shared.lock().unwrap_or_else(|p| p.into_inner());
        if !self.live && self.next < s.kept.len() && !s.overflowed {
            return false;
        }
        if s.ended {
            return s.trailers.is_none() || self.trailers_sent;
        }
        s.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.replay.hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::collections::VecDeque;

    /// A client body of several frames.
    struct Chunks(VecDeque<&'static str>);

    impl HttpBody for Chunks {
        type Data = Bytes;
        type Error = BodyError;
        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
            Poll::Ready(self.0.pop_front().map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes())))))
        }
    }

    fn chunks(parts: &[&'static str]) -> Body {
        Chunks(parts.iter().copied().collect()).boxed_unsync()
    }

    async fn first_frame(b: &mut Body) -> Bytes {
        b.frame().await.unwrap().unwrap().into_data().unwrap()
    }

    #[tokio::test]
    async fn a_second_try_sends_what_the_first_read_and_then_the_rest() {
        let r = Replay::new(chunks(&["ab", "cd", "ef"]), 1024);
        let mut first = r.body();
        assert_eq!(
            &first_frame(&mut first).await[..],
            b"ab",
            "the first try read one frame, then its endpoint answered"
        );
        drop(first);
        assert!(r.replayable());
        let all = r.body().collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"abcdef");
        let again = r.body().collect().await.unwrap().to_bytes();
        assert_eq!(&again[..], b"abcdef", "and a third try the whole of it");
    }

    #[tokio::test]
    async fn the_end_is_known_with_the_last_frame_not_after_it() {
        let full = http_body_util::Full::new(Bytes::from_static(b"msg")).map_err(|never| match never {}).boxed_unsync();
        let r = Replay::new(full, 1024);
        let mut first = r.body();
        assert!(!first.is_end_stream());
        first_frame(&mut first).await;
        assert!(first.is_end_stream(), "END_STREAM goes with the data frame");
        let mut second = r.body();
        assert!(!second.is_end_stream(), "a new try has the kept frame to send");
        first_frame(&mut second).await;
        assert!(second.is_end_stream());
    }

    #[tokio::test]
    async fn past_the_limit_a_started_body_cannot_be_sent_again() {
        let r = Replay::new(chunks(&["ab", "cd", "ef", "gh", "ij"]), 5);
        let all = r.body().collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"abcdefghij", "the one try gets all of it, past the limit too");
        assert!(!r.replayable());
    }

    #[tokio::test]
    async fn an_unread_body_of_any_size_can_go_to_another_try() {
        let r = Replay::new(chunks(&["abcd", "efgh"]), 0);
        drop(r.body());
        assert!(r.replayable(), "a try whose connect failed read nothing");
        assert_eq!(&r.body().collect().await.unwrap().to_bytes()[..], b"abcdefgh");
    }
}
