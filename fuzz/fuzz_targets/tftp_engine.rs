//! The TFTP transfer engine under an arbitrary client: option values, limits, file
//! size and a sequence of ACKs (right, stale, future), ERRORs and timer expiries come
//! from the input. Properties: no panic; negotiated values within the limits and the
//! timeout cap; every DATA range is a non-empty part of the file no longer than the
//! window; at most two sends before the client's first ACK (reflection bound); nothing
//! after the transfer ended.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rackboot::tftp::engine::{self, Action, Limits, Transfer, FIRST_ACK_RESENDS, MAX_TIMEOUT_SECS};

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let limits = Limits {
        max_blksize: inp.u16().clamp(512, 65464),
        max_windowsize: inp.u16().clamp(1, 256),
        default_timeout: Duration::from_millis(u64::from(inp.u8()) * 20 + 10),
        max_retries: u32::from(inp.u8() % 8),
    };
    let size = u64::from(inp.u32()) >> (inp.u8() % 32);
    let mut opts = Vec::new();
    let flags = inp.u8();
    let value = |inp: &mut Input, kind: u8| match kind % 4 {
        0 => inp.u16().to_string(),
        1 => inp.u32().to_string(),
        2 => format!(" {} ", inp.u8()),
        _ => "99999999999999999999999".to_string(),
    };
    for (bit, name) in [
        (1, "blksize"),
        (2, "windowsize"),
        (4, "timeout"),
        (8, "tsize"),
    ] {
        if flags & bit != 0 {
            let kind = inp.u8();
            opts.push((name.to_string(), value(&mut inp, kind)));
        }
    }
    let n = engine::negotiate(&opts, Some(size), &limits);
    assert!(n.blksize >= 8 && n.blksize <= limits.max_blksize);
    assert!(n.windowsize >= 1 && n.windowsize <= limits.max_windowsize);
    assert!(n.timeout <= Duration::from_secs(MAX_TIMEOUT_SECS).max(limits.default_timeout));
    let mut now = Instant::now();
    let mut t = Transfer::new(size, &n, limits.max_retries, now);
    let mut sends_before_ack = 0u32;
    let mut check = |a: &Action, t: &Transfer, before_ack: bool| {
        if before_ack {
            sends_before_ack += 1;
            assert!(
                sends_before_ack <= 1 + FIRST_ACK_RESENDS,
                "resends before the first ACK"
            );
        }
        if let Action::Send { from, to } = *a {
            assert!(
                from >= 1 && from <= to && to <= t.last(),
                "{from}..={to} of {}",
                t.last()
            );
            assert!(to - from < u64::from(n.windowsize), "more than a window");
            for i in [from, to] {
                let (off, len) = t.block_range(i, size);
                assert!(len <= usize::from(n.blksize) && off <= size);
            }
        }
    };
    let first = t.start(now);
    check(&first, &t, true);
    let mut acked = t.acked();
    for _ in 0..10_000 {
        if inp.0.is_empty() {
            break;
        }
        let op = inp.u8();
        let ended = t.outcome().is_some();
        let before_ack = !t.got_ack();
        let action = match op % 4 {
            0 => t.on_ack(inp.u16(), now),
            // An ACK near the last one sent (the common, progressing case).
            1 => {
                let k = u64::from(inp.u8() % 70);
                t.on_ack(((t.acked() + k) % 65536) as u16, now)
            }
            2 => {
                now += Duration::from_millis(u64::from(inp.u8()) * 50);
                t.on_timeout(now)
            }
            _ => {
                t.on_error();
                None
            }
        };
        if let Some(a) = &action {
            assert!(!ended, "an action after the transfer ended");
            // Sends caused by an ACK come after the address was proven.
            check(a, &t, before_ack && op % 4 == 2);
        }
        assert!(t.acked() >= acked && t.acked() <= t.last());
        acked = t.acked();
    }
});
