//! The daemon's side of ProxyDHCP ([`crate::dhcp::Hooks`]): a machine's `dhcp_boot`
//! override from its settings (config entries overlaid by `machines.json`, read per
//! request like the boot configs), the HTTP port URLs name, and the report of every
//! answered or dropped request (logged at debug level, answers also into the boot
//! log; the counters are the server's, on `/metrics`). Also binds the server's
//! ports before READY and runs it as one of the daemon's tasks.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::bootcfg::Mac;
use crate::config::Settings;
use crate::dhcp::{Event, Outcome, Override};
use crate::serve::Daemon;

/// Binds ProxyDHCP's ports when `[dhcp] proxy` is on: before READY, like the other
/// sockets, so a rack that cannot answer refuses to start.
pub fn bind(settings: &Settings) -> anyhow::Result<Option<crate::dhcp::Sockets>> {
    if !settings.dhcp.proxy {
        return Ok(None);
    }
    crate::dhcp::bind()
        .map(Some)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Runs the ProxyDHCP server (when its sockets were bound) as one of the daemon's
/// tasks.
pub fn spawn(
    d: &Arc<Daemon>,
    sockets: Option<crate::dhcp::Sockets>,
    shutdown: &CancellationToken,
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
) {
    let Some(sockets) = sockets else {
        return;
    };
    let settings = d.settings();
    let hooks: Arc<dyn crate::dhcp::Hooks> = Arc::new(DhcpHooks::new(d.clone()));
    let cfg = crate::dhcp::Config {
        interfaces: settings.dhcp.interfaces.clone(),
        uefi_loader: settings.dhcp.uefi_loader,
    };
    let (m, s) = (d.dhcp_metrics.clone(), shutdown.clone());
    tasks.spawn(async move {
        crate::dhcp::serve(sockets, cfg, hooks, m, s)
            .await
            .map_err(|e| anyhow::anyhow!("dhcp server: {e}"))
    });
}

pub struct DhcpHooks {
    d: Arc<Daemon>,
}

impl DhcpHooks {
    pub fn new(d: Arc<Daemon>) -> DhcpHooks {
        DhcpHooks { d }
    }
}

impl crate::dhcp::Hooks for DhcpHooks {
    fn override_for(&self, mac: [u8; 6]) -> Option<Override> {
        let settings = self.d.settings();
        let mac = Mac(mac);
        let state = match crate::machines::load(&settings.state_dir) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("dhcp: {e:#}; using the config's machine settings only");
                Default::default()
            }
        };
        let raw = crate::machines::effective(&settings.machines, &state, &mac).dhcp_boot?;
        // Checked when it was set; a hand-edited machines.json is checked here.
        match Override::parse(&raw) {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::debug!("dhcp: machine {mac}: {e}; offering the default");
                None
            }
        }
    }

    fn http_port(&self, server: Ipv4Addr) -> u16 {
        self.d.http_port_for(IpAddr::V4(server))
    }

    fn answered(&self, e: &Event<'_>) {
        let mac = e
            .mac()
            .map(|m| Mac(m).to_string())
            .unwrap_or_else(|| "?".into());
        let on = e.interface.unwrap_or("?");
        // A boot client's address, whoever it was talking to (its REQUEST to 4011 comes
        // from it; its broadcast REQUEST to the site's server, which the proxy does not
        // answer, names it in option 50): what it asks for over TFTP and HTTP from
        // there is logged under its MAC.
        let boot_client = e.request.filter(|r| r.class.is_some());
        let client_ip = boot_client.and_then(|r| r.client_ip()).map(IpAddr::V4);
        match &e.outcome {
            Outcome::Replied {
                message,
                server,
                boot_file,
            } => {
                tracing::debug!(
                    "dhcp: {message:?} to {mac} ({}) on {on}: server {server}, boot file {boot_file}",
                    e.source
                );
                // The boot log's first step: the offer (which also learns the address).
                if let Some(r) = boot_client {
                    self.d
                        .boots
                        .dhcp_offer(Mac(r.mac), client_ip, r.arch.unwrap_or(0), boot_file);
                }
                return;
            }
            Outcome::Dropped(reason) => tracing::debug!(
                "dhcp: no answer to {mac} ({}, port {:?}): {}",
                e.source,
                e.port,
                reason.label()
            ),
            Outcome::SendFailed => {
                tracing::debug!("dhcp: the reply to {mac} ({}) was not sent", e.source)
            }
        }
        if let (Some(r), Some(ip)) = (boot_client, client_ip) {
            self.d.boots.dhcp_client_ip(Mac(r.mac), ip);
        }
    }
}
