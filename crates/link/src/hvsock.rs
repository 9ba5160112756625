//! Names of Hyper-V sockets, as plain cross-platform code (spec/COMPAT.md §4).
//!
//! A Hyper-V socket address is two GUIDs: the VM (a compute system's id, or
//! one of the well-known ids such as the wildcard) and the service. A vsock
//! port P is the service `{P as 8 hex digits}-facb-11e6-bd58-64006a7986d3`,
//! so Linux guests that speak AF_VSOCK reach Windows services and the other
//! way round. The running VMs are the subkeys of the Host Compute Service's
//! volatile store in the registry ([`COMPUTE_SYSTEM_KEY`]); the registry
//! itself is read by the Windows `sys` module, the names are sorted out here
//! ([`parse_compute_systems`]).

use std::fmt;
use std::str::FromStr;

/// A GUID held as the 128-bit number its text spells, most significant digit
/// first: `00001a0d-facb-11e6-bd58-64006a7986d3` is `0x00001a0d_facb_…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Guid(pub u128);

/// The template of vsock-compatible service ids: the port goes in the first
/// 32 bits.
pub const VSOCK_TEMPLATE: Guid = Guid(0x00000000_facb_11e6_bd58_64006a7986d3);
/// Any VM (listening side).
pub const WILDCARD: Guid = Guid(0);
/// Every child partition of this host.
pub const CHILDREN: Guid = Guid(0x90db8b89_0d35_4f79_8ce9_49ea0ac8b7cd);
/// This partition itself.
pub const LOOPBACK: Guid = Guid(0xe0e16197_dd56_4a10_9195_5ee7a155a838);
/// The parent partition (from inside a VM).
pub const PARENT: Guid = Guid(0xa42e7cda_d03f_480c_9cc2_a4de20abb878);
/// The silo host (from inside a container).
pub const SILOHOST: Guid = Guid(0x36bd0c5c_7276_4223_88ba_7d03b654c568);

/// Where the Host Compute Service lists the running compute systems (WSL's
/// VM among them), one subkey per system named by its id, under
/// `HKEY_LOCAL_MACHINE`.
pub const COMPUTE_SYSTEM_KEY: &str =
    r"SOFTWARE\Microsoft\Windows NT\CurrentVersion\HostComputeService\VolatileStore\ComputeSystem";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a GUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")]
pub struct GuidError(pub String);

impl Guid {
    /// The Windows layout: `Data1`, `Data2`, `Data3`, `Data4`.
    pub fn fields(self) -> (u32, u16, u16, [u8; 8]) {
        let v = self.0;
        ((v >> 96) as u32, (v >> 80) as u16, (v >> 64) as u16, (v as u64).to_be_bytes())
    }

    /// The inverse of [`Guid::fields`].
    pub fn from_fields(data1: u32, data2: u16, data3: u16, data4: [u8; 8]) -> Guid {
        Guid(
            (u128::from(data1) << 96)
                | (u128::from(data2) << 80)
                | (u128::from(data3) << 64)
                | u128::from(u64::from_be_bytes(data4)),
        )
    }
}

impl FromStr for Guid {
    type Err = GuidError;

    /// Accepts `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, in either case and
    /// optionally in braces (the registry's and `hcsdiag`'s spellings).
    fn from_str(s: &str) -> Result<Guid, GuidError> {
        let err = || GuidError(s.to_string());
        let inner = match s.strip_prefix('{') {
            Some(rest) => rest.strip_suffix('}').ok_or_else(err)?,
            None => s,
        };
        let b = inner.as_bytes();
        if b.len() != 36 {
            return Err(err());
        }
        let mut v: u128 = 0;
        for (i, &c) in b.iter().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                if c != b'-' {
                    return Err(err());
                }
                continue;
            }
            let digit = (c as char).to_digit(16).ok_or_else(err)?;
            v = (v << 4) | u128::from(digit);
        }
        Ok(Guid(v))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (d1, d2, d3, d4) = self.fields();
        write!(f, "{d1:08x}-{d2:04x}-{d3:04x}-{:02x}{:02x}-", d4[0], d4[1])?;
        d4[2..].iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// The service id of vsock port `port`.
pub fn service_id(port: u32) -> Guid {
    Guid((u128::from(port) << 96) | VSOCK_TEMPLATE.0)
}

/// The vsock port a service id stands for, if it follows the template.
pub fn service_port(service: Guid) -> Option<u32> {
    const LOW: u128 = (1u128 << 96) - 1;
    (service.0 & LOW == VSOCK_TEMPLATE.0).then_some((service.0 >> 96) as u32)
}

