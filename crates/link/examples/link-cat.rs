//! `link-cat URL`: connects to a link endpoint (`npipe://./pipe/NAME`,
//! `tcp://…`, `unix://…`, `hvsock://…`), sends everything read from standard
//! input, half-closes, and copies what comes back to standard output until
//! the other end closes. The Wine test uses it as a Windows client of
//! host-switch's API on a named pipe.
//!
//! `link-cat --security npipe://./pipe/NAME` (Windows) instead prints who
//! this process runs as and the pipe's owner and DACL, read back with
//! `GetSecurityInfo`: `user SID`, `sddl O:…D:…`, and `admits-only-owner-and-system
//! yes|no`.

use std::io::{Read, Write};
use std::process::ExitCode;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() -> ExitCode {
    let Some(url) = std::env::args().nth(1) else {
        eprintln!("usage: link-cat URL < request | link-cat --security npipe://./pipe/NAME");
        return ExitCode::from(2);
    };
    if url == "--security" {
        return security(std::env::args().nth(2).unwrap_or_default());
    }
    let mut request = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut request) {
        eprintln!("link-cat: reading standard input: {e}");
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("link-cat: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<Vec<u8>, Box<dyn std::error::Error>> = rt.block_on(async {
        let ep: rdnet_link::Endpoint = url.parse()?;
        let mut stream = rdnet_link::dial(&ep).await?;
        stream.write_all(&request).await?;
        stream.flush().await?;
        stream.shutdown().await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        Ok(reply)
    });
    match result {
        Ok(reply) => {
            let mut out = std::io::stdout();
            if out.write_all(&reply).and_then(|()| out.flush()).is_err() {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("link-cat: {url}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the current user's SID and the pipe's security descriptor.
#[cfg(windows)]
fn security(url: String) -> ExitCode {
    let name = match url.parse::<rdnet_link::Endpoint>() {
        Ok(rdnet_link::Endpoint::Npipe(name)) => name,
        _ => {
            eprintln!("link-cat: --security takes npipe://./pipe/NAME, not {url:?}");
            return ExitCode::from(2);
        }
    };
    let result =
        rdnet_link::sys::current_user_sid().and_then(|user| Ok((user, rdnet_link::sys::pipe_security(&name)?)));
    match result {
        Ok((user, sddl)) => {
            let admits = rdnet_link::sys::Sddl::parse(&sddl).is_some_and(|s| s.admits_only(&user));
            println!("user {user}\nsddl {sddl}\nadmits-only-owner-and-system {}", if admits { "yes" } else { "no" });
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("link-cat: {url}: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(not(windows))]
fn security(_url: String) -> ExitCode {
    eprintln!("link-cat: --security reads a named pipe's DACL: Windows only");
    ExitCode::from(2)
}
