//! Platform-specific transports behind one API: `SysStream`, `SysListener`,
//! `dial`, `listen`. The only place in this crate allowed `unsafe`.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::*;

#[cfg(not(target_os = "linux"))]
mod other;
#[cfg(not(target_os = "linux"))]
pub use other::*;
