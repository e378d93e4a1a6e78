//! The boot log: per machine, the recent events of its boots (DHCP offer, each TFTP
//! and HTTP file it asked for with the result, bytes and time, the config rendered)
//! and the last step it reached (firmware → loader → config → kernel → initrd →
//! squashfs). `GET /api/v1/boots[/MAC]`, `rackboot boots`, the Images page and
//! `/metrics` read it.
//!
//! A machine is keyed by its MAC, learned from a DHCP offer or a per-MAC config
//! request (`pxelinux.cfg/01-<mac>`, `grub/grub.cfg-<mac>`, `ipxe.cfg-<mac>`,
//! `boot.ipxe?mac=`); a request from an IP whose MAC is known goes to that MAC.
//! Requests from an IP with no known MAC wait under the IP and are merged into the
//! machine when its MAC is learned.
//!
//! Memory only, bounded: at most [`Caps::events`] events per machine (a ring), and
//! at most [`Caps::machines`] MACs, [`Caps::ips`] IPs waiting for their MAC and
//! [`Caps::ips`] IP→MAC entries, each evicting the least recently seen. Nothing is
//! written to disk.
//!
//! MACs cost an attacker nothing (any DHCP packet or `boot.ipxe?mac=` request names
//! one), so a flood of made-up MACs must not push real machines out. A machine is
//! *established* once a file it asked for (a loader, config, kernel, initrd or
//! squashfs, not a DHCP offer or a HEAD) was served whole; when the log is full, the
//! least recently seen machine that is not established goes first. One client address
//! establishes at most [`Caps::per_source`] machines; past that its MACs stay
//! unestablished (still logged, evicted first) and
//! `rackboot_boot_unestablished_total` counts them. One short mutex guards it all; nothing is allocated or formatted
//! while it is held other than the map and ring entries themselves.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::bootcfg::Mac;
use crate::file_class::FileClass;

/// How far a boot got, in the order a netboot goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// The firmware asked DHCP for a boot file.
    Firmware,
    /// A boot loader (pxelinux.0, shim, GRUB, iPXE, their modules).
    Loader,
    /// A boot config (pxelinux, GRUB, iPXE).
    Config,
    Kernel,
    Initrd,
    Squashfs,
}

impl Step {
    pub const ALL: [Step; 6] = [
        Step::Firmware,
        Step::Loader,
        Step::Config,
        Step::Kernel,
        Step::Initrd,
        Step::Squashfs,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Step::Firmware => "firmware",
            Step::Loader => "loader",
            Step::Config => "config",
            Step::Kernel => "kernel",
            Step::Initrd => "initrd",
            Step::Squashfs => "squashfs",
        }
    }

    /// The step a served file is (none for files outside a boot, such as metadata).
    pub fn of_class(class: FileClass) -> Option<Step> {
        match class {
            FileClass::Kernel => Some(Step::Kernel),
            FileClass::Initrd => Some(Step::Initrd),
            FileClass::Squashfs => Some(Step::Squashfs),
            FileClass::Bootloader => Some(Step::Loader),
            FileClass::Config => Some(Step::Config),
            FileClass::Other => None,
        }
    }
}

/// Which loader's config a request asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Loader {
    Pxelinux,
    Grub,
    Ipxe,
}

impl Loader {
    pub fn label(self) -> &'static str {
        match self {
            Loader::Pxelinux => "pxelinux",
            Loader::Grub => "grub",
            Loader::Ipxe => "ipxe",
        }
    }
}

/// How an event reached the rack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    DhcpOffer,
    Tftp,
    Http,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::DhcpOffer, Kind::Tftp, Kind::Http];

    pub fn label(self) -> &'static str {
        match self {
            Kind::DhcpOffer => "dhcp_offer",
            Kind::Tftp => "tftp",
            Kind::Http => "http",
        }
    }
}

/// One thing a machine did. Also the API's event body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unix milliseconds.
    pub at_ms: u64,
    pub kind: Kind,
    /// The client's address, when known.
    pub ip: Option<IpAddr>,
    /// The path asked for (TFTP, HTTP), or the boot file offered (DHCP).
    pub file: String,
    /// The step this file is, if it is one.
    pub step: Option<Step>,
    /// Whether it was served whole (an offer is ok).
    pub ok: bool,
    /// `ok`, the HTTP status (`404`), `ERROR <code>: <message>` (TFTP), `aborted`.
    pub result: String,
    /// Bytes sent (body bytes for HTTP, payload bytes for TFTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// A boot config was asked for: which loader's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Loader>,
    /// The MAC the config asked for named, or `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_for: Option<String>,
    /// The client architecture of a DHCP request (option 93).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<u16>,
}

