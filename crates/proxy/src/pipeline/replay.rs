//! Request bodies a retry can send again. The first try streams the body as it arrives (nothing
//! waits for the whole body) while keeping a copy of what went by; a retry replays the copy and
//! then goes on reading the rest. Past [`MAX_REPLAY_BYTES`] the copy is dropped and the request
//! can no longer be retried once its body has been sent (as linkerd2-proxy's `ReplayBody`).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::http::{Body, BoxError};

/// The most request-body bytes kept for a retry.
pub const MAX_REPLAY_BYTES: usize = 64 * 1024;

struct State {
    /// The body as received; `None` once it ended.
    source: Option<Body>,
    /// Data frames read so far, while their total stays under the limit.
    frames: Vec<Bytes>,
    bytes: usize,
    /// Data frames read from the source in all.
    read: usize,
    trailers: Option<HeaderMap>,
    ended: bool,
    overflowed: bool,
}

/// One try's view of a request body (see the module).
pub struct ReplayBody {
    state: Arc<Mutex<State>>,
    /// The next frame this try sends.
    pos: usize,
    trailers_sent: bool,
    hint: SizeHint,
}

impl ReplayBody {
    pub fn new(body: Body) -> ReplayBody {
        let hint = body.size_hint();
        let ended = body.is_end_stream();
        let state = State {
            source: (!ended).then_some(body),
            frames: Vec::new(),
            bytes: 0,
            read: 0,
            trailers: None,
            ended,
            overflowed: false,
        };
        ReplayBody { state: Arc::new(Mutex::new(state)), pos: 0, trailers_sent: false, hint }
    }

    /// The body again, from its start, for another try; `None` once more than
    /// [`MAX_REPLAY_BYTES`] went by.
    pub fn replay(&self) -> Option<ReplayBody> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (!st.overflowed).then(|| ReplayBody {
            state: self.state.clone(),
            pos: 0,
            trailers_sent: false,
            hint: self.hint,
        })
    }
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut st = this.state.lock().unwrap_or_else(|p| p.into_inner());
        if this.pos < st.frames.len() {
            let data = st.frames[this.pos].clone();
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if st.overflowed && this.pos < st.read {
            return Poll::Ready(Some(Err("the request body is too large to be sent again".into())));
        }
        if st.ended {
            if !this.trailers_sent {
                this.trailers_sent = true;
                if let Some(t) = st.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        }
        let Some(source) = st.source.as_mut() else { return Poll::Ready(None) };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                st.ended = true;
                st.source = None;
                this.trailers_sent = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    st.read += 1;
                    if !st.overflowed {
                        st.bytes += data.len();
                        if st.bytes > MAX_REPLAY_BYTES {
                            st.overflowed = true;
                            st.frames = Vec::new();
                        } else {
                            st.frames.push(data.clone());
                        }
                    }
                    this.pos = st.read;
                    if st.source.as_ref().is_some_and(|s| s.is_end_stream()) {
                        st.ended = true;
                        st.source = None;
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(t) => {
                        st.trailers = Some(t.clone());
                        st.ended = true;
                        st.source = None;
                        this.trailers_sent = true;
                        Poll::Ready(Some(Ok(Frame::trailers(t))))
                    }
                    // A frame kind this proxy does not know: skip it.
                    Err(_) => {
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.ended && self.pos >= st.frames.len() && (self.trailers_sent || st.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn stream(chunks: &[&'static str], trailers: bool) -> Body {
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> =
            chunks.iter().map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes())))).collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("grpc-status", http::HeaderValue::from_static("0"));
            frames.push(Ok(Frame::trailers(t)));
        }
        crate::http::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(frames)))
    }

    async fn collect(b: ReplayBody) -> (Vec<u8>, Option<HeaderMap>) {
        let c = b.collect().await.expect("collect");
        let trailers = c.trailers().cloned();
        (c.to_bytes().to_vec(), trailers)
    }

    #[tokio::test]
    async fn a_retry_replays_the_whole_body_and_its_trailers() {
        let first = ReplayBody::new(stream(&["hello ", "world"], true));
        let second = first.replay().expect("replayable");
        let (body, trailers) = collect(first).await;
        assert_eq!(body, b"hello world");
        assert!(trailers.is_some());
        let (body, trailers) = collect(second).await;
        assert_eq!(body, b"hello world");
        assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
    }

    #[tokio::test]
    async fn a_retry_started_midway_catches_up_then_reads_on() {
        let mut first = ReplayBody::new(stream(&["a", "b", "c"], false));
        let frame = first.frame().await.expect("frame").expect("ok");
        assert_eq!(frame.into_data().expect("data"), "a");
        let second = first.replay().expect("replayable");
        drop(first); // the first try gave up after one frame
        let (body, _) = collect(second).await;
        assert_eq!(body, b"abc");
    }

    #[tokio::test]
    async fn past_the_limit_the_body_is_not_kept() {
        let big: &'static str = Box::leak("x".repeat(MAX_REPLAY_BYTES).into_boxed_str());
        let first = ReplayBody::new(stream(&[big, "y"], false));
        let early = first.replay().expect("nothing read yet");
        let (body, _) = collect(first).await;
        assert_eq!(body.len(), MAX_REPLAY_BYTES + 1);
        assert!(early.replay().is_none(), "no replay once over the limit");
        assert!(collect_err(early).await, "a copy taken before the overflow fails instead of sending half");
    }

    async fn collect_err(b: ReplayBody) -> bool {
        b.collect().await.is_err()
    }

    #[tokio::test]
    async fn an_empty_body_ends_at_once() {
        let b = ReplayBody::new(crate::http::empty());
        assert!(b.is_end_stream());
        assert!(b.replay().expect("replay").is_end_stream());
    }
}
