//! Finding the guest among the host's VMs, and serving it for as long as the
//! host runs (spec/COMPAT.md §4, Windows).
//!
//! How this works. On Windows host-switch does not know which VM is WSL's:
//! it lists the running compute systems (the registry, see
//! [`crate::hvsock::COMPUTE_SYSTEM_KEY`]) and probes each one's handshake
//! port (6669) once a second until one of them answers with the signature
//! ([`find_vm`]; 300 s by default). The list is read again every second, so
//! a VM that starts after host-switch is found too, and a probe that hangs
//! on one VM does not delay the others. [`discover_and_serve`] then listens
//! on that VM's data port (6656), hands the listener to the caller's accept
//! loop, and runs the handshake module's [`host_handshake_loop`] against the
//! VM: READY, a 10 s wait for the data connection, up to 5 handshakes, and a
//! new handshake whenever the data connection is lost. When the VM itself
//! goes away (it leaves the registry while no data connection is open, or it
//! stops answering for the whole deadline) the search starts over among all
//! VMs, so a restarted WSL, which comes back as a new compute system, is
//! found again without restarting host-switch.
//!
//! Nothing here is Windows-specific: the VM list and the endpoint of a VM's
//! port are parameters, so the tests run it over unix sockets on Linux.

use std::io;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::time::{Instant, interval_at, sleep};
use tracing::{debug, info, warn};

use crate::endpoint::{Endpoint, Listener, listen};
use crate::handshake::{
    DATA_PORT, DataLinks, HANDSHAKE_PORT, HandshakeError, HostTiming, host_handshake_loop, host_probe,
    log_probe_failure,
};

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("no VM answered on port {port} with the signature within {} ({vms} VMs seen)", crate::handshake::Seconds(*.waited))]
    NotFound {
        port: u32,
        waited: Duration,
        vms: usize,
        #[source]
        last: Option<HandshakeError>,
    },
    #[error("cannot listen on {endpoint}")]
    Listen {
        endpoint: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
}

/// Lists the candidate VMs by id. An error counts as an empty list (it is
/// logged): the registry key is missing while no VM runs.
pub trait VmList {
    fn list(&mut self) -> io::Result<Vec<String>>;
}

impl<F: FnMut() -> io::Result<Vec<String>>> VmList for F {
    fn list(&mut self) -> io::Result<Vec<String>> {
        self()
    }
}

fn list_or_empty(vms: &mut dyn VmList) -> Vec<String> {
    match vms.list() {
        Ok(v) => v,
        Err(e) => {
            debug!(error = %e, "listing the VMs failed");
            Vec::new()
        }
    }
}