/// A machine in `GET /api/v1/boots`: a MAC, or an IP whose MAC is not known yet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BootSummary {
    /// `aa:bb:cc:dd:ee:ff`; `null` for requests from an IP whose MAC is not known.
    pub mac: Option<String>,
    /// The address it used last.
    pub ip: Option<IpAddr>,
    /// Unix seconds.
    pub first_seen: u64,
    pub last_seen: u64,
    /// The furthest step of its current boot that was served (null: none yet).
    pub last_step: Option<Step>,
    /// Events kept (at most `max_events`) and events dropped from the ring.
    pub events: usize,
    pub dropped: u64,
    pub last_event: Option<Event>,
}

/// `GET /api/v1/boots`: machines, most recently seen first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Boots {
    pub machines: Vec<BootSummary>,
    pub max_machines: usize,
    pub max_events: usize,
    /// Machines one client address may establish (protect from eviction).
    #[serde(default)]
    pub max_established_per_source: usize,
}

/// `GET /api/v1/boots/<MAC>`: one machine and its events, oldest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MachineBoots {
    #[serde(flatten)]
    pub summary: BootSummary,
    pub event_list: Vec<Event>,
}

/// The bounds of the log.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    /// Events kept per machine.
    pub events: usize,
    /// MACs kept.
    pub machines: usize,
    /// IPs waiting for their MAC, and IP→MAC entries (each).
    pub ips: usize,
    /// Machines one client address may establish.
    pub per_source: usize,
}

impl Default for Caps {
    fn default() -> Caps {
        Caps {
            events: 64,
            machines: 4096,
            ips: 4096,
            per_source: 8,
        }
    }
}

/// A map that keeps at most `cap` entries, dropping the least recently touched: first
/// among those not marked kept ([`Lru::keep`]), then among the kept.
struct Lru<K, V> {
    /// Value, tick of its last touch, kept.
    map: HashMap<K, (V, u64, bool)>,
    /// Ticks of the entries not kept, and of the kept.
    order: BTreeMap<u64, K>,
    kept: BTreeMap<u64, K>,
    cap: usize,
}

impl<K: Hash + Eq + Clone, V> Lru<K, V> {
    fn new(cap: usize) -> Lru<K, V> {
        Lru {
            map: HashMap::new(),
            order: BTreeMap::new(),
            kept: BTreeMap::new(),
            cap: cap.max(1),
        }
    }

    /// The entry of `k`, made the most recent (`tick` is a fresh, larger number).
    fn touch(&mut self, k: &K, tick: u64) -> Option<&mut V> {
        let (_, t, kept) = self.map.get_mut(k)?;
        let order = if *kept {
            &mut self.kept
        } else {
            &mut self.order
        };
        order.remove(t);
        order.insert(tick, k.clone());
        *t = tick;
        self.map.get_mut(k).map(|(v, _, _)| v)
    }

    /// The entry of `k`, created with `make` if absent (evicting when full).
    fn entry(&mut self, k: K, tick: u64, make: impl FnOnce() -> V) -> &mut V {
        self.entry_evicting(k, tick, make, |_| {})
    }

    /// [`Lru::entry`], handing what it evicts to `evicted`.
    fn entry_evicting(
        &mut self,
        k: K,
        tick: u64,
        make: impl FnOnce() -> V,
        mut evicted: impl FnMut(V),
    ) -> &mut V {
        if self.map.contains_key(&k) {
            self.touch(&k, tick);
        } else {
            while self.map.len() >= self.cap {
                let Some((_, old)) = self.order.pop_first().or_else(|| self.kept.pop_first())
                else {
                    break;
                };
                if let Some((v, _, _)) = self.map.remove(&old) {
                    evicted(v);
                }
            }
            self.order.insert(tick, k.clone());
            self.map.insert(k.clone(), (make(), tick, false));
        }
        &mut self.map.get_mut(&k).expect("just inserted").0
    }

    /// Marks `k` kept: it is evicted only when every entry is kept.
    fn keep(&mut self, k: &K) {
        if let Some((_, t, kept @ false)) = self.map.get_mut(k) {
            *kept = true;
            self.order.remove(t);
            self.kept.insert(*t, k.clone());
        }
    }

    fn is_kept(&self, k: &K) -> bool {
        self.map.get(k).is_some_and(|(_, _, kept)| *kept)
    }

    fn remove(&mut self, k: &K) -> Option<V> {
        let (v, t, kept) = self.map.remove(k)?;
        if kept {
            &mut self.kept
        } else {
            &mut self.order
        }
        .remove(&t);
        Some(v)
    }

    fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k).map(|(v, _, _)| v)
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    /// Entries in no order (no allocation, no sort).
    fn values(&self) -> impl Iterator<Item = &V> {
        self.map.values().map(|(v, _, _)| v)
    }

    /// Entries, most recent first.
    fn recent(&self) -> impl Iterator<Item = (&K, &V)> {
        let mut ticks: Vec<(&u64, &K)> = self.order.iter().chain(self.kept.iter()).collect();
        ticks.sort_unstable_by(|a, b| b.0.cmp(a.0));
        ticks
            .into_iter()
            .filter_map(|(_, k)| self.map.get_key_value(k).map(|(k, (v, _, _))| (k, v)))
    }
}

/// One machine's (or one unknown IP's) record.
struct Machine {
    ip: Option<IpAddr>,
    first_ms: u64,
    last_ms: u64,
    last_step: Option<Step>,
    /// (sequence number, event), oldest first.
    events: VecDeque<(u64, Event)>,
    dropped: u64,
    /// The client address that established it (see the module doc).
    established_by: Option<IpAddr>,
    /// Counted in [`Inner::unestablished`] already.
    refused: bool,
}

impl Machine {
    fn new(at_ms: u64) -> Machine {
        Machine {
            ip: None,
            first_ms: at_ms,
            last_ms: at_ms,
            last_step: None,
            events: VecDeque::new(),
            dropped: 0,
            established_by: None,
            refused: false,
        }
    }

    fn push(&mut self, seq: u64, e: Event, cap: usize) {
        self.last_ms = self.last_ms.max(e.at_ms);
        self.first_ms = self.first_ms.min(e.at_ms);
        if e.ip.is_some() {
            self.ip = e.ip;
        }
        if e.ok {
            self.last_step = advance(self.last_step, e.step);
        }
        if self.events.len() >= cap {
            self.events.pop_front();
            self.dropped += 1;
        }
        self.events.push_back((seq, e));
    }

    fn summary(&self, mac: Option<Mac>) -> BootSummary {
        BootSummary {
            mac: mac.map(|m| m.to_string()),
            ip: self.ip,
            first_seen: self.first_ms / 1000,
            last_seen: self.last_ms / 1000,
            last_step: self.last_step,
            events: self.events.len(),
            dropped: self.dropped,
            last_event: self.events.back().map(|(_, e)| e.clone()),
        }
    }
}

/// The last step after a file of `step` was served: further along, or a new boot (a
/// DHCP offer, or a first-stage loader once the kernel was reached) starting over.
pub fn advance(last: Option<Step>, step: Option<Step>) -> Option<Step> {
    match (last, step) {
        (_, None) => last,
        (None, s) => s,
        (Some(l), Some(s)) if s > l => Some(s),
        (Some(_), Some(Step::Firmware)) => Some(Step::Firmware),
        (Some(l), Some(Step::Loader)) if l >= Step::Kernel => Some(Step::Loader),
        (l, _) => l,
    }
}

struct Inner {
    machines: Lru<Mac, Machine>,
    /// Requests from IPs whose MAC is not known yet.
    pending: Lru<IpAddr, Machine>,
    ip_mac: Lru<IpAddr, Mac>,
    tick: u64,
    /// Machines not established because their client address had established
    /// [`Caps::per_source`] others.
    unestablished: u64,
    /// Established machines in the log by the address that established them (no
    /// zero counts: at most one entry per machine).
    established: HashMap<IpAddr, usize>,
}

/// The boot log of the daemon.
pub struct BootLog {
    inner: Mutex<Inner>,
    caps: Caps,
    /// Events recorded, by [`Kind`] (for `/metrics`).
    pub events_total: [AtomicU64; 3],
}

impl Default for BootLog {
    fn default() -> BootLog {
        BootLog::new(Caps::default())
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A file request's outcome, as the transports report it.
#[derive(Clone, Debug)]
pub enum FileResult {
    /// Sent whole (HTTP: with this status).
    Ok { status: Option<u16> },
    /// HTTP answered with an error status.
    Status(u16),
    /// TFTP ended with an ERROR packet (sent or received).
    TftpError { code: u16, message: String },
    /// The transfer stopped before the end (timeout, client gone).
    Aborted(String),
    /// An HTTP HEAD answered with this status: a probe, which reaches no step.
    Head(u16),
}

/// A file request to record.
pub struct FileEvent<'a> {
    pub kind: Kind,
    pub client: IpAddr,
    /// The cleaned path (no leading `/`); `query` is the HTTP query, if any.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub result: FileResult,
    pub bytes: u64,
    pub duration: Duration,
}

impl BootLog {
    pub fn new(caps: Caps) -> BootLog {
        BootLog {
            inner: Mutex::new(Inner {
                machines: Lru::new(caps.machines),
                pending: Lru::new(caps.ips),
                ip_mac: Lru::new(caps.ips),
                tick: 0,
                unestablished: 0,
                established: HashMap::new(),
            }),
            caps,
            events_total: Default::default(),
        }
    }

    pub fn caps(&self) -> Caps {
        self.caps
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, kind: Kind) {
        let i = Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.events_total[i].fetch_add(1, Ordering::Relaxed);
    }

