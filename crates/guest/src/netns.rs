//! Network namespaces, created and entered without touching the caller's
//! threads.
//!
//! How this works: a thread's network namespace is a per-thread property on
//! Linux, so every operation that needs to be "inside" a namespace happens
//! on a dedicated, short-lived std thread: creating one (`unshare(CLONE_NEWNET)`
//! on that thread, then keeping `/proc/thread-self/ns/net` open, or
//! bind-mounting it under `/run/netns/NAME` as `ip netns add` does), and
//! running a closure in one (`setns` on that thread only, then join). The
//! async workers and the main thread never change namespace. A [`NetNs`] is
//! just an open descriptor of the namespace file; the namespace lives while
//! a descriptor, a bind mount or a process keeps it.
//!
//! Sockets and child processes keep the namespace of the thread that made
//! them: open a socket or spawn a process inside [`NetNs::run`] and it stays
//! in that namespace wherever it is used later.

use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};

/// Where `ip netns` keeps named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// An open network namespace.
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
    path: Option<PathBuf>,
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn open_ns_file(path: &Path) -> io::Result<OwnedFd> {
    let f = OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC).open(path)?;
    Ok(OwnedFd::from(f))
}

/// Runs `f` on a new thread and joins it, re-raising its panic.
fn on_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

impl NetNs {
    /// The calling thread's namespace.
    pub fn current() -> io::Result<NetNs> {
        Ok(NetNs { fd: open_ns_file(Path::new("/proc/thread-self/ns/net"))?, path: None })
    }

    /// A namespace file such as `/proc/PID/ns/net` or `/run/netns/NAME`.
    pub fn open(path: &Path) -> io::Result<NetNs> {
        Ok(NetNs { fd: open_ns_file(path)?, path: Some(path.to_path_buf()) })
    }

    /// The namespace `ip netns` calls `name`.
    pub fn open_named(name: &str) -> io::Result<NetNs> {
        NetNs::open(&named_path(name)?)
    }

    /// A new, anonymous namespace (only `lo`, down). It lives as long as
    /// this value or anything else holding it (a process, a bind mount).
    pub fn new_anonymous() -> io::Result<NetNs> {
        on_thread(|| {
            unshare(CloneFlags::CLONE_NEWNET).map_err(nix_io)?;
            NetNs::current()
        })
    }

    /// A new namespace bound to `/run/netns/NAME`, as `ip netns add NAME`;
    /// fails with `AlreadyExists` if that name is taken.
    pub fn create_named(name: &str) -> io::Result<NetNs> {
        let path = named_path(name)?;
        prepare_run_dir()?;
        // Mount point: an empty file, created exclusively.
        OpenOptions::new().write(true).create_new(true).mode(0o444).open(&path)?;
        let bound = on_thread(|| {
            unshare(CloneFlags::CLONE_NEWNET).map_err(nix_io)?;
            mount(Some("/proc/thread-self/ns/net"), &path, Some("none"), MsFlags::MS_BIND, None::<&str>).map_err(nix_io)
        });
        if let Err(e) = bound {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        NetNs::open(&path)
    }

    /// Removes `/run/netns/NAME` (as `ip netns del`). The namespace itself
    /// goes away once nothing else holds it.
    pub fn delete_named(name: &str) -> io::Result<()> {
        let path = named_path(name)?;
        match umount2(&path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::Error::EINVAL) => {}
            Err(nix::Error::ENOENT) => return Err(io::Error::from(io::ErrorKind::NotFound)),
            Err(e) => return Err(nix_io(e)),
        }
        fs::remove_file(&path)
    }

    /// The file this namespace was opened from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// A second descriptor for the same namespace.
    pub fn try_clone(&self) -> io::Result<NetNs> {
        Ok(NetNs { fd: self.fd.try_clone()?, path: self.path.clone() })
    }

    /// Runs `f` on a dedicated thread that has entered this namespace and
    /// returns its result (a panic in `f` is re-raised here). The calling
    /// thread's namespace is never changed.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        on_thread(|| {
            setns(&self.fd, CloneFlags::CLONE_NEWNET).map_err(nix_io)?;
            Ok(f())
        })
    }

    /// Runs the future made by `f` to completion on a current-thread tokio
    /// runtime on a dedicated thread inside this namespace; netlink
    /// connections and sockets it opens belong to this namespace.
    pub fn block_on<F, Fut>(&self, f: F) -> io::Result<Fut::Output>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future,
        Fut::Output: Send,
    {
        self.run(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            Ok(rt.block_on(f()))
        })?
    }

    /// The namespace's inode number (what `ls -i /proc/PID/ns/net` shows):
    /// equal for two descriptors of the same namespace.
    pub fn inode(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let f = File::from(self.fd.try_clone()?);
        Ok(f.metadata()?.ino())
    }
}

fn named_path(name: &str) -> io::Result<PathBuf> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("invalid netns name {name:?}")));
    }
    Ok(Path::new(NETNS_RUN_DIR).join(name))
}

