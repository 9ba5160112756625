//! Go `flag`-package syntax on top of clap.
//!
//! Rancher Desktop starts our binaries the way it started the Go originals:
//! `-name value`, `-name=value`, `--name value`, `--name=value`, booleans as
//! `-name` / `-name=false`. clap only knows `--name`, so the arguments are
//! rewritten first: every flag token becomes `--name=value` (value flags take
//! the next token verbatim, even if it starts with `-`, as Go does), and the
//! result is handed to clap. Which flags take values is read from the clap
//! command itself, so one definition drives both. Booleans are declared with
//! [`go_bool`] as their value parser and `require_equals`, which is how the
//! rewriter recognises them.
//!
//! Errors and help read as Go's do, in the spelling the user typed:
//! `flag provided but not defined: -bogus`, `invalid value "99999" for flag
//! -mtu: …`, `flag needs an argument: -subnet`, and `-h` lists `-name type`
//! with the defaults. Where Go would silently stop parsing (`-debug false`
//! leaves `false` as a stray argument and debug on), we refuse with a hint.

use std::ffi::OsString;
use std::fmt::Write as _;

use clap::Parser;
use clap::error::{ContextKind, ContextValue, ErrorKind};

/// Exit status of a usage error, as Go's `flag.ExitOnError` uses.
pub const USAGE_EXIT: u8 = 2;

/// A command line that cannot be used; the text is ready to print.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    /// `-h` / `-help`: the usage text (not an error for the user).
    #[error("{0}")]
    Help(String),
    #[error("{0}")]
    Usage(String),
}

/// Parses `std::env::args_os()`. `-h` prints the flags and exits 0; a bad
/// command line prints one message (and where to find the flags) on stderr
/// and exits 2, as Go's `flag.ExitOnError` does.
pub fn parse_go_args<T: Parser>() -> T {
    match parse_go_args_from(std::env::args_os()) {
        Ok(v) => v,
        Err(FlagError::Help(text)) => {
            print!("{text}");
            std::process::exit(0);
        }
        Err(FlagError::Usage(msg)) => {
            let name = T::command().get_name().to_string();
            eprintln!("{}", usage_message(&name, &msg));
            std::process::exit(i32::from(USAGE_EXIT));
        }
    }
}

/// `PROGRAM: MESSAGE` and a pointer to `-h`, the form every usage error takes.
pub fn usage_message(program: &str, msg: &str) -> String {
    format!("{program}: {msg}\nRun '{program} -h' to list the flags.")
}

/// Parses the given argument list (first item: the program name).
pub fn parse_go_args_from<T, I>(args: I) -> Result<T, FlagError>
where
    T: Parser,
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    // Go lets a later flag override an earlier one.
    let mut cmd = T::command().args_override_self(true);
    let rewritten = rewrite(&cmd, args.into_iter().map(Into::into).collect())?;
    if rewritten.iter().skip(1).any(|a| a == "--help") {
        return Err(FlagError::Help(go_usage(&cmd)));
    }
    let matches = cmd.try_get_matches_from_mut(rewritten).map_err(|e| go_error(&e))?;
    T::from_arg_matches(&matches).map_err(|e| go_error(&e))
}

/// Go's accepted spellings of a boolean (`strconv.ParseBool`).
pub fn go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("invalid boolean value {s:?}")),
    }
}

/// The range error every numeric flag reports, so limits read the same in
/// every program: `must be between 68 and 65521`.
pub fn out_of_range(min: impl std::fmt::Display, max: impl std::fmt::Display) -> String {
    format!("must be between {min} and {max}")
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Value,
}

fn flag_kind(cmd: &clap::Command, name: &str) -> Option<Kind> {
    cmd.get_arguments()
        .find(|a| a.get_long() == Some(name) || a.get_all_aliases().is_some_and(|al| al.contains(&name)))
        .map(|a| if a.is_require_equals_set() || !a.get_action().takes_values() { Kind::Bool } else { Kind::Value })
}

fn rewrite(cmd: &clap::Command, args: Vec<OsString>) -> Result<Vec<OsString>, FlagError> {
    let mut out = Vec::with_capacity(args.len());
    let mut iter = args.into_iter();
    if let Some(prog) = iter.next() {
        out.push(prog);
    }
    // The last flag, if it was a boolean given without `=`, for the hint.
    let mut last_bool: Option<String> = None;
    while let Some(arg) = iter.next() {
        let Some(text) = arg.to_str() else {
            return Err(FlagError::Usage(format!("argument {arg:?} is not valid text")));
        };
        if text == "--" {
            // Go ends the flags here; these programs take no arguments.
            return match iter.next() {
                Some(extra) => Err(stray(&extra.to_string_lossy(), None)),
                None => Ok(out),
            };
        }
        let body = text.strip_prefix("--").or_else(|| text.strip_prefix('-'));
        let Some(body) = body.filter(|b| !b.is_empty() && !b.starts_with('-')) else {
            return Err(stray(text, last_bool.as_deref()));
        };
        last_bool = None;
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        let dashes = &text[..text.len() - body.len()];
        if (name == "h" || name == "help") && value.is_none() {
            out.push("--help".into());
            continue;
        }
        match (flag_kind(cmd, name), value) {
            (Some(Kind::Bool), None) => {
                last_bool = Some(format!("{dashes}{name}"));
                out.push(format!("--{name}").into());
            }
            (Some(_), Some(v)) => out.push(format!("--{name}={v}").into()),
            (Some(Kind::Value), None) => match iter.next() {
                Some(next) => {
                    let mut joined = OsString::from(format!("--{name}="));
                    joined.push(next);
                    out.push(joined);
                }
                None => return Err(FlagError::Usage(format!("flag needs an argument: {dashes}{name}"))),
            },
            (None, _) => return Err(FlagError::Usage(format!("flag provided but not defined: {dashes}{name}"))),
        }
    }
    Ok(out)
}