/// Probes the handshake port of every listed VM once per `t.interval`, each
/// VM on its own (a slow probe delays only its VM), until one answers with
/// `signature` or `t.deadline` passes. Returns that VM's id.
pub async fn find_vm(
    vms: &mut dyn VmList,
    endpoint: &dyn Fn(&str, u32) -> Endpoint,
    signatures: &[String],
    t: &HostTiming,
) -> Result<String, DiscoveryError> {
    let start = Instant::now();
    let deadline = start + t.deadline;
    let mut ticks = interval_at(start, t.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut in_flight: Vec<String> = Vec::new();
    let mut probes = FuturesUnordered::new();
    let mut seen: Vec<String> = Vec::new();
    let mut last: Option<HandshakeError> = None;
    let mut failed: Vec<String> = Vec::new();
    let mut logged_empty = false;
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                if Instant::now() >= deadline {
                    break;
                }
                let listed = list_or_empty(vms);
                if listed.is_empty() && !logged_empty {
                    info!("no VM is running yet; waiting for one");
                    logged_empty = true;
                }
                for vm in listed {
                    if !seen.contains(&vm) {
                        info!(vm = %vm, "probing VM for the guest's handshake");
                        seen.push(vm.clone());
                    }
                    if in_flight.contains(&vm) {
                        continue;
                    }
                    let ep = endpoint(&vm, HANDSHAKE_PORT);
                    in_flight.push(vm.clone());
                    let limit = t.io_timeout;
                    probes.push(async move {
                        let r = host_probe(&ep, signatures, limit).await;
                        (vm, r)
                    });
                }
            }
            Some((vm, result)) = probes.next(), if !probes.is_empty() => {
                in_flight.retain(|v| *v != vm);
                match result {
                    Ok(()) => {
                        info!(vm = %vm, "found the guest: it answered with the signature");
                        return Ok(vm);
                    }
                    Err(e) => {
                        // Why a VM does not answer, once at info level; then
                        // quietly, but for a wrong phrase, which will not fix
                        // itself (once a minute).
                        if matches!(e, HandshakeError::WrongSignature { .. }) {
                            log_probe_failure(&format_args!("VM {vm}"), &e, false);
                        } else if !failed.contains(&vm) {
                            info!(vm = %vm, "no answer from this VM yet: {}", chain(&e));
                            failed.push(vm.clone());
                        } else {
                            debug!(vm = %vm, "probe failed: {}", chain(&e));
                        }
                        last = Some(e);
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    Err(DiscoveryError::NotFound { port: HANDSHAKE_PORT, waited: start.elapsed(), vms: seen.len(), last })
}

/// `e` and its sources, joined with ": ".
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        next = cause.source();
    }
    s
}

/// Returns once `vm` is no longer listed while no data connection is open,
/// checking every `every`.
async fn vm_gone(vms: &mut dyn VmList, vm: &str, links: &DataLinks, every: Duration) {
    loop {
        sleep(every).await;
        if links.counts().live > 0 {
            continue;
        }
        match vms.list() {
            Ok(list) if !list.iter().any(|v| v == vm) => return,
            _ => {}
        }
    }
}

/// Something that keeps accepting on a listener until it is dropped: the
/// caller's accept loop, e.g. a spawned task behind [`AbortOnDrop`].
pub type Server = Box<dyn std::any::Any>;

/// Aborts a spawned task when dropped.
pub struct AbortOnDrop(pub tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Finds the guest's VM ([`find_vm`]), listens on its data port, hands the
/// listener to `serve` (whose accept loop must count data connections in
/// `links`), and pairs with the guest for as long as the host runs; starts
/// over among all VMs when the VM goes away. Returns only on failure: no VM
/// found within the deadline, the data port cannot be listened on
/// (`t.attempts` times in a row), or the handshake module gave up (no data
/// connection after all its attempts).
pub async fn discover_and_serve(
    vms: &mut dyn VmList,
    endpoint: &dyn Fn(&str, u32) -> Endpoint,
    signatures: &[String],
    t: &HostTiming,
    links: &DataLinks,
    serve: &mut dyn FnMut(Listener) -> Server,
) -> DiscoveryError {
    let mut current: Option<(String, Server)> = None;
    let mut listen_failures = 0;
    loop {
        let vm = match find_vm(vms, endpoint, signatures, t).await {
            Ok(vm) => vm,
            Err(e) => return e,
        };
        if current.as_ref().is_none_or(|(v, _)| *v != vm) {
            // Stop accepting for the old VM before listening for the new one.
            drop(current.take());
            let data = endpoint(&vm, DATA_PORT);
            let listener = match listen(&data).await {
                Ok(l) => l,
                // The VM may have gone between the probe and now: look again,
                // a few times.
                Err(source) => {
                    listen_failures += 1;
                    if listen_failures >= t.attempts {
                        return DiscoveryError::Listen { endpoint: data.to_string(), source };
                    }
                    warn!(endpoint = %data, "cannot listen for the guest's data connection ({source}); looking again");
                    sleep(t.interval).await;
                    continue;
                }
            };
            listen_failures = 0;
            info!(endpoint = %data, "listening for the guest's data connection");
            current = Some((vm.clone(), serve(listener)));
        }
        let handshake = endpoint(&vm, HANDSHAKE_PORT);
        tokio::select! {
            e = host_handshake_loop(&handshake, signatures, t, links) => match e {
                HandshakeError::NotFound { .. } => {
                    warn!(vm = %vm, "the guest stopped answering; looking for it among all VMs again");
                }
                other => return other.into(),
            },
            () = vm_gone(vms, &vm, links, t.interval) => {
                warn!(vm = %vm, "the VM is gone; looking for the guest among all VMs again");
            }
        }
    }
}

// Over unix sockets on Linux, over named pipes on Windows (under Wine in CI).
#[cfg(all(test, any(unix, windows)))]
mod tests {
    use super::*;
    use crate::endpoint::dial;
    use crate::handshake::{SIGNATURE, guest_accept_ready};
    use std::cell::RefCell;
    use std::path::PathBuf;
    use std::rc::Rc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::task::{LocalSet, spawn_local};

    const T: Duration = Duration::from_secs(2);

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn dir(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("rdnet-disc-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    fn fast() -> HostTiming {
        HostTiming {
            interval: Duration::from_millis(30),
            deadline: Duration::from_secs(5),
            io_timeout: Duration::from_millis(500),
            data_wait: Duration::from_secs(2),
            attempts: 3,
        }
    }

    /// VM `vm`'s port `port` is the unix socket `dir/vm-port.sock`.
    #[cfg(unix)]
    fn endpoints(dir: PathBuf) -> impl Fn(&str, u32) -> Endpoint {
        move |vm, port| Endpoint::Unix(dir.join(format!("{vm}-{port}.sock")))
    }

    /// VM `vm`'s port `port` is the pipe `rdnet-disc-TEST-PID-vm-port`.
    #[cfg(windows)]
    fn endpoints(dir: PathBuf) -> impl Fn(&str, u32) -> Endpoint {
        let tag = dir.file_name().unwrap().to_string_lossy().into_owned();
        move |vm, port| Endpoint::Npipe(format!("./pipe/{tag}-{vm}-{port}"))
    }

    fn sigs() -> Vec<String> {
        vec![SIGNATURE.to_string()]
    }

    /// A guest that answers probes with `signature` forever.
    async fn prober_target(ep: Endpoint, signature: &'static str) {
        let l = listen(&ep).await.unwrap();
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let _ = s.write_all(signature.as_bytes()).await;
        }
    }

    #[tokio::test]
    async fn finds_the_vm_that_answers_among_others() {
        let d = dir("find");
        let ep = endpoints(d.0.clone());
        // "a" says something else, "b" is not listening, "c" appears late
        // in the list and is the guest; "d" hangs without a word.
        let wrong = "x".repeat(SIGNATURE.len()).leak();
        let a = tokio::spawn(prober_target(ep("a", HANDSHAKE_PORT), wrong));
        let c = tokio::spawn(prober_target(ep("c", HANDSHAKE_PORT), SIGNATURE));
        let silent = listen(&ep("d", HANDSHAKE_PORT)).await.unwrap();
        let mut calls = 0;
        let mut vms = move || {
            calls += 1;
            let mut v = vec!["a".to_string(), "b".to_string(), "d".to_string()];
            if calls > 3 {
                v.push("c".to_string());
            }
            Ok(v)
        };
        let found = find_vm(&mut vms, &ep, &sigs(), &fast()).await.unwrap();
        assert_eq!(found, "c");
        drop(silent);
        a.abort();
        c.abort();
    }

    #[tokio::test]
    async fn gives_up_at_the_deadline() {
        let d = dir("none");
        let ep = endpoints(d.0.clone());
        let t = HostTiming { deadline: Duration::from_millis(300), ..fast() };
        let mut vms = || Ok(vec!["a".to_string()]);
        let e = find_vm(&mut vms, &ep, &sigs(), &t).await.unwrap_err();
        assert!(matches!(e, DiscoveryError::NotFound { vms: 1, last: Some(_), .. }), "{e}");
        let mut none = || Err(io::Error::from(io::ErrorKind::NotFound));
        let e = find_vm(&mut none, &ep, &sigs(), &t).await.unwrap_err();
        assert!(matches!(e, DiscoveryError::NotFound { vms: 0, last: None, .. }), "{e}");
    }

    #[tokio::test]
    async fn gives_up_when_the_data_port_cannot_be_listened_on() {
        let d = dir("nolisten");
        let ep = endpoints(d.0.clone());
        let t = task(prober_target(ep("a", HANDSHAKE_PORT), SIGNATURE));
        // The data port of "a" is somewhere nobody can listen.
        let bad = move |vm: &str, port: u32| {
            if port == DATA_PORT { Endpoint::Npipe("not/a/pipe".into()) } else { ep(vm, port) }
        };
        let mut vms = || Ok(vec!["a".to_string()]);
        let mut serve = |_: Listener| -> Server { Box::new(()) };
        let e = discover_and_serve(&mut vms, &bad, &sigs(), &fast(), &DataLinks::new(), &mut serve).await;
        assert!(matches!(e, DiscoveryError::Listen { .. }), "{e}");
        drop(t);
    }

    fn task(f: impl std::future::Future<Output = ()> + Send + 'static) -> AbortOnDropHandle {
        AbortOnDropHandle(tokio::spawn(f))
    }
    struct AbortOnDropHandle(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDropHandle {
        fn drop(&mut self) {
            self.0.abort();
        }
    }

    /// A guest in VM `vm`: answers the handshake, then dials the data port,
    /// says hello, and returns the open data connection.
    async fn guest(ep: &dyn Fn(&str, u32) -> Endpoint, vm: &str) -> crate::LinkStream {
        let l = listen(&ep(vm, HANDSHAKE_PORT)).await.unwrap();
        guest_accept_ready(&l, SIGNATURE, T).await;
        let mut data = dial(&ep(vm, DATA_PORT)).await.unwrap();
        data.write_all(vm.as_bytes()).await.unwrap();
        data
    }

    #[tokio::test]
    async fn serves_the_guest_and_follows_it_to_a_new_vm() {
        let d = dir("serve");
        let ep = Rc::new(endpoints(d.0.clone()));
        let listed = Rc::new(RefCell::new(vec!["old".to_string(), "b".to_string()]));
        // What the host's accept loop received: the first bytes of each
        // data connection.
        let hellos = Rc::new(RefCell::new(Vec::<String>::new()));
        let links = DataLinks::new();
        LocalSet::new()
            .run_until(async {
                let host = {
                    let (ep, listed, hellos, links) = (ep.clone(), listed.clone(), hellos.clone(), links.clone());
                    spawn_local(async move {
                        let mut vms = move || Ok(listed.borrow().clone());
                        let mut serve = |l: Listener| -> Server {
                            let (hellos, links) = (hellos.clone(), links.clone());
                            let task = spawn_local(async move {
                                loop {
                                    let (mut s, _) = l.accept().await.unwrap();
                                    let open = links.connected();
                                    let hellos = hellos.clone();
                                    spawn_local(async move {
                                        let mut buf = [0u8; 16];
                                        let n = s.read(&mut buf).await.unwrap();
                                        hellos.borrow_mut().push(String::from_utf8_lossy(&buf[..n]).into_owned());
                                        // Serve until the guest hangs up.
                                        let _ = s.read(&mut buf).await;
                                        drop(open);
                                    });
                                }
                            });
                            Box::new(AbortOnDrop(task.abort_handle()))
                        };
                        discover_and_serve(&mut vms, &*ep, &sigs(), &fast(), &links, &mut serve).await
                    })
                };
                // The guest runs in VM "b".
                let conn = tokio::time::timeout(Duration::from_secs(10), guest(&*ep, "b")).await.unwrap();
                assert!(eventually(|| hellos.borrow().len() == 1).await, "no data connection");
                assert_eq!(hellos.borrow()[0], "b");
                // WSL restarts: VM "b" goes away with its link, and the
                // guest comes back as VM "c".
                listed.borrow_mut().retain(|v| v != "b");
                drop(conn);
                listed.borrow_mut().push("c".to_string());
                let conn = tokio::time::timeout(Duration::from_secs(10), guest(&*ep, "c")).await.unwrap();
                assert!(eventually(|| hellos.borrow().len() == 2).await, "no second data connection");
                assert_eq!(hellos.borrow()[1], "c");
                // The old VM's data listener is closed.
                assert!(dial(&ep("b", DATA_PORT)).await.is_err());
                assert!(!host.is_finished());
                drop(conn);
                host.abort();
            })
            .await;
    }

    async fn eventually(mut f: impl FnMut() -> bool) -> bool {
        for _ in 0..200 {
            if f() {
                return true;
            }
            sleep(Duration::from_millis(25)).await;
        }
        false
    }
}
