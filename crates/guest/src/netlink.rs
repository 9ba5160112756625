//! Interface configuration over rtnetlink: links, addresses, routes, veth
//! pairs, MTU and MAC.
//!
//! How this works: a [`Netlink`] owns one rtnetlink connection whose socket
//! was opened in a particular network namespace (a netlink socket keeps
//! talking to the namespace it was created in, whatever thread later uses
//! it). [`Netlink::new`] opens it in the calling thread's namespace;
//! [`Netlink::new_in`] opens it on a short-lived thread that entered another
//! namespace, then drives it from the caller's runtime. The connection's
//! task runs on the current tokio runtime; every method is one request and
//! its acknowledgement. Interfaces are named by name and resolved to their
//! index per call. Kernel errors keep their errno (`io::Error`), so callers
//! can tell "no such device" from real failures.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, BorrowedFd};

use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net};
use rtnetlink::packet_route::address::AddressMessage;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::{AddressMessageBuilder, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::netns::NetNs;
use rdnet_wire::Mac;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket")]
    Socket(#[source] io::Error),
    #[error("no interface named {0:?}")]
    NoSuchLink(String),
    #[error("netlink: {op} failed")]
    Request {
        op: String,
        #[source]
        source: io::Error,
    },
}

impl NetlinkError {
    /// The errno of a failed request, if the kernel gave one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            NetlinkError::Request { source, .. } | NetlinkError::Socket(source) => source.raw_os_error(),
            NetlinkError::NoSuchLink(_) => Some(libc::ENODEV),
        }
    }
}

fn to_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

fn req(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let op = op.into();
    move |e| NetlinkError::Request { op, source: to_io(e) }
}

/// What [`Netlink::link_info`] reports about an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub mac: Option<Mac>,
    pub mtu: Option<u32>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
}

impl LinkInfo {
    fn from_message(msg: &LinkMessage) -> LinkInfo {
        let mut info = LinkInfo {
            index: msg.header.index,
            name: String::new(),
            mac: None,
            mtu: None,
            up: msg.header.flags.contains(LinkFlags::Up),
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => info.name = n.clone(),
                LinkAttribute::Mtu(m) => info.mtu = Some(*m),
                LinkAttribute::Address(a) => info.mac = <Mac>::try_from(a.as_slice()).ok(),
                _ => {}
            }
        }
        info
    }
}

/// An rtnetlink connection bound to one network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
}

