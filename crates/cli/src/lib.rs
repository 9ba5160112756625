//! What the four binaries share at their edges: Go-compatible flag parsing,
//! logging to a file that may fail, and printing an error with its causes.
#![deny(unsafe_code)]

pub mod flags;
pub mod logging;
pub mod sys;

pub use flags::{go_bool, parse_go_args, parse_go_args_from};
pub use logging::{LogOptions, init_logging};
pub use sys::{close_inherited_fds, fds_named_in_args};

/// Formats an error and every `source()` below it as one line, the way the
/// binaries print a fatal error once before exiting.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(source) = cur {
        let text = source.to_string();
        // thiserror's `#[error("…: {0}")]` often repeats its source already.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = source.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_lists_sources() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
    }
}