    /// A DHCP offer (ProxyDHCP) to `mac` (client architecture `arch`, option 93) of
    /// `boot_file`; `client_ip` when the request carried one (ciaddr).
    pub fn dhcp_offer(&self, mac: Mac, client_ip: Option<IpAddr>, arch: u16, boot_file: &str) {
        self.dhcp_offer_at(mac, client_ip, arch, boot_file, SystemTime::now())
    }

    pub fn dhcp_offer_at(
        &self,
        mac: Mac,
        client_ip: Option<IpAddr>,
        arch: u16,
        boot_file: &str,
        now: SystemTime,
    ) {
        let client_ip = client_ip.map(|ip| ip.to_canonical());
        let e = Event {
            at_ms: unix_ms(now),
            kind: Kind::DhcpOffer,
            ip: client_ip,
            file: boot_file.chars().take(256).collect(),
            step: Some(Step::Firmware),
            ok: true,
            result: "offered".into(),
            bytes: None,
            duration_ms: None,
            config: None,
            config_for: None,
            arch: Some(arch),
        };
        self.count(Kind::DhcpOffer);
        let mut g = self.lock();
        if let Some(ip) = client_ip {
            g.learn(ip, mac, &self.caps);
        }
        g.push_mac(mac, e, &self.caps);
    }

    /// `ip` is `mac`'s (seen in DHCP: ciaddr, option 50 of a REQUEST, yiaddr of an
    /// ACK): later requests from it go to `mac`, and those waiting under it move there.
    /// Adds no event.
    pub fn dhcp_client_ip(&self, mac: Mac, ip: IpAddr) {
        self.lock().learn(ip.to_canonical(), mac, &self.caps);
    }

    /// A TFTP or HTTP file request and how it ended.
    pub fn file(&self, f: FileEvent) {
        self.file_at(f, SystemTime::now())
    }

    pub fn file_at(&self, f: FileEvent, now: SystemTime) {
        let client = f.client.to_canonical();
        let config = config_of(f.path, f.query);
        let mut step = match config {
            Some(_) => Some(Step::Config),
            None => Step::of_class(FileClass::of(f.path)),
        };
        let (ok, result) = match &f.result {
            FileResult::Ok { status: None } => (true, "ok".to_string()),
            FileResult::Ok { status: Some(s) } => (true, s.to_string()),
            FileResult::Status(s) => (false, s.to_string()),
            FileResult::TftpError { code, message } => {
                let m: String = message.chars().take(128).collect();
                (false, format!("ERROR {code}: {m}"))
            }
            FileResult::Aborted(why) => (false, format!("aborted: {why}")),
            FileResult::Head(s) => {
                if *s < 400 {
                    step = None;
                }
                (*s < 400, format!("HEAD {s}"))
            }
        };
        let e = Event {
            at_ms: unix_ms(now),
            kind: f.kind,
            ip: Some(client),
            file: f.path.chars().take(256).collect(),
            step,
            ok,
            result,
            bytes: Some(f.bytes),
            duration_ms: Some(f.duration.as_millis() as u64),
            config: config.map(|(l, _)| l),
            config_for: config.map(|(_, m)| match m {
                Some(m) => m.to_string(),
                None => "default".into(),
            }),
            arch: None,
        };
        self.count(f.kind);
        let mut g = self.lock();
        if let Some((_, Some(mac))) = config {
            g.learn(client, mac, &self.caps);
        }
        g.push_ip(client, e, &self.caps);
    }

    /// Every machine, most recently seen first.
    pub fn list(&self) -> Boots {
        let g = self.lock();
        let mut machines: Vec<BootSummary> = g
            .machines
            .recent()
            .map(|(mac, m)| m.summary(Some(*mac)))
            .chain(g.pending.recent().map(|(_, m)| m.summary(None)))
            .collect();
        drop(g);
        machines.sort_by_key(|m| std::cmp::Reverse(m.last_seen));
        Boots {
            machines,
            max_machines: self.caps.machines,
            max_events: self.caps.events,
            max_established_per_source: self.caps.per_source,
        }
    }

    /// One machine and its events.
    pub fn machine(&self, mac: Mac) -> Option<MachineBoots> {
        let g = self.lock();
        let m = g.machines.get(&mac)?;
        Some(MachineBoots {
            summary: m.summary(Some(mac)),
            event_list: m.events.iter().map(|(_, e)| e.clone()).collect(),
        })
    }

