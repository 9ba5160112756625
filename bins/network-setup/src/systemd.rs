//! systemd mode: the distro's network namespace is the one of a unit's main
//! process (Rancher Desktop's `network-namespace.service`), found over the
//! system D-Bus as systemd's own tools do: the Manager's `GetUnit(name)`
//! gives the unit's object path, whose `org.freedesktop.systemd1.Service`
//! property `MainPID` is the process. The bus address is
//! `DBUS_SYSTEM_BUS_ADDRESS` when set, else the standard system socket.
//! One short-lived connection, used before the handshake and then closed.

use std::io;
use std::time::Duration;

use rdnet_guest::netns::NetNs;
use tokio::time::timeout;
use zbus::zvariant::{OwnedObjectPath, OwnedValue};

const DESTINATION: &str = "org.freedesktop.systemd1";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";
const SERVICE: &str = "org.freedesktop.systemd1.Service";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";
const NO_SUCH_UNIT: &str = "org.freedesktop.systemd1.NoSuchUnit";
const SERVICE_UNKNOWN: &str = "org.freedesktop.DBus.Error.ServiceUnknown";
const DEFAULT_SYSTEM_BUS: &str = "unix:path=/var/run/dbus/system_bus_socket";
/// Bound on connecting and on both calls together: systemd answers in
/// milliseconds, a bus that hangs must not hold network-setup forever.
const DBUS_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("cannot connect to the system D-Bus at {address}")]
    Bus {
        address: String,
        #[source]
        source: Box<zbus::Error>,
    },
    #[error("nothing owns {DESTINATION} on the system D-Bus at {address}: is systemd running?")]
    NoSystemd { address: String },
    #[error("systemd has no unit {unit:?} loaded (-namespace-service): {detail}")]
    NoSuchUnit { unit: String, detail: String },
    #[error("asking systemd for the MainPID of {unit} failed")]
    Call {
        unit: String,
        #[source]
        source: Box<zbus::Error>,
    },
    #[error("systemd's MainPID of {unit} is not a number: {value}")]
    BadValue { unit: String, value: String },
    #[error("{unit} is not running (MainPID 0): its main process holds the distro's network namespace")]
    NotRunning { unit: String },
    #[error("cannot open the network namespace of {unit}'s main process (/proc/{pid}/ns/net)")]
    Namespace {
        unit: String,
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("the system D-Bus at {address} did not answer within {}s", DBUS_TIMEOUT.as_secs())]
    Timeout { address: String },
}

/// The address zbus dials for the system bus, for messages.
fn system_bus_address() -> String {
    std::env::var("DBUS_SYSTEM_BUS_ADDRESS").unwrap_or_else(|_| DEFAULT_SYSTEM_BUS.to_string())
}

/// `unit`'s main process and its network namespace.
pub async fn unit_namespace(unit: &str) -> Result<(u32, NetNs), SystemdError> {
    let address = system_bus_address();
    let pid = timeout(DBUS_TIMEOUT, main_pid(unit, &address))
        .await
        .map_err(|_| SystemdError::Timeout { address: address.clone() })??;
    let ns = NetNs::open(std::path::Path::new(&format!("/proc/{pid}/ns/net")))
        .map_err(|source| SystemdError::Namespace { unit: unit.to_string(), pid, source })?;
    Ok((pid, ns))
}

async fn main_pid(unit: &str, address: &str) -> Result<u32, SystemdError> {
    let conn = zbus::Connection::system()
        .await
        .map_err(|source| SystemdError::Bus { address: address.to_string(), source: Box::new(source) })?;
    let call_error = |source: zbus::Error| match &source {
        zbus::Error::MethodError(name, detail, _) if name.as_str() == NO_SUCH_UNIT => {
            SystemdError::NoSuchUnit { unit: unit.to_string(), detail: detail.clone().unwrap_or_default() }
        }
        zbus::Error::MethodError(name, _, _) if name.as_str() == SERVICE_UNKNOWN => {
            SystemdError::NoSystemd { address: address.to_string() }
        }
        _ => SystemdError::Call { unit: unit.to_string(), source: Box::new(source) },
    };
    let reply = conn
        .call_method(Some(DESTINATION), MANAGER_PATH, Some(MANAGER), "GetUnit", &(unit,))
        .await
        .map_err(call_error)?;
    let path: OwnedObjectPath = reply.body().deserialize().map_err(call_error)?;
    let reply = conn
        .call_method(Some(DESTINATION), path.as_str(), Some(PROPERTIES), "Get", &(SERVICE, "MainPID"))
        .await
        .map_err(call_error)?;
    let value: OwnedValue = reply.body().deserialize().map_err(call_error)?;
    let pid = u32::try_from(&value).map_err(|_| {
        // What the bus sent, kept short for the log.
        let value: String = format!("{value:?}").chars().take(80).collect();
        SystemdError::BadValue { unit: unit.to_string(), value }
    })?;
    if pid == 0 {
        return Err(SystemdError::NotRunning { unit: unit.to_string() });
    }
    Ok(pid)
}
