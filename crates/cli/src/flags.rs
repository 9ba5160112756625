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
//! rewriter recognises them (`-debug false` is, as in Go, the flag and then a
//! stray argument).

use std::ffi::OsString;

use clap::Parser;

/// Parses `std::env::args_os()`; on error or `-h` prints and exits like clap
/// (and like Go's `flag.ExitOnError`: status 2 on a bad flag, 0 for help).
pub fn parse_go_args<T: Parser>() -> T {
    match parse_go_args_from(std::env::args_os()) {
        Ok(v) => v,
        Err(e) => e.exit(),
    }
}

/// Parses the given argument list (first item: the program name).
pub fn parse_go_args_from<T, I>(args: I) -> Result<T, clap::Error>
where
    T: Parser,
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    // Go lets a later flag override an earlier one.
    let mut cmd = T::command().args_override_self(true);
    let rewritten = rewrite(&cmd, args.into_iter().map(Into::into).collect());
    let matches = cmd.try_get_matches_from_mut(rewritten)?;
    T::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))
}

/// Go's accepted spellings of a boolean (`strconv.ParseBool`).
pub fn go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("invalid boolean value {s:?}")),
    }
}

enum Kind {
    Bool,
    Value,
}

fn flag_kind(cmd: &clap::Command, name: &str) -> Option<Kind> {
    cmd.get_arguments()
        .find(|a| a.get_long() == Some(name) || a.get_all_aliases().is_some_and(|al| al.contains(&name)))
        .map(|a| if a.is_require_equals_set() || !a.get_action().takes_values() { Kind::Bool } else { Kind::Value })
}

fn rewrite(cmd: &clap::Command, args: Vec<OsString>) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut iter = args.into_iter();
    if let Some(prog) = iter.next() {
        out.push(prog);
    }
    while let Some(arg) = iter.next() {
        let Some(text) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if text == "--" {
            out.push(arg);
            out.extend(iter);
            break;
        }
        let body = if let Some(b) = text.strip_prefix("--") {
            b
        } else if let Some(b) = text.strip_prefix('-') {
            b
        } else {
            // Go stops at the first non-flag argument.
            out.push(arg);
            out.extend(iter);
            break;
        };
        if body.is_empty() || body.starts_with('-') {
            out.push(arg);
            continue;
        }
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        if (name == "h" || name == "help") && value.is_none() {
            out.push("--help".into());
            continue;
        }
        match (flag_kind(cmd, name), value) {
            (Some(Kind::Bool), None) => out.push(format!("--{name}").into()),
            (Some(_), Some(v)) => out.push(format!("--{name}={v}").into()),
            (Some(Kind::Value), None) => match iter.next() {
                Some(next) => {
                    let mut joined = OsString::from(format!("--{name}="));
                    joined.push(next);
                    out.push(joined);
                }
                // clap reports the missing value.
                None => out.push(format!("--{name}").into()),
            },
            // Unknown: let clap report it under its Go-style name.
            (None, _) => out.push(format!("--{body}").into()),
        }
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
    }

    fn parse(args: &[&str]) -> Result<Opts, clap::Error> {
        parse_go_args_from(std::iter::once("prog").chain(args.iter().copied()))
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
    fn errors() {
        assert!(parse(&["-nope"]).is_err());
        assert!(parse(&["-subnet"]).is_err());
        let help = parse(&["-h"]).unwrap_err();
        assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
        let text = help.to_string();
        assert!(text.contains("--subnet") && text.contains("192.168.127.0/24"), "{text}");
    }
}
