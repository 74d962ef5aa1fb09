//! chanserv (bootstrap)
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]
mod error;
pub mod frame;
pub use error::{Error, Result, Timeout};