impl Netlink {
    /// A connection in the calling thread's network namespace. Must be
    /// called inside a tokio runtime (the connection task is spawned on it).
    pub fn new() -> Result<Netlink, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// A connection to the namespace `ns`, usable from the calling thread.
    /// Must be called inside a tokio runtime.
    pub fn new_in(ns: &NetNs) -> Result<Netlink, NetlinkError> {
        use rtnetlink::sys::{AsyncSocket, TokioSocket, protocols::NETLINK_ROUTE};
        let rt = tokio::runtime::Handle::current();
        let socket = ns
            .run(move || {
                let _enter = rt.enter();
                TokioSocket::new(NETLINK_ROUTE)
            })
            .and_then(|r| r)
            .map_err(NetlinkError::Socket)?;
        let (conn, handle, _) = rtnetlink::from_socket(socket);
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// The raw rtnetlink handle, for requests not wrapped here.
    pub fn handle(&self) -> &rtnetlink::Handle {
        &self.handle
    }

    /// Everything about `name`, or `None` if there is no such interface.
    pub async fn link_info(&self, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
        let mut links = self.handle.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(LinkInfo::from_message(&msg))),
            Ok(None) => Ok(None),
            Err(e) => {
                let e = to_io(e);
                if e.raw_os_error() == Some(libc::ENODEV) {
                    Ok(None)
                } else {
                    Err(NetlinkError::Request { op: format!("get link {name}"), source: e })
                }
            }
        }
    }

    pub async fn link_exists(&self, name: &str) -> Result<bool, NetlinkError> {
        Ok(self.link_info(name).await?.is_some())
    }

    /// The index of `name`; [`NetlinkError::NoSuchLink`] if absent.
    pub async fn link_index(&self, name: &str) -> Result<u32, NetlinkError> {
        match self.link_info(name).await? {
            Some(info) => Ok(info.index),
            None => Err(NetlinkError::NoSuchLink(name.to_string())),
        }
    }

    /// Deletes `name`. Returns false if there was no such interface.
    pub async fn delete_link(&self, name: &str) -> Result<bool, NetlinkError> {
        let Some(info) = self.link_info(name).await? else { return Ok(false) };
        match self.handle.link().del(info.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let e = to_io(e);
                if e.raw_os_error() == Some(libc::ENODEV) {
                    Ok(false)
                } else {
                    Err(NetlinkError::Request { op: format!("delete link {name}"), source: e })
                }
            }
        }
    }

    /// Creates the veth pair `name` ↔ `peer`; the peer is created directly
    /// in `peer_netns` when given (else next to `name`). Both start down.
    pub async fn create_veth(
        &self,
        name: &str,
        peer: &str,
        peer_netns: Option<BorrowedFd<'_>>,
    ) -> Result<(), NetlinkError> {
        let mut peer_msg = LinkMessageBuilder::<LinkUnspec>::new().name(peer.to_string());
        if let Some(fd) = peer_netns {
            peer_msg = peer_msg.setns_by_fd(fd.as_raw_fd());
        }
        let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(name.to_string())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg.build())))
            .build();
        self.handle.link().add(msg).execute().await.map_err(req(format!("create veth {name} peer {peer}")))
    }

    /// Moves `name` into the namespace `ns`.
    pub async fn move_to_netns(&self, name: &str, ns: BorrowedFd<'_>) -> Result<(), NetlinkError> {
        let index = self.link_index(name).await?;
        let msg = LinkUnspec::new_with_index(index).setns_by_fd(ns.as_raw_fd()).build();
        self.handle.link().set(msg).execute().await.map_err(req(format!("move {name} to another netns")))
    }

    async fn set_link(
        &self,
        name: &str,
        what: &str,
        f: impl FnOnce(LinkMessageBuilder<LinkUnspec>) -> LinkMessageBuilder<LinkUnspec>,
    ) -> Result<(), NetlinkError> {
        let index = self.link_index(name).await?;
        let msg = f(LinkUnspec::new_with_index(index)).build();
        self.handle.link().set(msg).execute().await.map_err(req(format!("{what} {name}")))
    }

    pub async fn set_up(&self, name: &str) -> Result<(), NetlinkError> {
        self.set_link(name, "set up", |b| b.up()).await
    }

    pub async fn set_down(&self, name: &str) -> Result<(), NetlinkError> {
        self.set_link(name, "set down", |b| b.down()).await
    }

    pub async fn set_mtu(&self, name: &str, mtu: u32) -> Result<(), NetlinkError> {
        self.set_link(name, &format!("set mtu {mtu} on"), |b| b.mtu(mtu)).await
    }

    /// Caps the size of the GSO packets the kernel hands `name` (`ip link
    /// set NAME gso_max_size N`); it applies to IPv4 too.
    pub async fn set_gso_max_size(&self, name: &str, size: u32) -> Result<(), NetlinkError> {
        self.set_link(name, &format!("set gso_max_size {size} on"), |b| {
            b.append_extra_attribute(LinkAttribute::GsoMaxSize(size))
        })
        .await
    }

    pub async fn set_mac(&self, name: &str, mac: Mac) -> Result<(), NetlinkError> {
        self.set_link(name, "set MAC address of", |b| b.address(mac.to_vec())).await
    }

    /// `ip addr add CIDR dev NAME` (fails with `EEXIST` if present).
    pub async fn add_address(&self, name: &str, addr: IpNet) -> Result<(), NetlinkError> {
        let index = self.link_index(name).await?;
        self.handle
            .address()
            .add(index, addr.addr(), addr.prefix_len())
            .execute()
            .await
            .map_err(req(format!("add address {addr} to {name}")))
    }

    /// `ip addr replace CIDR dev NAME`.
    pub async fn replace_address(&self, name: &str, addr: IpNet) -> Result<(), NetlinkError> {
        let index = self.link_index(name).await?;
        self.handle
            .address()
            .add(index, addr.addr(), addr.prefix_len())
            .replace()
            .execute()
            .await
            .map_err(req(format!("replace address {addr} on {name}")))
    }

    /// `ip addr del CIDR dev NAME`. Returns false if it was not there.
    pub async fn del_address(&self, name: &str, addr: IpNet) -> Result<bool, NetlinkError> {
        let index = self.link_index(name).await?;
        let msg: AddressMessage = match addr.addr() {
            IpAddr::V4(a) => {
                AddressMessageBuilder::<Ipv4Addr>::new().index(index).address(a, addr.prefix_len()).build()
            }
            IpAddr::V6(a) => {
                AddressMessageBuilder::<Ipv6Addr>::new().index(index).address(a, addr.prefix_len()).build()
            }
        };
        match self.handle.address().del(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let e = to_io(e);
                if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
                    Ok(false)
                } else {
                    Err(NetlinkError::Request { op: format!("delete address {addr} from {name}"), source: e })
                }
            }
        }
    }

    /// The IPv4 addresses of `name`.
    pub async fn addresses(&self, name: &str) -> Result<Vec<Ipv4Net>, NetlinkError> {
        use rtnetlink::packet_route::address::AddressAttribute;
        let index = self.link_index(name).await?;
        let mut out = Vec::new();
        let mut stream = self.handle.address().get().set_link_index_filter(index).execute();
        while let Some(msg) = stream.try_next().await.map_err(req(format!("list addresses of {name}")))? {
            for attr in &msg.attributes {
                if let AddressAttribute::Address(IpAddr::V4(a)) = attr
                    && let Ok(net) = Ipv4Net::new(*a, msg.header.prefix_len)
                {
                    out.push(net);
                }
            }
        }
        Ok(out)
    }

    /// `ip route add default via GW [dev DEV]`.
    pub async fn add_default_route(&self, gw: Ipv4Addr, dev: Option<&str>) -> Result<(), NetlinkError> {
        let msg = self.default_route(gw, dev, false).await?;
        self.handle.route().add(msg).execute().await.map_err(req(format!("add default route via {gw}")))
    }

    /// `ip route replace default via GW [dev DEV] [onlink]`.
    pub async fn replace_default_route(
        &self,
        gw: Ipv4Addr,
        dev: Option<&str>,
        onlink: bool,
    ) -> Result<(), NetlinkError> {
        let msg = self.default_route(gw, dev, onlink).await?;
        self.handle.route().add(msg).replace().execute().await.map_err(req(format!("replace default route via {gw}")))
    }

    /// `ip route del default via GW [dev DEV]`. Returns false if absent.
    pub async fn del_default_route(&self, gw: Ipv4Addr, dev: Option<&str>) -> Result<bool, NetlinkError> {
        let msg = self.default_route(gw, dev, false).await?;
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let e = to_io(e);
                if e.raw_os_error() == Some(libc::ESRCH) {
                    Ok(false)
                } else {
                    Err(NetlinkError::Request { op: format!("delete default route via {gw}"), source: e })
                }
            }
        }
    }

    async fn default_route(
        &self,
        gw: Ipv4Addr,
        dev: Option<&str>,
        onlink: bool,
    ) -> Result<rtnetlink::packet_route::route::RouteMessage, NetlinkError> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new().gateway(gw);
        if let Some(dev) = dev {
            b = b.output_interface(self.link_index(dev).await?);
        }
        if onlink {
            b = b.onlink();
        }
        Ok(b.build())
    }
}

