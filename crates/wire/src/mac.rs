//! MAC addresses as people read them (`5a:94:ef:e4:0c:ee`, as Go and
//! iproute2 print them; smoltcp's `Display` uses dashes).

use std::fmt;

/// Displays six bytes as a colon-separated MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacDisplay(pub [u8; 6]);

impl fmt::Display for MacDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colons_and_lower_case() {
        assert_eq!(MacDisplay([0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee]).to_string(), "5a:94:ef:e4:0c:ee");
    }
}