/// An argument that is not a flag. Go would stop parsing there and ignore
/// the rest; we refuse, since everything after it would be lost.
fn stray(text: &str, after_bool: Option<&str>) -> FlagError {
    match after_bool {
        Some(flag) if go_bool(text).is_ok() => FlagError::Usage(format!(
            "unexpected argument {text:?} after {flag}: a boolean flag takes its value after '=', as in {flag}={text}"
        )),
        _ => FlagError::Usage(format!(
            "unexpected argument {text:?}: only flags are accepted (-name value or -name=value)"
        )),
    }
}

/// `-name` from clap's `--name <NAME>` rendering of an argument.
fn go_flag_name(rendered: &str) -> String {
    let long = rendered.split_whitespace().next().unwrap_or(rendered);
    let long = long.split(['=', '[']).next().unwrap_or(long);
    format!("-{}", long.trim_start_matches('-'))
}

fn context_str(e: &clap::Error, kind: ContextKind) -> Option<String> {
    match e.get(kind)? {
        ContextValue::String(s) => Some(s.clone()),
        ContextValue::Strings(v) => Some(v.join(", ")),
        other => Some(other.to_string()),
    }
}

/// Turns what clap found wrong into Go's wording.
fn go_error(e: &clap::Error) -> FlagError {
    let arg = context_str(e, ContextKind::InvalidArg).map(|a| go_flag_name(&a));
    let value = context_str(e, ContextKind::InvalidValue);
    let msg = match (e.kind(), arg, value) {
        (ErrorKind::ValueValidation | ErrorKind::InvalidValue, Some(arg), Some(value)) => {
            let reason = std::error::Error::source(e)
                .map(|s| s.to_string())
                .or_else(|| {
                    context_str(e, ContextKind::ValidValue)
                        .filter(|v| !v.is_empty())
                        .map(|v| format!("expected one of {v}"))
                })
                .or_else(|| value.is_empty().then(|| "must not be empty".into()))
                .unwrap_or_else(|| "not accepted".into());
            format!("invalid value {value:?} for flag {arg}: {reason}")
        }
        (ErrorKind::InvalidValue | ErrorKind::NoEquals, Some(arg), None) => format!("flag needs an argument: {arg}"),
        (ErrorKind::MissingRequiredArgument, Some(arg), _) => format!("missing required flag {arg}"),
        (ErrorKind::UnknownArgument, Some(arg), _) => format!("flag provided but not defined: {arg}"),
        _ => {
            // Anything else: clap's own first line, without its styling.
            let text = e.render().to_string();
            let line = text.lines().next().unwrap_or("invalid command line");
            line.trim_start_matches("error: ").to_string()
        }
    };
    FlagError::Usage(msg)
}

