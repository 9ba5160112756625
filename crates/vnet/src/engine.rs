//! The I/O shell around [`Network`]: VM connections in, frames out.
//!
//! How this works: everything on the packet path runs on one thread (a
//! current-thread tokio runtime with a `LocalSet`), so the network is shared
//! through `Rc<RefCell<…>>` without locks or cross-thread wake-ups. Each VM
//! connection is a port with a reader task and a writer task. The reader
//! decodes every frame one `read` delivered and hands each to the network;
//! frames the network emits are encoded (length prefix and all) straight
//! into the destination port's pending buffer, and that port's writer is
//! woken once; it writes whatever accumulated in one `write`, so a burst
//! costs one syscall per port rather than one per frame. A framing error or
//! I/O error ends only that connection (with a logged reason); its MAC
//! entries leave with its port.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Instant;

use rdnet_link::{Decoder, FrameReader, Framing, LinkError, LinkStream, encode_frame};
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

use crate::network::{FrameSink, Network, Upcall};
use crate::switch::PortId;

/// A port whose peer stops reading may queue at most this much; beyond it,
/// frames for that port are dropped rather than growing memory without end.
pub const MAX_PENDING_PER_PORT: usize = 16 * 1024 * 1024;

struct PortTx {
    pending: Vec<u8>,
    notify: Rc<Notify>,
    closed: bool,
}

struct Ports {
    framing: Framing,
    map: HashMap<PortId, PortTx>,
    overflow_drops: u64,
}

impl FrameSink for Ports {
    fn send(&mut self, port: PortId, frame: &[u8]) {
        let Some(tx) = self.map.get_mut(&port) else { return };
        if tx.closed || tx.pending.len() + frame.len() > MAX_PENDING_PER_PORT {
            self.overflow_drops += 1;
            return;
        }
        let was_empty = tx.pending.is_empty();
        if encode_frame(self.framing, frame, &mut tx.pending).is_ok() && was_empty {
            tx.notify.notify_one();
        }
    }
}

/// The shared state of one host-switch.
pub struct Engine {
    pub net: RefCell<Network>,
    ports: RefCell<Ports>,
    framing: Framing,
}

impl Engine {
    pub fn new(net: Network, framing: Framing) -> Rc<Self> {
        Rc::new(Engine {
            net: RefCell::new(net),
            ports: RefCell::new(Ports { framing, map: HashMap::new(), overflow_drops: 0 }),
            framing,
        })
    }

    pub fn max_frame(&self) -> usize {
        self.net.borrow().cfg.max_frame()
    }

    /// Frames dropped because a port's peer did not keep up.
    pub fn overflow_drops(&self) -> u64 {
        self.ports.borrow().overflow_drops
    }

    /// Number of VM connections being served.
    pub fn port_count(&self) -> usize {
        self.ports.borrow().map.len()
    }

    /// Feeds one frame from `port` into the network.
    pub fn handle_frame(&self, port: PortId, frame: &[u8]) {
        let now = Instant::now();
        let mut net = self.net.borrow_mut();
        let mut ports = self.ports.borrow_mut();
        match net.handle_frame(port, frame, now, &mut *ports) {
            Upcall::None => {}
            Upcall::Ipv4 { .. } => net.stats.drops.not_for_us += 1,
        }
    }

    /// Serves one VM connection until it ends. Must run inside a `LocalSet`.
    pub async fn serve(self: Rc<Self>, stream: LinkStream, peer: String) {
        let port = self.net.borrow_mut().add_port();
        let notify = Rc::new(Notify::new());
        self.ports
            .borrow_mut()
            .map
            .insert(port, PortTx { pending: Vec::with_capacity(64 * 1024), notify: notify.clone(), closed: false });
        tracing::info!(port, %peer, "VM connected");
        let (read_half, mut write_half) = tokio::io::split(stream);

        let writer = {
            let engine = self.clone();
            tokio::task::spawn_local(async move {
                let mut spare = Vec::with_capacity(64 * 1024);
                loop {
                    let closed = {
                        let mut ports = engine.ports.borrow_mut();
                        let Some(tx) = ports.map.get_mut(&port) else { break };
                        std::mem::swap(&mut tx.pending, &mut spare);
                        tx.closed
                    };
                    if !spare.is_empty() {
                        if let Err(e) = write_half.write_all(&spare).await {
                            tracing::warn!(port, error = %e, "writing to VM failed");
                            break;
                        }
                        spare.clear();
                        // Large bursts leave a large buffer; give it back.
                        if spare.capacity() > 4 * 1024 * 1024 {
                            spare = Vec::with_capacity(64 * 1024);
                        }
                        continue;
                    }
                    if closed {
                        break;
                    }
                    notify.notified().await;
                }
                let _ = write_half.shutdown().await;
            })
        };

        let mut reader = FrameReader::new(read_half, Decoder::new(self.framing, self.max_frame()));
        let result = loop {
            match reader.next_frame().await {
                Ok(Some(frame)) => self.handle_frame(port, frame),
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        match &result {
            Ok(()) => tracing::info!(port, %peer, "VM disconnected"),
            Err(LinkError::Frame(e)) => {
                self.net.borrow_mut().stats.drops.link_errors += 1;
                tracing::warn!(port, %peer, error = %e, "closing VM connection: protocol error")
            }
            Err(e) => {
                self.net.borrow_mut().stats.drops.link_errors += 1;
                tracing::warn!(port, %peer, error = %rdnet_link_error_chain(e), "closing VM connection")
            }
        }
        self.net.borrow_mut().remove_port(port);
        if let Some(tx) = self.ports.borrow_mut().map.get_mut(&port) {
            tx.closed = true;
            tx.pending.clear();
            tx.notify.notify_one();
        }
        let _ = writer.await;
        self.ports.borrow_mut().map.remove(&port);
    }
}

fn rdnet_link_error_chain(e: &LinkError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
