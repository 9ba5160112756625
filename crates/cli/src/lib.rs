//! What the four binaries share at their edges: Go-compatible flag parsing,
//! logging to a file that may fail, and printing an error with its causes.
#![deny(unsafe_code)]

pub mod flags;
pub mod logging;
pub mod sys;

pub use flags::{FlagError, USAGE_EXIT, go_bool, out_of_range, parse_go_args, parse_go_args_from, usage_message};
pub use logging::{LogOptions, init_logging};
pub use sys::{ConsoleEvent, close_inherited_fds, console_shutdown_done, fds_named_in_args, watch_console};

use std::process::ExitCode;

/// Reports a command line that cannot work (a flag's value, a missing
/// flag) found after parsing, and gives Go's usage exit status, 2. Call it
/// before anything is opened: only stderr is written.
pub fn usage_error(program: &str, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("{}", usage_message(program, &msg.to_string()));
    ExitCode::from(USAGE_EXIT)
}

/// Reports a runtime failure once and gives exit status 1: into the log,
/// and on stderr too unless the log already goes there (or to stdout,
/// which then is the same terminal or file).
pub fn runtime_error(program: &str, err: &dyn std::error::Error) -> ExitCode {
    let msg = error_chain(err);
    tracing::error!("{msg}");
    if !logging::logs_to_std_stream() {
        eprintln!("{program}: {msg}");
    }
    ExitCode::FAILURE
}

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
