//! How frames travel between vm-switch and host-switch: codecs, endpoints
//! by URL, async frame I/O, and the vsock handshake.
#![deny(unsafe_code)]

pub mod codec;
pub mod datagram;
pub mod discovery;
pub mod endpoint;
pub mod handshake;
pub mod http_connect;
pub mod hvsock;
#[cfg(unix)]
pub mod hybrid_vsock;
pub mod io;
#[allow(unsafe_code)]
pub mod sys;

pub use codec::{Decoder, FrameError, Framing, MAX_U16_FRAME, encode_frame};
pub use endpoint::{Endpoint, EndpointError, LinkStream, Listener, dial, listen};
pub use io::{FrameReader, FrameWriter, LinkError};