/// One-shot helpers in the calling thread's namespace (each opens its own
/// connection; keep a [`Netlink`] for more than one request).
pub async fn link_exists(name: &str) -> Result<bool, NetlinkError> {
    Netlink::new()?.link_exists(name).await
}

pub async fn delete_link(name: &str) -> Result<bool, NetlinkError> {
    Netlink::new()?.delete_link(name).await
}

pub async fn create_veth(name: &str, peer: &str, peer_netns: Option<BorrowedFd<'_>>) -> Result<(), NetlinkError> {
    Netlink::new()?.create_veth(name, peer, peer_netns).await
}

pub async fn add_address(name: &str, addr: IpNet) -> Result<(), NetlinkError> {
    Netlink::new()?.add_address(name, addr).await
}

pub async fn set_up(name: &str) -> Result<(), NetlinkError> {
    Netlink::new()?.set_up(name).await
}

pub async fn set_mtu(name: &str, mtu: u32) -> Result<(), NetlinkError> {
    Netlink::new()?.set_mtu(name, mtu).await
}

pub async fn set_mac(name: &str, mac: Mac) -> Result<(), NetlinkError> {
    Netlink::new()?.set_mac(name, mac).await
}

pub async fn add_default_route(gw: Ipv4Addr) -> Result<(), NetlinkError> {
    Netlink::new()?.add_default_route(gw, None).await
}