/// Makes `/run/netns` a shared mount point, as iproute2 does, so the bind
/// mounts made in it propagate to other mount namespaces.
fn prepare_run_dir() -> io::Result<()> {
    fs::create_dir_all(NETNS_RUN_DIR)?;
    let shared =
        || mount(None::<&str>, NETNS_RUN_DIR, Some("none"), MsFlags::MS_SHARED | MsFlags::MS_REC, None::<&str>);
    match shared() {
        Ok(()) => Ok(()),
        Err(nix::Error::EINVAL) => {
            // Not a mount point yet: bind it onto itself first.
            mount(Some(NETNS_RUN_DIR), NETNS_RUN_DIR, Some("none"), MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
                .map_err(nix_io)?;
            shared().map_err(nix_io)
        }
        Err(e) => Err(nix_io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::Netlink;
    use ipnet::Ipv4Net;

    fn root() -> bool {
        let ok = nix::unistd::geteuid().is_root();
        if !ok {
            eprintln!("skipping: needs root");
        }
        ok
    }

    #[test]
    fn anonymous_namespace_is_separate_and_caller_unchanged() {
        if !root() {
            return;
        }
        let before = NetNs::current().unwrap().inode().unwrap();
        let ns = NetNs::new_anonymous().unwrap();
        assert_ne!(ns.inode().unwrap(), before);
        assert_eq!(NetNs::current().unwrap().inode().unwrap(), before, "caller's thread did not move");
        let inside = ns.run(|| NetNs::current().unwrap().inode().unwrap()).unwrap();
        assert_eq!(inside, ns.inode().unwrap());
    }

    #[test]
    fn netlink_helpers_in_a_fresh_namespace() {
        if !root() {
            return;
        }
        let ns = NetNs::new_anonymous().unwrap();
        let peer_ns = NetNs::new_anonymous().unwrap();
        let peer_fd = peer_ns.try_clone().unwrap();
        ns.block_on(|| async move {
            let nl = Netlink::new().unwrap();
            assert!(nl.link_exists("lo").await.unwrap());
            assert!(!nl.link_exists("nope0").await.unwrap());
            nl.set_up("lo").await.unwrap();
            assert!(nl.link_info("lo").await.unwrap().unwrap().up);

            nl.create_veth("vt-a", "vt-b", Some(peer_fd.as_fd())).await.unwrap();
            assert!(nl.link_exists("vt-a").await.unwrap());
            assert!(!nl.link_exists("vt-b").await.unwrap(), "peer went to the other namespace");
            let mac = [0x02, 0, 0, 0, 0, 0x42];
            nl.set_mac("vt-a", mac).await.unwrap();
            nl.set_mtu("vt-a", 9000).await.unwrap();
            nl.add_address("vt-a", "10.9.0.1/24".parse().unwrap()).await.unwrap();
            nl.set_up("vt-a").await.unwrap();
            let info = nl.link_info("vt-a").await.unwrap().unwrap();
            assert_eq!((info.mac, info.mtu, info.up), (Some(mac), Some(9000), true));
            assert_eq!(nl.addresses("vt-a").await.unwrap(), vec!["10.9.0.1/24".parse::<Ipv4Net>().unwrap()]);
            // A second add of the same address fails; replace does not.
            assert!(nl.add_address("vt-a", "10.9.0.1/24".parse().unwrap()).await.is_err());
            nl.replace_address("vt-a", "10.9.0.1/24".parse().unwrap()).await.unwrap();
            nl.add_default_route("10.9.0.254".parse().unwrap(), None).await.unwrap();
            nl.replace_default_route("10.9.0.253".parse().unwrap(), Some("vt-a"), false).await.unwrap();
            assert!(nl.del_default_route("10.9.0.253".parse().unwrap(), Some("vt-a")).await.unwrap());
            assert!(nl.del_address("vt-a", "10.9.0.1/24".parse().unwrap()).await.unwrap());
            assert!(!nl.del_address("vt-a", "10.9.0.1/24".parse().unwrap()).await.unwrap());
            assert!(nl.delete_link("vt-a").await.unwrap());
            assert!(!nl.delete_link("vt-a").await.unwrap());
        })
        .unwrap();
        // From outside, through a connection opened in the peer namespace.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let nl = Netlink::new_in(&peer_ns).unwrap();
            // Deleting vt-a removed its peer too.
            assert!(!nl.link_exists("vt-b").await.unwrap());
            assert!(nl.link_exists("lo").await.unwrap());
        });
    }

    #[test]
    fn named_namespace_create_open_delete() {
        if !root() {
            return;
        }
        let name = format!("rdnet-t{}", std::process::id());
        let ns = NetNs::create_named(&name).unwrap();
        assert!(NetNs::create_named(&name).is_err(), "the name is taken");
        let again = NetNs::open_named(&name).unwrap();
        assert_eq!(ns.inode().unwrap(), again.inode().unwrap());
        NetNs::delete_named(&name).unwrap();
        assert!(!Path::new(NETNS_RUN_DIR).join(&name).exists());
        assert!(NetNs::open_named("a/b").is_err());
    }

    #[test]
    fn spawned_process_lands_in_the_namespace() {
        if !root() {
            return;
        }
        let ns = NetNs::new_anonymous().unwrap();
        let want = ns.inode().unwrap();
        let out = ns.run(|| std::process::Command::new("readlink").arg("/proc/self/ns/net").output()).unwrap();
        let Ok(out) = out else { return };
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.trim(), format!("net:[{want}]"));
    }
}