    /// How many known machines (MACs) last reached each step (none: not yet any).
    pub fn by_last_step(&self) -> Vec<(Option<Step>, u64)> {
        let g = self.lock();
        let mut counts = [0u64; Step::ALL.len() + 1];
        for m in g.machines.values() {
            let i = match m.last_step {
                Some(s) => Step::ALL.iter().position(|x| *x == s).map_or(0, |i| i + 1),
                None => 0,
            };
            counts[i] += 1;
        }
        drop(g);
        std::iter::once(None)
            .chain(Step::ALL.iter().copied().map(Some))
            .zip(counts)
            .collect()
    }

    /// Machines not established because their client address had established
    /// [`Caps::per_source`] already.
    pub fn unestablished(&self) -> u64 {
        self.lock().unestablished
    }

    /// (MACs, IPs waiting for their MAC, IP→MAC entries): for tests of the bounds.
    pub fn sizes(&self) -> (usize, usize, usize) {
        let g = self.lock();
        (g.machines.len(), g.pending.len(), g.ip_mac.len())
    }
}

impl Inner {
    fn next(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// `ip` is `mac`'s: later requests from it go to `mac`, and what waited under it
    /// joins `mac`'s events (in order).
    fn learn(&mut self, ip: IpAddr, mac: Mac, caps: &Caps) {
        let t = self.next();
        *self.ip_mac.entry(ip, t, || mac) = mac;
        let Some(waiting) = self.pending.remove(&ip) else {
            return;
        };
        let cap = caps.events;
        let t = self.next();
        let established = &mut self.established;
        let m = self.machines.entry_evicting(
            mac,
            t,
            || Machine::new(waiting.first_ms),
            |old| forget(established, &old),
        );
        let mut all: Vec<(u64, Event)> = m.events.drain(..).chain(waiting.events).collect();
        all.sort_by_key(|(seq, _)| *seq);
        let extra = all.len().saturating_sub(cap);
        m.dropped += waiting.dropped + extra as u64;
        m.first_ms = m.first_ms.min(waiting.first_ms);
        m.last_step = None;
        let served = all.iter().any(|(_, e)| establishes(e));
        for (seq, e) in all.into_iter().skip(extra) {
            m.push(seq, e, cap);
        }
        if served {
            self.establish(mac, ip, caps);
        }
    }

    fn push_mac(&mut self, mac: Mac, e: Event, caps: &Caps) {
        let t = self.next();
        let at = e.at_ms;
        let by = e.ip.filter(|_| establishes(&e));
        let established = &mut self.established;
        self.machines
            .entry_evicting(mac, t, || Machine::new(at), |old| forget(established, &old))
            .push(t, e, caps.events);
        if let Some(ip) = by {
            self.establish(mac, ip, caps);
        }
    }

    fn push_ip(&mut self, ip: IpAddr, e: Event, caps: &Caps) {
        let t = self.next();
        if let Some(mac) = self.ip_mac.touch(&ip, t).copied() {
            return self.push_mac(mac, e, caps);
        }
        let at = e.at_ms;
        self.pending
            .entry(ip, t, || Machine::new(at))
            .push(t, e, caps.events);
    }

    /// `mac` was served a file asked for from `ip`: it is established, unless `ip`
    /// established [`Caps::per_source`] others already.
    fn establish(&mut self, mac: Mac, ip: IpAddr, caps: &Caps) {
        if self.machines.is_kept(&mac) {
            return;
        }
        let by_ip = self.established.get(&ip).copied().unwrap_or(0);
        let Some((m, _, _)) = self.machines.map.get_mut(&mac) else {
            return;
        };
        if by_ip >= caps.per_source {
            if !m.refused {
                m.refused = true;
                self.unestablished += 1;
            }
            return;
        }
        m.established_by = Some(ip);
        self.machines.keep(&mac);
        *self.established.entry(ip).or_default() += 1;
    }
}

/// An evicted machine no longer counts for the address that established it.
fn forget(established: &mut HashMap<IpAddr, usize>, old: &Machine) {
    let Some(ip) = old.established_by else {
        return;
    };
    if let Some(n) = established.get_mut(&ip) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            established.remove(&ip);
        }
    }
}

/// Whether `e` establishes its machine: a file past the firmware step served whole.
fn establishes(e: &Event) -> bool {
    e.ok && e.kind != Kind::DhcpOffer && e.step.is_some_and(|s| s > Step::Firmware)
}

