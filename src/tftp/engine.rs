//! One read transfer as a state machine. Pure: no I/O, no clock (`now` is passed in).
//!
//! The driver feeds it client packets and timer expiries and gets back what to send
//! (the OACK, DATA blocks by index) and when to wake up. Blocks are numbered by a
//! 64-bit index internally (1 = the first block) and by `index mod 65536` on the wire,
//! so files over 65535 blocks roll over to block 0 and keep going.
//!
//! Windowed sending (RFC 7440): up to `windowsize` blocks go out, then the engine
//! waits for an ACK. An ACK for a block inside the window slides it there and the next
//! window goes out (a partial ACK resends what followed it); ACKs for blocks already
//! acknowledged or never sent are ignored, so duplicates cannot trigger the Sorcerer's
//! Apprentice. A timeout resends the current window; after `max_retries` timeouts in a
//! row the transfer gives up.
//!
//! Hostile clients: the source address of an RRQ is not proven until the client ACKs
//! something from the transfer port, so before that first ACK the engine resends at
//! most once ([`FIRST_ACK_RESENDS`]) after at most [`FIRST_ACK_WAIT`]: a spoofed RRQ
//! reflects at most two packets to its victim and holds a transfer slot for at most
//! `2 × FIRST_ACK_WAIT`. A negotiated timeout is honoured up to [`MAX_TIMEOUT_SECS`]
//! (the OACK carries the value used), so `timeout=255` cannot pin a slot for minutes.

use std::time::{Duration, Instant};

/// Largest negotiated timeout we honour (RFC 2349 allows 1..=255 s).
pub const MAX_TIMEOUT_SECS: u64 = 10;
/// Longest wait for the first ACK before the one resend, and after it.
pub const FIRST_ACK_WAIT: Duration = Duration::from_millis(2500);
/// Resends before the client's first ACK proves its address.
pub const FIRST_ACK_RESENDS: u32 = 1;

/// Server limits that bound what a client may negotiate.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_blksize: u16,
    pub max_windowsize: u16,
    pub default_timeout: Duration,
    pub max_retries: u32,
}

/// What the transfer settled on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: u16,
    pub windowsize: u16,
    pub timeout: Duration,
    /// The OACK to send: only the options the client asked for and we accept.
    /// `None` when the client sent no acceptable option (plain RFC 1350).
    pub oack: Option<Vec<(String, String)>>,
}

/// RFC 2347/2348/2349/7440 negotiation. `size` is the transfer size when known.
pub fn negotiate(requested: &[(String, String)], size: Option<u64>, limits: &Limits) -> Negotiated {
    let mut n = Negotiated {
        blksize: 512,
        windowsize: 1,
        timeout: limits.default_timeout,
        oack: None,
    };
    let mut oack = Vec::new();
    for (name, value) in requested {
        let v = value.trim();
        match name.as_str() {
            "blksize" => {
                if let Ok(b) = v.parse::<u64>() {
                    if b >= 8 {
                        n.blksize = b.min(u64::from(limits.max_blksize)).min(65464) as u16;
                        oack.push((name.clone(), n.blksize.to_string()));
                    }
                }
            }
            "windowsize" => {
                if let Ok(w) = v.parse::<u64>() {
                    if w >= 1 {
                        n.windowsize = w.min(u64::from(limits.max_windowsize)).min(65535) as u16;
                        oack.push((name.clone(), n.windowsize.to_string()));
                    }
                }
            }
            "timeout" => {
                if let Ok(t) = v.parse::<u64>() {
                    if (1..=255).contains(&t) {
                        let used = t.min(MAX_TIMEOUT_SECS);
                        n.timeout = Duration::from_secs(used);
                        oack.push((name.clone(), used.to_string()));
                    }
                }
            }
            "tsize" => {
                // In a read request tsize is 0; we answer with the size if we know it.
                if let Some(s) = size {
                    oack.push((name.clone(), s.to_string()));
                }
            }
            _ => {} // unknown options are ignored (RFC 2347)
        }
    }
    if !oack.is_empty() {
        n.oack = Some(oack);
    }
    n
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    SendOack,
    /// Send DATA for block indexes `from..=to` (wire number = index mod 65536).
    Send {
        from: u64,
        to: u64,
    },
}

