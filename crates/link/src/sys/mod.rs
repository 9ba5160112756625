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
mod winsock;
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

/// An owner and DACL in SDDL form (what `pipe_security` reads back), taken
/// apart: enough to check who a pipe admits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sddl {
    pub owner: Option<String>,
    /// DACL flags (`P`: protected from inheritance, `AI`, ...).
    pub dacl_flags: String,
    pub aces: Vec<Ace>,
}

/// One access control entry: `(type;flags;rights;;;sid)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ace {
    /// `A` allow, `D` deny, ...
    pub kind: String,
    pub flags: String,
    /// `GA`, `FA` (what GENERIC_ALL becomes on a file object), or hex.
    pub rights: String,
    /// A SID string or an alias (`SY` LocalSystem, `WD` Everyone, ...).
    pub sid: String,
}

impl Sddl {
    /// Parses `O:owner` and `D:flags(ace)(ace)…`; `None` if malformed.
    /// Other parts (`G:`, `S:`) are skipped.
    pub fn parse(s: &str) -> Option<Sddl> {
        let mut owner = None;
        let mut dacl = None;
        let mut rest = s.trim();
        while !rest.is_empty() {
            let (tag, body) = rest.split_at_checked(2)?;
            // A part runs to the next "X:" outside parentheses.
            let mut depth = 0i32;
            let mut end = body.len();
            for (i, c) in body.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    'O' | 'G' | 'D' | 'S' if depth == 0 && body[i + 1..].starts_with(':') => {
                        end = i;
                        break;
                    }
                    _ => {}
                }
            }
            let (part, next) = body.split_at(end);
            match tag {
                "O:" => owner = Some(part.to_string()),
                "D:" => dacl = Some(part),
                "G:" | "S:" => {}
                _ => return None,
            }
            rest = next;
        }
        let dacl = dacl.unwrap_or("");
        let flags_end = dacl.find('(').unwrap_or(dacl.len());
        let (dacl_flags, mut aces_text) = dacl.split_at(flags_end);
        let mut aces = Vec::new();
        while let Some(inner) = aces_text.strip_prefix('(') {
            let close = inner.find(')')?;
            let fields: Vec<&str> = inner[..close].split(';').collect();
            if fields.len() < 6 {
                return None;
            }
            aces.push(Ace {
                kind: fields[0].to_string(),
                flags: fields[1].to_string(),
                rights: fields[2].to_string(),
                sid: fields[5].to_string(),
            });
            aces_text = &inner[close + 1..];
        }
        if !aces_text.is_empty() {
            return None;
        }
        Some(Sddl { owner, dacl_flags: dacl_flags.to_string(), aces })
    }

    /// Whether this admits exactly `user` and LocalSystem: owned by `user`,
    /// a DACL protected from inheritance whose every entry allows full
    /// access to one of the two, and both present.
    pub fn admits_only(&self, user: &str) -> bool {
        let system = |sid: &str| sid == "SY" || sid == "S-1-5-18";
        let full = |r: &str| matches!(r, "GA" | "FA" | "0x1f01ff" | "0x10000000");
        self.owner.as_deref() == Some(user)
            && self.dacl_flags.contains('P')
            && !self.aces.is_empty()
            && self.aces.iter().all(|a| a.kind == "A" && full(&a.rights) && (a.sid == user || system(&a.sid)))
            && self.aces.iter().any(|a| a.sid == user)
            && self.aces.iter().any(|a| system(&a.sid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sddl_parts_and_who_they_admit() {
        let user = "S-1-5-21-1-2-3-1000";
        let ours = Sddl::parse(&format!("O:{user}D:P(A;;FA;;;{user})(A;;FA;;;SY)")).unwrap();
        assert_eq!(ours.owner.as_deref(), Some(user));
        assert_eq!(ours.dacl_flags, "P");
        assert_eq!(ours.aces.len(), 2);
        assert_eq!(ours.aces[1], Ace { kind: "A".into(), flags: "".into(), rights: "FA".into(), sid: "SY".into() });
        assert!(ours.admits_only(user));
        assert!(!ours.admits_only("S-1-5-21-1-2-3-1001"));
        // What a pipe gets without a descriptor of its own, and variations
        // that must not pass.
        for other in [
            format!("O:{user}D:(A;;FA;;;SY)(A;;FA;;;BA)(A;;FA;;;{user})(A;;0x12019b;;;WD)(A;;0x12019b;;;AN)"),
            format!("O:{user}D:(A;;FA;;;{user})(A;;FA;;;SY)"),
            format!("O:BAD:P(A;;FA;;;{user})(A;;FA;;;SY)"),
            format!("O:{user}D:P(A;;FR;;;{user})(A;;FA;;;SY)"),
            format!("O:{user}D:P(A;;FA;;;{user})"),
            format!("O:{user}D:P(D;;FA;;;{user})(A;;FA;;;SY)"),
            format!("O:{user}G:{user}D:P(A;;FA;;;{user})(A;;FA;;;SY)(A;;FA;;;WD)"),
        ] {
            let parsed = Sddl::parse(&other).unwrap();
            assert!(!parsed.admits_only(user), "{other}");
        }
        let grouped = Sddl::parse(&format!("O:{user}G:SYD:P(A;;GA;;;{user})(A;;GA;;;S-1-5-18)")).unwrap();
        assert!(grouped.admits_only(user));
        for bad in ["X:1", "D:P(A;;FA)", "D:P(A;;FA;;;SY", "D:P(A;;FA;;;SY)x"] {
            assert!(Sddl::parse(bad).is_none(), "{bad}");
        }
    }

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