/// The loader and MAC of a boot config path (cleaned, no leading `/`), as
/// `serve::boot::dynamic` answers them: `pxelinux.cfg/01-<mac>` (also under
/// `bootloader/pxe/<arch>/`), `grub/grub.cfg-<mac>`, `ipxe.cfg-<mac>`,
/// `boot.ipxe?mac=<mac>`; `None` for the MAC of a default or chain config.
pub fn config_of(path: &str, query: Option<&str>) -> Option<(Loader, Option<Mac>)> {
    let path = path.trim_start_matches('/');
    let path = path.strip_prefix("images/").unwrap_or(path);
    let pxe = path.strip_prefix("pxelinux.cfg/").or_else(|| {
        let rest = path.strip_prefix("bootloader/pxe/")?;
        rest.split_once("/pxelinux.cfg/").map(|(_, n)| n)
    });
    if let Some(name) = pxe {
        return Some((
            Loader::Pxelinux,
            name.strip_prefix("01-").and_then(Mac::parse),
        ));
    }
    // `NAME`, `NAME-<mac>`, `NAME-default…`.
    for (name, loader) in [("grub/grub.cfg", Loader::Grub), ("ipxe.cfg", Loader::Ipxe)] {
        if path == name {
            return Some((loader, None));
        }
        if let Some(rest) = path.strip_prefix(name).and_then(|r| r.strip_prefix('-')) {
            let mac = (!rest.starts_with("default"))
                .then(|| Mac::parse(rest))
                .flatten();
            return Some((loader, mac));
        }
    }
    if path == "boot.ipxe" {
        let mac = query.and_then(|q| {
            q.split('&').find_map(|kv| {
                let v = kv.strip_prefix("mac=")?;
                Mac::parse(&v.replace("%3A", ":").replace("%3a", ":"))
            })
        });
        return Some((Loader::Ipxe, mac));
    }
    None
}

/// An HTTP file request being answered: recorded when its response body is dropped
/// (after its last byte went out, or when the connection ended before that), with
/// the body bytes handed to the connection and the time since the request arrived.
pub struct HttpRequest {
    pub log: std::sync::Arc<BootLog>,
    pub client: IpAddr,
    pub path: String,
    pub query: Option<String>,
    pub started: std::time::Instant,
    /// A HEAD request (logged as a probe).
    pub head: bool,
}

impl HttpRequest {
    /// `resp` with a body that records this request when it is dropped.
    pub fn answer(
        self,
        resp: hyper::Response<crate::http::Body>,
    ) -> hyper::Response<crate::http::Body> {
        use http_body_util::BodyExt as _;
        let status = resp.status().as_u16();
        resp.map(|inner| {
            Logged {
                inner,
                sent: 0,
                ended: false,
                status,
                req: Some(self),
            }
            .boxed()
        })
    }
}

/// A response body that counts what it yields and records its request on drop.
struct Logged {
    inner: crate::http::Body,
    sent: u64,
    ended: bool,
    status: u16,
    req: Option<HttpRequest>,
}