/// How a transfer ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Timeout,
    /// The client sent an ERROR after our OACK and before any DATA: a size probe.
    TsizeProbe,
    /// The client sent an ERROR during the transfer.
    Aborted,
}

/// A read transfer of `size` bytes.
#[derive(Debug)]
pub struct Transfer {
    blksize: u64,
    window: u64,
    timeout: Duration,
    max_retries: u32,
    /// Index of the last block (a file that is a multiple of blksize ends with an
    /// empty block).
    last: u64,
    /// Highest index acknowledged (0 = none; ACK 0 answers the OACK).
    acked: u64,
    /// Highest index sent so far.
    sent: u64,
    oack: bool,
    /// The client has ACKed something (its address is proven).
    got_ack: bool,
    retries: u32,
    deadline: Instant,
    outcome: Option<Outcome>,
}

impl Transfer {
    pub fn new(size: u64, n: &Negotiated, max_retries: u32, now: Instant) -> Transfer {
        let blksize = u64::from(n.blksize.max(1));
        Transfer {
            blksize,
            window: u64::from(n.windowsize.max(1)),
            timeout: n.timeout,
            max_retries,
            last: size / blksize + 1,
            acked: 0,
            sent: 0,
            oack: n.oack.is_some(),
            got_ack: false,
            retries: 0,
            deadline: now + n.timeout.min(FIRST_ACK_WAIT),
            outcome: None,
        }
    }

    /// The first packets to send.
    pub fn start(&mut self, now: Instant) -> Action {
        self.deadline = now + self.wait();
        if self.oack {
            Action::SendOack
        } else {
            self.send_window()
        }
    }

    /// How long to wait for the client before resending.
    fn wait(&self) -> Duration {
        if self.got_ack {
            self.timeout
        } else {
            self.timeout.min(FIRST_ACK_WAIT)
        }
    }

    /// Whether the client has ACKed anything yet.
    pub fn got_ack(&self) -> bool {
        self.got_ack
    }

    fn send_window(&mut self) -> Action {
        let from = self.acked + 1;
        let to = (self.acked + self.window).min(self.last);
        self.sent = self.sent.max(to);
        Action::Send { from, to }
    }

    /// Byte range of block `index`: `(offset, len)`.
    pub fn block_range(&self, index: u64, size: u64) -> (u64, usize) {
        let off = index.saturating_sub(1).saturating_mul(self.blksize);
        let len = size.saturating_sub(off).min(self.blksize);
        (off, len as usize)
    }

    pub fn blksize(&self) -> usize {
        self.blksize as usize
    }

