//! A VM for tests of a whole engine without root: one end of a socketpair
//! carrying u16-LE frames, the engine serving the other end as it serves a
//! vm-switch. The tests build and read the frames themselves.

use std::rc::Rc;
use std::time::Duration;

use smoltcp::wire::EthernetAddress;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::shell::{Engine, EngineConfig};
use crate::{NetConfig, Network};

pub(crate) struct TestVm {
    link: UnixStream,
    pub(crate) gateway_mac: EthernetAddress,
}

impl TestVm {
    pub(crate) fn connect(engine: &Rc<Engine>) -> TestVm {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let gateway_mac = engine.net.borrow().cfg.gateway_mac;
        tokio::task::spawn_local(engine.clone().serve(rdnet_link::LinkStream::Unix(theirs), "test".into(), None));
        TestVm { link: ours, gateway_mac }
    }

    /// Sends one Ethernet frame.
    pub(crate) async fn send_frame(&mut self, frame: &[u8]) {
        let mut framed = (frame.len() as u16).to_le_bytes().to_vec();
        framed.extend_from_slice(frame);
        self.link.write_all(&framed).await.unwrap();
    }

    /// The first frame within `wait` that `pick` makes something of (the
    /// frames before it skipped).
    pub(crate) async fn recv_within<T>(
        &mut self,
        wait: Duration,
        mut pick: impl FnMut(&[u8]) -> Option<T>,
    ) -> Option<T> {
        let next = async {
            loop {
                let mut len = [0u8; 2];
                self.link.read_exact(&mut len).await.ok()?;
                let mut frame = vec![0u8; usize::from(u16::from_le_bytes(len))];
                self.link.read_exact(&mut frame).await.ok()?;
                if let Some(t) = pick(&frame) {
                    return Some(t);
                }
            }
        };
        tokio::time::timeout(wait, next).await.ok().flatten()
    }
}

/// Runs `test` in a `LocalSet` on a current-thread runtime, with an engine
/// on `cfg` and `config`.
pub(crate) fn run_engine(cfg: NetConfig, config: EngineConfig, test: impl AsyncFnOnce(Rc<Engine>)) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    tokio::task::LocalSet::new().block_on(&rt, async {
        test(Engine::new(Network::new(cfg), config)).await;
    });
}