impl hyper::body::Body for Logged {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
            }
            std::task::Poll::Ready(None) => self.ended = true,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let Some(req) = self.req.take() else {
            return;
        };
        let whole = self.ended || hyper::body::Body::is_end_stream(&self.inner);
        let result = if req.head {
            FileResult::Head(self.status)
        } else if self.status >= 400 {
            FileResult::Status(self.status)
        } else if whole {
            FileResult::Ok {
                status: Some(self.status),
            }
        } else {
            FileResult::Aborted(format!("connection ended after {} bytes", self.sent))
        };
        req.log.file(FileEvent {
            kind: Kind::Http,
            client: req.client,
            path: &req.path,
            query: req.query.as_deref(),
            result,
            bytes: self.sent,
            duration: req.started.elapsed(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u32) -> Mac {
        let b = n.to_be_bytes();
        Mac([0x52, 0x54, b[0], b[1], b[2], b[3]])
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn get(log: &BootLog, client: IpAddr, path: &str, result: FileResult, t: u64) {
        log.file_at(
            FileEvent {
                kind: Kind::Http,
                client,
                path,
                query: None,
                result,
                bytes: 10,
                duration: Duration::from_millis(3),
            },
            at(t),
        );
    }

    const OK: FileResult = FileResult::Ok { status: Some(200) };

    #[test]
    fn configs_name_their_loader_and_mac() {
        use Loader::{Grub, Ipxe, Pxelinux};
        let m = Mac::parse("52:54:00:12:34:56");
        let cases = [
            ("pxelinux.cfg/01-52-54-00-12-34-56", Some((Pxelinux, m))),
            (
                "bootloader/pxe/amd64/pxelinux.cfg/01-52-54-00-12-34-56",
                Some((Pxelinux, m)),
            ),
            ("pxelinux.cfg/default", Some((Pxelinux, None))),
            ("grub/grub.cfg-52:54:00:12:34:56", Some((Grub, m))),
            ("grub/grub.cfg-default-x86_64", Some((Grub, None))),
            ("ipxe.cfg-525400123456", Some((Ipxe, m))),
            ("ubuntu/amd64/ga/noble/stable/boot-kernel", None),
        ];
        for (path, want) in cases {
            assert_eq!(config_of(path, None), want, "{path}");
        }
        let query = "arch=x86_64&mac=52%3A54%3A00%3A12%3A34%3A56";
        assert_eq!(config_of("boot.ipxe", Some(query)), Some((Ipxe, m)));
    }

    #[test]
    fn steps_advance_and_a_new_boot_starts_over() {
        use Step::*;
        let mut s = None;
        for (step, want) in [
            (Firmware, Firmware),
            (Loader, Loader),
            (Config, Config),
            (Loader, Config), // a GRUB module after its config
            (Kernel, Kernel),
            (Initrd, Initrd),
            (Config, Initrd),
            (Squashfs, Squashfs),
            (Loader, Loader), // the next boot
            (Kernel, Kernel),
            (Firmware, Firmware),
        ] {
            s = advance(s, Some(step));
            assert_eq!(s, Some(want), "after {step:?}");
        }
        assert_eq!(advance(s, None), s);
    }

    #[test]
    fn requests_wait_under_their_ip_until_the_mac_is_known() {
        let log = BootLog::default();
        let (m, a) = (mac(1), ip(1));
        get(&log, a, "bootx64.efi", OK, 1000);
        get(&log, a, "grubx64.efi", OK, 2000);
        assert_eq!(log.sizes(), (0, 1, 0));
        let l = log.list();
        assert_eq!(l.machines[0].mac, None);
        assert_eq!(l.machines[0].last_step, Some(Step::Loader));
        get(&log, a, &format!("grub/grub.cfg-{m}"), OK, 3000);
        get(&log, a, "x/boot-kernel", OK, 4000);
        get(&log, a, "x/boot-initrd", FileResult::Status(404), 5000);
        assert_eq!(log.sizes(), (1, 0, 1));
        let b = log.machine(m).unwrap();
        let files: Vec<&str> = b.event_list.iter().map(|e| e.file.as_str()).collect();
        assert_eq!(
            files,
            [
                "bootx64.efi",
                "grubx64.efi",
                &format!("grub/grub.cfg-{m}"),
                "x/boot-kernel",
                "x/boot-initrd"
            ]
        );
        assert_eq!(b.summary.last_step, Some(Step::Kernel));
        assert_eq!(b.summary.first_seen, 1);
        assert_eq!(b.summary.ip, Some(a));
        let last = b.summary.last_event.unwrap();
        assert_eq!((last.ok, last.result.as_str()), (false, "404"));
        assert_eq!(b.event_list[2].config, Some(Loader::Grub));
        // A HEAD probe of the squashfs reaches no step; its 404 shows.
        get(&log, a, "x/squashfs", FileResult::Head(200), 6000);
        get(&log, a, "x/squashfs", FileResult::Head(404), 6001);
        let b = log.machine(m).unwrap();
        assert_eq!(b.summary.last_step, Some(Step::Kernel));
        assert_eq!(b.event_list[5].result, "HEAD 200");
        assert_eq!(b.event_list[6].step, Some(Step::Squashfs));
        assert!(!b.event_list[6].ok);
        assert_eq!(
            b.event_list[2].config_for.as_deref(),
            Some(m.to_string().as_str())
        );
    }

    #[test]
    fn dhcp_offers_start_a_boot_and_learn_the_ip() {
        let log = BootLog::default();
        let (m, a) = (mac(2), ip(2));
        log.dhcp_offer_at(m, Some(a), 7, "bootx64.efi", at(1000));
        get(&log, a, "bootx64.efi", OK, 1500);
        let b = log.machine(m).unwrap();
        assert_eq!(b.event_list.len(), 2);
        assert_eq!(b.event_list[0].arch, Some(7));
        assert_eq!(b.summary.last_step, Some(Step::Loader));
        // An address learned from DHCP later: what waited under it moves over.
        let (m3, a3) = (mac(3), ip(3));
        log.dhcp_offer_at(m3, None, 0, "pxelinux.0", at(1000));
        get(&log, a3, "pxelinux.0", FileResult::Status(404), 1100);
        assert_eq!(log.machine(m3).unwrap().event_list.len(), 1);
        log.dhcp_client_ip(m3, a3);
        let b3 = log.machine(m3).unwrap();
        assert_eq!(b3.event_list.len(), 2);
        assert_eq!(b3.summary.last_event.unwrap().result, "404");
        assert_eq!(b3.summary.last_step, Some(Step::Firmware));
        let by = log.by_last_step();
        assert!(by.contains(&(Some(Step::Loader), 1)), "{by:?}");
        assert!(by.contains(&(Some(Step::Firmware), 1)), "{by:?}");
        assert_eq!(log.events_total[0].load(Ordering::Relaxed), 2);
        assert_eq!(log.events_total[2].load(Ordering::Relaxed), 2);
    }

    #[test]
    fn everything_is_bounded() {
        let caps = Caps {
            events: 8,
            machines: 16,
            ips: 16,
            per_source: 2,
        };
        let log = BootLog::new(caps);
        for n in 0..100u32 {
            get(
                &log,
                ip(n),
                &format!("pxelinux.cfg/01-{}", mac(n).dashed()),
                OK,
                n as u64,
            );
            get(&log, ip(1000 + n), "pxelinux.0", OK, n as u64);
        }
        assert_eq!(log.sizes(), (16, 16, 16));
        // The most recent stay.
        assert!(log.machine(mac(99)).is_some());
        assert!(log.machine(mac(0)).is_none());
        let m = mac(99);
        for n in 0..50 {
            get(&log, ip(99), "x/boot-kernel", OK, 1000 + n);
        }
        let b = log.machine(m).unwrap();
        assert_eq!(b.event_list.len(), 8);
        assert_eq!(b.summary.dropped, 43);
        assert_eq!(log.list().machines.len(), 32);
    }

    fn small() -> BootLog {
        BootLog::new(Caps {
            events: 8,
            machines: 16,
            ips: 64,
            per_source: 2,
        })
    }

    /// `mac` boots from `ip`: a config naming it and a kernel, both served.
    fn boot(log: &BootLog, mac: Mac, ip: IpAddr, t: u64) {
        let cfg = format!("pxelinux.cfg/01-{}", mac.dashed());
        get(log, ip, &cfg, OK, t);
        get(log, ip, "x/boot-kernel", OK, t + 1);
    }

    #[test]
    fn a_dhcp_flood_of_made_up_macs_does_not_evict_machines_that_booted() {
        let log = small();
        boot(&log, mac(7), ip(7), 1);
        // Offered but never served a file: evicted first.
        log.dhcp_offer_at(mac(8), None, 7, "shimx64.efi", at(2));
        for n in 0..1000 {
            log.dhcp_offer_at(mac(100 + n), None, 7, "shimx64.efi", at(10 + n as u64));
        }
        assert_eq!(log.sizes().0, 16);
        let m = log.machine(mac(7)).expect("the booted machine is kept");
        assert_eq!(m.summary.last_step, Some(Step::Kernel));
        assert!(log.machine(mac(8)).is_none());
        assert!(log.machine(mac(1099)).is_some());
        // Offers never establish, so none was refused.
        assert_eq!(log.unestablished(), 0);
    }

    #[test]
    fn one_client_address_establishes_at_most_per_source_machines() {
        let log = small();
        boot(&log, mac(500), ip(500), 1);
        // One address claims 50 MACs, each config served whole.
        for n in 0..50 {
            boot(&log, mac(n), ip(1), 10 + 2 * n as u64);
        }
        assert_eq!(log.unestablished(), 48);
        assert_eq!(log.sizes().0, 16);
        // The other client's machine and the first two of that address stay; the
        // rest evict each other, the newest kept.
        for kept in [500, 0, 1, 49] {
            assert!(log.machine(mac(kept)).is_some(), "{kept}");
        }
        assert!(log.machine(mac(2)).is_none());
        // Past the cap, a full log evicts the least recent established machine.
        for n in 0..20 {
            boot(&log, mac(1000 + n), ip(1000 + n), 1000 + 2 * n as u64);
        }
        assert!(log.machine(mac(500)).is_none());
        assert!(log.machine(mac(1019)).is_some());
        assert_eq!(log.sizes().0, 16);
        // Its established machines were evicted with the rest: that address
        // establishes again, and the per-address counts hold only what is in the log.
        assert!(log.machine(mac(0)).is_none() && log.machine(mac(1)).is_none());
        boot(&log, mac(2000), ip(1), 5000);
        assert_eq!(log.unestablished(), 48);
        let g = log.lock();
        let kept = g.machines.map.values().filter(|(_, _, k)| *k).count();
        assert_eq!(g.established.values().sum::<usize>(), kept);
        assert_eq!(g.established.get(&ip(1)), Some(&1));
    }

    #[test]
    fn files_served_before_the_mac_was_known_establish_it() {
        let log = small();
        get(&log, ip(3), "pxelinux.0", OK, 1);
        log.dhcp_client_ip(mac(3), ip(3));
        for n in 0..100 {
            log.dhcp_offer_at(mac(100 + n), None, 0, "pxelinux.0", at(10 + n as u64));
        }
        let m = log.machine(mac(3)).expect("established through its IP");
        assert_eq!(m.summary.last_step, Some(Step::Loader));
        // A HEAD probe or a 404 establishes nothing.
        get(&log, ip(4), "pxelinux.0", FileResult::Head(200), 200);
        get(&log, ip(4), "pxelinux.0", FileResult::Status(404), 201);
        log.dhcp_client_ip(mac(4), ip(4));
        for n in 0..100 {
            log.dhcp_offer_at(mac(300 + n), None, 0, "pxelinux.0", at(300 + n as u64));
        }
        assert!(log.machine(mac(4)).is_none());
    }
}