    /// When the driver must call [`Transfer::on_timeout`] next.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome
    }

    /// Blocks acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// An ACK arrived. Returns what to send next, if anything.
    pub fn on_ack(&mut self, wire: u16, now: Instant) -> Option<Action> {
        if self.outcome.is_some() {
            return None;
        }
        // Which index in (acked, sent] has this wire number? (OACK stage: only 0.)
        let index = if self.sent == 0 {
            if wire != 0 || !self.oack {
                return None;
            }
            0
        } else {
            let base = self.acked + 1;
            let Some(i) = (base..=self.sent).find(|i| (*i % 65536) as u16 == wire) else {
                return None; // stale, duplicate, or never sent: ignore
            };
            i
        };
        self.acked = index;
        self.got_ack = true;
        self.retries = 0;
        self.deadline = now + self.timeout;
        if self.acked == self.last {
            self.outcome = Some(Outcome::Ok);
            return None;
        }
        // Full window acknowledged, or a partial ACK: (re)send from acked+1.
        Some(self.send_window())
    }

    /// The client sent an ERROR packet.
    pub fn on_error(&mut self) {
        if self.outcome.is_none() {
            self.outcome = Some(if self.sent == 0 && self.oack {
                Outcome::TsizeProbe
            } else {
                Outcome::Aborted
            });
        }
    }

    /// The deadline passed without progress. Returns what to resend, if anything.
    pub fn on_timeout(&mut self, now: Instant) -> Option<Action> {
        if self.outcome.is_some() || now < self.deadline {
            return None;
        }
        self.retries += 1;
        let allowed = if self.got_ack {
            self.max_retries
        } else {
            self.max_retries.min(FIRST_ACK_RESENDS)
        };
        if self.retries > allowed {
            self.outcome = Some(Outcome::Timeout);
            return None;
        }
        self.deadline = now + self.wait();
        if self.sent == 0 && self.oack {
            return Some(Action::SendOack);
        }
        Some(self.send_window())
    }

    /// Index of the last block of the transfer.
    pub fn last(&self) -> u64 {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_blksize: 1468,
            max_windowsize: 64,
            default_timeout: Duration::from_secs(1),
            max_retries: 3,
        }
    }

    fn opts(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn negotiation_only_answers_what_was_asked() {
        let l = limits();
        let n = negotiate(&[], Some(10), &l);
        assert_eq!((n.blksize, n.windowsize, n.oack.clone()), (512, 1, None));
        let n = negotiate(
            &opts(&[
                ("blksize", "65464"),
                ("tsize", "0"),
                ("windowsize", "1000"),
                ("foo", "1"),
            ]),
            Some(77),
            &l,
        );
        assert_eq!(n.blksize, 1468);
        assert_eq!(n.windowsize, 64);
        assert_eq!(
            n.oack.unwrap(),
            opts(&[("blksize", "1468"), ("tsize", "77"), ("windowsize", "64")])
        );
        let n = negotiate(
            &opts(&[
                ("blksize", "4"),
                ("timeout", "0"),
                ("blksize", "99999999999999999999999"),
            ]),
            None,
            &l,
        );
        assert_eq!(n.oack, None, "invalid values are ignored, not answered");
        assert_eq!(n.blksize, 512);
        let n = negotiate(&opts(&[("timeout", "3")]), None, &l);
        assert_eq!(n.timeout, Duration::from_secs(3));
    }

    /// What a client asking for `bs` and `ws` gets for a file of `size` bytes.
    fn negotiate_sizes(size: u64, bs: u16, ws: u16) -> Negotiated {
        let asked = opts(&[
            ("blksize", &bs.to_string()),
            ("windowsize", &ws.to_string()),
        ]);
        negotiate(&asked, Some(size), &limits())
    }

    fn run_lossless(size: u64, bs: u16, ws: u16) -> (Outcome, u64) {
        let now = Instant::now();
        let n = negotiate_sizes(size, bs, ws);
        let mut t = Transfer::new(size, &n, 3, now);
        let mut actions = vec![t.start(now)];
        let mut received = 0u64;
        let mut next = 1u64;
        let mut steps = 0;
        while t.outcome().is_none() {
            steps += 1;
            assert!(steps < 1_000_000);
            let mut acks = vec![];
            for a in actions.drain(..) {
                match a {
                    Action::SendOack => acks.push(0u16),
                    Action::Send { from, to } => {
                        for i in from..=to {
                            if i == next {
                                received += t.block_range(i, size).1 as u64;
                                next += 1;
                            }
                        }
                        acks.push(((next - 1) % 65536) as u16);
                    }
                }
            }
            for a in acks {
                actions.extend(t.on_ack(a, now));
            }
        }
        (t.outcome().unwrap(), received)
    }

    #[test]
    fn transfers_complete_including_rollover_and_exact_multiples() {
        assert_eq!(run_lossless(0, 512, 1), (Outcome::Ok, 0));
        assert_eq!(run_lossless(1024, 512, 1), (Outcome::Ok, 1024));
        assert_eq!(run_lossless(1000, 512, 4), (Outcome::Ok, 1000));
        // More than 65535 blocks: wire numbers wrap to 0.
        let big = 70_000 * 8 + 3;
        assert_eq!(run_lossless(big, 8, 16), (Outcome::Ok, big));
    }

    #[test]
    fn tsize_probe_stale_acks_and_timeouts() {
        let now = Instant::now();
        let l = limits();
        let n = negotiate(
            &opts(&[("tsize", "0"), ("blksize", "1468")]),
            Some(5000),
            &l,
        );
        let mut t = Transfer::new(5000, &n, 3, now);
        assert_eq!(t.start(now), Action::SendOack);
        t.on_error();
        assert_eq!(t.outcome(), Some(Outcome::TsizeProbe));

        let n = negotiate(&opts(&[("windowsize", "4")]), Some(512 * 10), &l);
        let mut t = Transfer::new(512 * 10, &n, 2, now);
        assert_eq!(t.start(now), Action::SendOack);
        assert_eq!(t.on_ack(0, now), Some(Action::Send { from: 1, to: 4 }));
        assert_eq!(t.on_ack(9, now), None, "ACK for a block never sent");
        assert_eq!(
            t.on_ack(2, now),
            Some(Action::Send { from: 3, to: 6 }),
            "partial ACK resends"
        );
        assert_eq!(t.on_ack(2, now), None, "duplicate ACK ignored");
        assert_eq!(t.on_ack(1, now), None, "stale ACK ignored");
        let later = now + Duration::from_secs(2);
        assert_eq!(t.on_timeout(now), None, "not yet");
        assert_eq!(t.on_timeout(later), Some(Action::Send { from: 3, to: 6 }));
        let later = later + Duration::from_secs(2);
        assert_eq!(t.on_timeout(later), Some(Action::Send { from: 3, to: 6 }));
        let later = later + Duration::from_secs(2);
        assert_eq!(t.on_timeout(later), None);
        assert_eq!(t.outcome(), Some(Outcome::Timeout));
    }

    #[test]
    fn timeout_is_capped_and_unacknowledged_transfers_resend_once() {
        let now = Instant::now();
        let n = negotiate(&opts(&[("timeout", "255")]), Some(5000), &limits());
        assert_eq!(n.timeout, Duration::from_secs(MAX_TIMEOUT_SECS));
        assert_eq!(
            n.oack.clone().unwrap(),
            opts(&[("timeout", &MAX_TIMEOUT_SECS.to_string())]),
            "the OACK carries the timeout used"
        );
        // No ACK ever: one resend after FIRST_ACK_WAIT, then the transfer ends.
        let mut t = Transfer::new(5000, &n, 5, now);
        assert_eq!(t.start(now), Action::SendOack);
        assert_eq!(t.deadline(), now + FIRST_ACK_WAIT);
        let later = now + FIRST_ACK_WAIT;
        assert_eq!(t.on_timeout(later), Some(Action::SendOack));
        let later = later + FIRST_ACK_WAIT;
        assert_eq!(t.on_timeout(later), None);
        assert_eq!(t.outcome(), Some(Outcome::Timeout));
        // Plain RFC 1350: at most two DATA packets before the first ACK.
        let n = negotiate(&[], Some(5000), &limits());
        let mut t = Transfer::new(5000, &n, 5, now);
        assert_eq!(t.start(now), Action::Send { from: 1, to: 1 });
        let later = now + Duration::from_secs(1);
        assert_eq!(t.on_timeout(later), Some(Action::Send { from: 1, to: 1 }));
        assert_eq!(t.on_timeout(later + Duration::from_secs(1)), None);
        // Once the client ACKed, the full retry budget and timeout apply.
        let n = negotiate(&opts(&[("timeout", "8")]), Some(5000), &limits());
        let mut t = Transfer::new(5000, &n, 3, now);
        t.start(now);
        assert_eq!(t.on_ack(0, now), Some(Action::Send { from: 1, to: 1 }));
        assert_eq!(t.deadline(), now + Duration::from_secs(8));
        let mut at = now;
        for _ in 0..3 {
            at += Duration::from_secs(8);
            assert_eq!(t.on_timeout(at), Some(Action::Send { from: 1, to: 1 }));
        }
        assert_eq!(t.on_timeout(at + Duration::from_secs(8)), None);
    }

    /// A lossy, duplicating, reordering channel between the engine and a client.
    fn lossy(size: u64, bs: u16, ws: u16, seed: u64) -> Result<(), String> {
        let mut rng = seed | 1;
        let mut rand = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut now = Instant::now();
        let n = negotiate_sizes(size, bs, ws);
        let mut t = Transfer::new(size, &n, 50, now);
        let mut to_client: Vec<Option<u64>> = vec![]; // None = OACK
        let mut to_server: Vec<u16> = vec![];
        let mut got: Vec<u8> = vec![];
        let mut next = 1u64;
        let mut rrqs = 1;
        let bsz = u64::from(bs);
        let data = |i: u64| -> Vec<u8> {
            let off = (i - 1) * bsz;
            let end = (off + bsz).min(size);
            (off..end).map(|b| (b * 31 % 251) as u8).collect()
        };
        let push = |act: Option<Action>, q: &mut Vec<Option<u64>>| match act {
            None => {}
            Some(Action::SendOack) => q.push(None),
            Some(Action::Send { from, to }) => q.extend((from..=to).map(Some)),
        };
        push(Some(t.start(now)), &mut to_client);
        for _ in 0..200_000 {
            // The engine gives up early on a client that never ACKed (its address is
            // unproven); a real client then retransmits its RRQ, which starts afresh.
            if t.outcome() == Some(Outcome::Timeout) && !t.got_ack() && rrqs < 20 {
                rrqs += 1;
                t = Transfer::new(size, &n, 50, now);
                (to_client, to_server) = (vec![], vec![]);
                push(Some(t.start(now)), &mut to_client);
            }
            if t.outcome().is_some() {
                break;
            }
            // Deliver a random packet from either queue, or let time pass.
            match rand() % 10 {
                0..=4 if !to_client.is_empty() => {
                    let i = (rand() as usize) % to_client.len();
                    let p = to_client.remove(i);
                    if rand() % 10 == 0 {
                        continue; // lost
                    }
                    if rand() % 10 == 0 {
                        to_client.push(p); // duplicated
                    }
                    match p {
                        None => to_server.push(0),
                        Some(idx) => {
                            if idx == next {
                                got.extend(data(idx));
                                next += 1;
                            }
                            to_server.push(((next - 1) % 65536) as u16);
                        }
                    }
                }
                5..=8 if !to_server.is_empty() => {
                    let i = (rand() as usize) % to_server.len();
                    let a = to_server.remove(i);
                    if rand() % 10 == 0 {
                        continue;
                    }
                    push(t.on_ack(a, now), &mut to_client);
                }
                _ => {
                    now += Duration::from_millis(300);
                    push(t.on_timeout(now), &mut to_client);
                }
            }
        }
        if t.outcome() != Some(Outcome::Ok) {
            return Err(format!(
                "outcome {:?} after {} blocks",
                t.outcome(),
                next - 1
            ));
        }
        let want: Vec<u8> = (0..size).map(|b| (b * 31 % 251) as u8).collect();
        if got != want {
            return Err("client bytes differ".into());
        }
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        #[test]
        fn completes_under_loss_duplication_and_reordering(
            blocks in 0u64..40, extra in 0u64..3, bs in proptest::sample::select(vec![8u16, 512, 1468]),
            ws in 1u16..9, seed in proptest::num::u64::ANY,
        ) {
            let size = blocks * u64::from(bs) + if extra == 0 { 0 } else { extra % u64::from(bs) };
            proptest::prop_assert_eq!(lossy(size, bs, ws, seed), Ok(()));
        }
    }
}