/// The VM id in an `hvsock://VM:PORT` endpoint: a GUID, or one of the
/// well-known names `wildcard` (also `*` or empty), `children`, `loopback`,
/// `parent`, `silohost`.
pub fn vm_id(name: &str) -> Result<Guid, GuidError> {
    match name.to_ascii_lowercase().as_str() {
        "" | "*" | "wildcard" | "any" => Ok(WILDCARD),
        "children" => Ok(CHILDREN),
        "loopback" => Ok(LOOPBACK),
        "parent" => Ok(PARENT),
        "silohost" => Ok(SILOHOST),
        _ => name.parse(),
    }
}

/// The compute systems among the subkey names of [`COMPUTE_SYSTEM_KEY`]:
/// names that are GUIDs (in any of the accepted spellings), each once, in the
/// order given. Anything else under the key is not a VM and is skipped.
pub fn parse_compute_systems<I, S>(names: I) -> Vec<Guid>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out: Vec<Guid> = Vec::new();
    for name in names {
        if let Ok(g) = name.as_ref().trim().parse::<Guid>()
            && g != WILDCARD
            && !out.contains(&g)
        {
            out.push(g);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_ids_of_the_wsl_ports() {
        assert_eq!(service_id(6669).to_string(), "00001a0d-facb-11e6-bd58-64006a7986d3");
        assert_eq!(service_id(6656).to_string(), "00001a00-facb-11e6-bd58-64006a7986d3");
        assert_eq!(service_id(u32::MAX).to_string(), "ffffffff-facb-11e6-bd58-64006a7986d3");
        assert_eq!(service_port(service_id(6669)), Some(6669));
        assert_eq!(service_port(service_id(0)), Some(0));
        assert_eq!(service_port(CHILDREN), None);
    }

    #[test]
    fn parses_and_prints() {
        let g: Guid = "{A42E7CDA-D03F-480C-9CC2-A4DE20ABB878}".parse().unwrap();
        assert_eq!(g, PARENT);
        assert_eq!(g.to_string(), "a42e7cda-d03f-480c-9cc2-a4de20abb878");
        assert_eq!("a42e7cda-d03f-480c-9cc2-a4de20abb878".parse::<Guid>().unwrap(), PARENT);
        for bad in [
            "",
            "{}",
            "a42e7cda-d03f-480c-9cc2-a4de20abb87",
            "a42e7cda-d03f-480c-9cc2-a4de20abb8788",
            "a42e7cdad03f-480c-9cc2-a4de20abb878-",
            "a42e7cda-d03f-480c-9cc2-a4de20abb87g",
            "{a42e7cda-d03f-480c-9cc2-a4de20abb878",
            "a42e7cda-d03f-480c-9cc2-a4de20abb878}",
            "+42e7cda-d03f-480c-9cc2-a4de20abb878",
            "a42e7cda-d03f-480c-9cc2-a4de20abb87é",
        ] {
            assert!(bad.parse::<Guid>().is_err(), "{bad}");
        }
    }

    #[test]
    fn windows_field_layout() {
        // As windows-sys' GUID::from_u128 lays it out.
        let (d1, d2, d3, d4) = service_id(6669).fields();
        assert_eq!((d1, d2, d3), (0x1a0d, 0xfacb, 0x11e6));
        assert_eq!(d4, [0xbd, 0x58, 0x64, 0x00, 0x6a, 0x79, 0x86, 0xd3]);
        assert_eq!(Guid::from_fields(d1, d2, d3, d4), service_id(6669));
    }

    #[test]
    fn vm_names() {
        assert_eq!(vm_id("wildcard").unwrap(), WILDCARD);
        assert_eq!(vm_id("*").unwrap(), WILDCARD);
        assert_eq!(vm_id("Parent").unwrap(), PARENT);
        assert_eq!(vm_id("children").unwrap(), CHILDREN);
        assert_eq!(vm_id("loopback").unwrap(), LOOPBACK);
        assert_eq!(vm_id("silohost").unwrap(), SILOHOST);
        assert_eq!(vm_id("00000000-0000-0000-0000-000000000000").unwrap(), WILDCARD);
        assert!(vm_id("wsl").is_err());
    }

    #[test]
    fn compute_system_subkeys() {
        let names = [
            "3F2504E0-4F89-11D3-9A0C-0305E82C3301",
            "{3f2504e0-4f89-11d3-9a0c-0305e82c3301}", // the same VM again
            "HostComputeService",                     // not a compute system
            "  7d3a9a4c-0f3e-4b7e-8f2b-0c1f2e3d4a5b ",
            "00000000-0000-0000-0000-000000000000",
            "",
        ];
        let got: Vec<String> = parse_compute_systems(names).iter().map(Guid::to_string).collect();
        assert_eq!(got, ["3f2504e0-4f89-11d3-9a0c-0305e82c3301", "7d3a9a4c-0f3e-4b7e-8f2b-0c1f2e3d4a5b"]);
        assert!(parse_compute_systems(Vec::<String>::new()).is_empty());
    }
}