/// Help in Go's `flag.PrintDefaults` layout: `-name type`, the text on the
/// next line, the default in parentheses.
fn go_usage(cmd: &clap::Command) -> String {
    let mut out = String::new();
    if let Some(about) = cmd.get_about() {
        let _ = writeln!(out, "{about}\n");
    }
    let _ = writeln!(out, "Usage of {}:", cmd.get_name());
    let mut args: Vec<&clap::Arg> = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set() && a.get_long().is_some_and(|l| l != "help" && l != "version"))
        .collect();
    args.sort_by_key(|a| a.get_long().unwrap_or_default());
    for a in args {
        let name = a.get_long().unwrap_or_default();
        let bool_flag = a.is_require_equals_set() || !a.get_action().takes_values();
        let repeatable = matches!(a.get_action(), clap::ArgAction::Append);
        let defaults: Vec<String> = a.get_default_values().iter().map(|d| d.to_string_lossy().into_owned()).collect();
        let type_name = if bool_flag {
            String::new()
        } else if repeatable {
            " value".into()
        } else if defaults.first().is_some_and(|d| d.parse::<i64>().is_ok()) {
            " int".into()
        } else {
            " string".into()
        };
        let _ = writeln!(out, "  -{name}{type_name}");
        let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
        let mut line = help.split_whitespace().collect::<Vec<_>>().join(" ");
        match defaults.first() {
            Some(d) if bool_flag && d == "false" => {}
            Some(d) if bool_flag => {
                let _ = write!(line, " (default {d})");
            }
            Some(d) if d.parse::<i64>().is_ok() => {
                let _ = write!(line, " (default {d})");
            }
            Some(d) if !d.is_empty() => {
                let all: Vec<String> = defaults.iter().map(|d| format!("{d:?}")).collect();
                let _ = write!(line, " (default {})", all.join(", "));
            }
            _ => {}
        }
        if repeatable && !line.contains("repeatable") {
            line.push_str(" (repeatable)");
        }
        let _ = writeln!(out, "    \t{line}");
    }
    out
}
#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Parser, Debug)]
    struct Opts {
        #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false",
              default_missing_value = "true", value_parser = go_bool)]
        debug: bool,
        #[arg(long, default_value = "192.168.127.0/24")]
        subnet: String,
        #[arg(long = "port-forward")]
        port_forward: Vec<String>,
        #[arg(long = "unshare-arg")]
        unshare_arg: Option<String>,
        #[arg(long)]
        path: Option<std::path::PathBuf>,
    }

    fn parse(args: &[&str]) -> Result<Opts, FlagError> {
        parse_go_args_from(std::iter::once("prog").chain(args.iter().copied()))
    }

    fn usage(args: &[&str]) -> String {
        match parse(args) {
            Err(FlagError::Usage(m)) => m,
            other => panic!("{args:?}: expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn all_four_spellings() {
        for args in [
            &["-subnet", "10.0.0.0/8"][..],
            &["-subnet=10.0.0.0/8"],
            &["--subnet", "10.0.0.0/8"],
            &["--subnet=10.0.0.0/8"],
        ] {
            assert_eq!(parse(args).unwrap().subnet, "10.0.0.0/8", "{args:?}");
        }
    }

    #[test]
    fn booleans() {
        assert!(!parse(&[]).unwrap().debug);
        assert!(parse(&["-debug"]).unwrap().debug);
        assert!(parse(&["--debug"]).unwrap().debug);
        assert!(parse(&["-debug=true"]).unwrap().debug);
        assert!(parse(&["-debug=1"]).unwrap().debug);
        assert!(!parse(&["-debug=false"]).unwrap().debug);
        assert!(!parse(&["--debug=F"]).unwrap().debug);
        assert!(parse(&["-debug=maybe"]).is_err());
    }

    #[test]
    fn repeatable_and_dash_values() {
        let o = parse(&[
            "-port-forward",
            "127.0.0.1:1=192.168.127.2:1",
            "--port-forward=127.0.0.1:2=192.168.127.2:2",
            "-unshare-arg",
            "-c sleep",
        ])
        .unwrap();
        assert_eq!(o.port_forward.len(), 2);
        assert_eq!(o.unshare_arg.as_deref(), Some("-c sleep"));
    }

    #[test]
    fn later_flags_override_earlier_ones_as_in_go() {
        let o = parse(&["-subnet", "10.0.0.0/8", "--subnet=10.1.0.0/16", "-debug", "-debug=false"]).unwrap();
        assert_eq!(o.subnet, "10.1.0.0/16");
        assert!(!o.debug);
        let o = parse(&["-port-forward", "a", "-port-forward", "b"]).unwrap();
        assert_eq!(o.port_forward, vec!["a", "b"]);
    }

    #[test]
    fn errors_read_as_go_writes_them() {
        assert_eq!(usage(&["-nope"]), "flag provided but not defined: -nope");
        assert_eq!(usage(&["--nope=1"]), "flag provided but not defined: --nope");
        assert_eq!(usage(&["-subnet"]), "flag needs an argument: -subnet");
        assert_eq!(usage(&["-debug=maybe"]), r#"invalid value "maybe" for flag -debug: invalid boolean value "maybe""#);
        let m = usage(&["-debug", "false"]);
        assert!(m.contains("-debug=false"), "{m}");
        let m = usage(&["--debug", "0"]);
        assert!(m.contains("--debug=0"), "{m}");
        let m = usage(&["-subnet", "10.0.0.0/8", "stray"]);
        assert!(m.starts_with("unexpected argument \"stray\""), "{m}");
        assert_eq!(usage(&["--", "x"]), usage(&["x"]));
        assert!(parse(&["--"]).is_ok());
        assert!(usage_message("prog", "m").starts_with("prog: m\n"));
        assert_eq!(usage(&["-path="]), r#"invalid value "" for flag -path: must not be empty"#);
    }

    #[test]
    fn help_lists_single_dash_flags_with_defaults() {
        let Err(FlagError::Help(text)) = parse(&["-h"]) else { panic!("-h is help") };
        assert!(text.contains("Usage of rdnet-cli:"), "{text}");
        assert!(text.contains("  -subnet string\n"), "{text}");
        assert!(text.contains(r#"(default "192.168.127.0/24")"#), "{text}");
        assert!(text.contains("  -debug\n"), "{text}");
        assert!(text.contains("  -port-forward value\n") && text.contains("(repeatable)"), "{text}");
        assert!(!text.contains("--subnet"), "{text}");
        assert!(matches!(parse(&["--help"]), Err(FlagError::Help(_))));
    }
}
