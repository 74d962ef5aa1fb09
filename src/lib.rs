//! chanserv (bootstrap)
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]
mod error;
pub mod frame;
mod mux;
pub use error::{Error, Result, Timeout};
pub use mux::*;
/// Tags.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RequestTag {
    /// Meta.
    Meta(String),
    /// Bucket.
    Bucket(String),
}
