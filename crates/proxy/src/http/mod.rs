//! HTTP pieces every direction shares: the boxed body type, hop-by-hop header handling,
//! request ids, header rewrites and the mapping from proxy errors to responses.

pub mod error;
pub mod headers;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};

pub use error::{Flag, ProxyError};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The one body type that crosses module boundaries (type-erased, streamed).
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Erases any body into [`Body`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A body of fixed bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    boxed(Full::new(bytes.into()))
}

/// An empty body.
pub fn empty() -> Body {
    boxed(http_body_util::Empty::new())
}
