//! Platform-specific transports behind one API: `SysStream`, `SysListener`,
//! `dial`, `listen`, and `compute_systems` (the VMs a Windows host runs).
//! The only place in this crate allowed `unsafe`.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::*;

#[cfg(windows)]
mod windows;
#[cfg(windows)]
pub use windows::*;

#[cfg(not(any(target_os = "linux", windows)))]
mod other;
#[cfg(not(any(target_os = "linux", windows)))]
pub use other::*;

/// The running Hyper-V compute systems by id: only Windows has them.
#[cfg(not(windows))]
pub fn compute_systems() -> std::io::Result<Vec<String>> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "listing Hyper-V VMs needs Windows"))
}

/// The Windows path of a named-pipe endpoint: `npipe://./pipe/NAME` (also
/// Docker's `npipe:////./pipe/NAME`, either slash) is `\\.\pipe\NAME`.
/// Only local pipes are accepted.
pub fn pipe_path(name: &str) -> std::io::Result<String> {
    let p = name.replace('/', "\\");
    let p = p.trim_start_matches('\\');
    let rest = p.get(..7).filter(|head| head.eq_ignore_ascii_case(".\\pipe\\")).map(|_| &p[7..]);
    match rest {
        Some(rest) if !rest.is_empty() && !rest.starts_with('\\') => Ok(format!("\\\\.\\pipe\\{rest}")),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name:?} is not a local pipe name (npipe://./pipe/NAME)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipe_paths() {
        assert_eq!(pipe_path("./pipe/rd-api").unwrap(), r"\\.\pipe\rd-api");
        assert_eq!(pipe_path("//./pipe/docker_engine").unwrap(), r"\\.\pipe\docker_engine");
        assert_eq!(pipe_path(r"\\.\PIPE\x").unwrap(), r"\\.\pipe\x");
        assert_eq!(pipe_path("./pipe/a/b").unwrap(), r"\\.\pipe\a\b");
        for bad in ["", "./pipe/", "./pipe//x", "server/pipe/x", "./pip/x", "pipe/x", "./pipex"] {
            assert!(pipe_path(bad).is_err(), "{bad}");
        }
    }
}
