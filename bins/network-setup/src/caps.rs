//! The privileges network-setup needs, checked before it waits for
//! host-switch: creating or entering a network namespace and starting
//! unshare need CAP_SYS_ADMIN, veth and addresses need CAP_NET_ADMIN.
//! Without them the handshake would still succeed and everything after it
//! fail, so the check reads the effective set (`CapEff` in
//! `/proc/self/status`) and refuses at once.

use std::fmt;

/// A capability network-setup needs: its number and name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap(u8, &'static str);

pub const CAP_NET_ADMIN: Cap = Cap(12, "CAP_NET_ADMIN");
pub const CAP_SYS_ADMIN: Cap = Cap(21, "CAP_SYS_ADMIN");
pub const NEEDED: [Cap; 2] = [CAP_SYS_ADMIN, CAP_NET_ADMIN];

#[derive(Debug, thiserror::Error)]
pub struct MissingCaps(pub Vec<Cap>);

impl fmt::Display for MissingCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|c| c.1).collect();
        write!(
            f,
            "missing privileges: {} (needed to create and enter network namespaces, start the \
             namespaced init and configure the veth pair); run network-setup as root",
            names.join(" and ")
        )
    }
}

/// The capabilities of `needed` that the effective set in a
/// `/proc/PID/status` text lacks; `None` when the text has no readable
/// `CapEff` line (then nothing is known, and the operations themselves will
/// tell).
pub fn missing(status: &str, needed: &[Cap]) -> Option<Vec<Cap>> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    let eff = u64::from_str_radix(hex, 16).ok()?;
    Some(needed.iter().copied().filter(|c| eff & (1u64 << c.0) == 0).collect())
}

/// Checks this process's effective capabilities against [`NEEDED`].
pub fn check_own() -> Result<(), MissingCaps> {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return Ok(()) };
    match missing(&status, &NEEDED) {
        Some(lacking) if !lacking.is_empty() => Err(MissingCaps(lacking)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(capeff: &str) -> String {
        format!(
            "Name:\tnetwork-setup\nCapInh:\t0000000000000000\nCapPrm:\t{capeff}\nCapEff:\t{capeff}\nCapBnd:\t000001ffffffffff\n"
        )
    }

    #[test]
    fn reads_the_effective_set() {
        assert_eq!(missing(&status("000001ffffffffff"), &NEEDED), Some(vec![]));
        assert_eq!(missing(&status("0000000000000000"), &NEEDED), Some(vec![CAP_SYS_ADMIN, CAP_NET_ADMIN]));
        // CAP_NET_ADMIN (bit 12) only.
        assert_eq!(missing(&status("0000000000001000"), &NEEDED), Some(vec![CAP_SYS_ADMIN]));
        // CAP_SYS_ADMIN (bit 21) only.
        assert_eq!(missing(&status("0000000000200000"), &NEEDED), Some(vec![CAP_NET_ADMIN]));
        assert_eq!(missing(&status("0000000000201000"), &NEEDED), Some(vec![]));
    }

    #[test]
    fn unreadable_status_is_unknown() {
        assert_eq!(missing("Name:\tx\n", &NEEDED), None);
        assert_eq!(missing(&status("zz"), &NEEDED), None);
        assert_eq!(missing("", &NEEDED), None);
    }

    #[test]
    fn the_message_names_what_is_missing() {
        let m = MissingCaps(vec![CAP_SYS_ADMIN, CAP_NET_ADMIN]).to_string();
        assert!(m.contains("CAP_SYS_ADMIN and CAP_NET_ADMIN"), "{m}");
    }

    #[test]
    fn the_kernel_shows_an_effective_set() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(missing(&status, &NEEDED).is_some(), "no CapEff line in /proc/self/status");
    }
}
