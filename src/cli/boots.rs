//! `rackboot boots [MAC]`: the running daemon's boot log (`GET /api/v1/boots[/MAC]`),
//! as a table of machines or one machine's timeline; `--json` prints the API body.
//! The log lives in the daemon's memory only, so there is no offline answer.

use crate::config::Settings;
use crate::serve::bootlog::{BootSummary, Boots, Event, MachineBoots};
use crate::sync::human_bytes;

use super::{daemon_call, daemon_url, print_json, usage, Cli};

pub(super) async fn cmd(
    cli: &Cli,
    settings: &Settings,
    mac: Option<&str>,
    url: Option<&str>,
) -> anyhow::Result<()> {
    let base = daemon_url(settings, url)?;
    let Some(mac) = mac else {
        let v = daemon_call(&base, reqwest::Method::GET, "api/v1/boots", "").await?;
        let boots: Boots = serde_json::from_value(v)
            .map_err(|e| anyhow::anyhow!("{base}: not a rackboot boot log: {e}"))?;
        if cli.json {
            return print_json(&boots);
        }
        print_machines(&boots);
        return Ok(());
    };
    let Some(mac) = crate::bootcfg::Mac::parse(mac) else {
        return Err(usage(format!("{mac:?} is not a MAC address")));
    };
    let path = format!("api/v1/boots/{mac}");
    let v = daemon_call(&base, reqwest::Method::GET, &path, "").await?;
    let m: MachineBoots = serde_json::from_value(v)
        .map_err(|e| anyhow::anyhow!("{base}: not a rackboot boot log: {e}"))?;
    if cli.json {
        return print_json(&m);
    }
    print_machine(&m);
    Ok(())
}

/// `hh:mm:ss.mmm` (UTC) of Unix milliseconds, and the date when it is not today's.
fn clock(ms: u64) -> String {
    let date = httpdate::fmt_http_date(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms - ms % 1000),
    );
    // "Thu, 01 Jan 1970 00:00:00 GMT" → "01 Jan 1970 00:00:00.000"
    let core = date
        .get(5..date.len().saturating_sub(4))
        .unwrap_or(&date)
        .to_string();
    format!("{core}.{:03}", ms % 1000)
}

fn step_of(s: &BootSummary) -> &'static str {
    s.last_step.map_or("none", |s| s.label())
}

fn print_machines(b: &Boots) {
    if b.machines.is_empty() {
        println!("no machine has asked for a boot file since the daemon started");
        return;
    }
    println!(
        "{:<17}  {:<15}  {:<8}  {:<24}  {:<20}  LAST FILE",
        "MAC", "IP", "STEP", "LAST SEEN (UTC)", "RESULT"
    );
    for m in &b.machines {
        let (file, result) = m
            .last_event
            .as_ref()
            .map(|e| (e.file.as_str(), e.result.as_str()))
            .unwrap_or(("", ""));
        println!(
            "{:<17}  {:<15}  {:<8}  {:<24}  {:<20}  {file}",
            m.mac.as_deref().unwrap_or("?"),
            m.ip.map(|i| i.to_string()).unwrap_or_else(|| "?".into()),
            step_of(m),
            clock(m.last_seen * 1000),
            result,
        );
    }
}

fn event_line(e: &Event) -> String {
    let mut line = format!(
        "{}  {:<10}  {:<8}  {:<18}  {}",
        clock(e.at_ms),
        e.kind.label(),
        e.step.map_or("-", |s| s.label()),
        e.result,
        e.file
    );
    if let Some(b) = e.bytes {
        line.push_str(&format!("  {}", human_bytes(b)));
    }
    if let Some(ms) = e.duration_ms {
        line.push_str(&format!(" in {ms} ms"));
    }
    if let Some(l) = e.config {
        line.push_str(&format!(
            "  ({} config for {})",
            l.label(),
            e.config_for.as_deref().unwrap_or("?")
        ));
    }
    if let Some(a) = e.arch {
        line.push_str(&format!("  (client arch {a})"));
    }
    line
}

fn print_machine(m: &MachineBoots) {
    let s = &m.summary;
    println!("machine:    {}", s.mac.as_deref().unwrap_or("?"));
    println!(
        "ip:         {}",
        s.ip.map(|i| i.to_string()).unwrap_or_else(|| "?".into())
    );
    println!("last step:  {}", step_of(s));
    println!(
        "seen:       {} .. {} (UTC)",
        clock(s.first_seen * 1000),
        clock(s.last_seen * 1000)
    );
    if s.dropped > 0 {
        println!("            ({} older events dropped)", s.dropped);
    }
    println!();
    for e in &m.event_list {
        println!("{}", event_line(e));
    }
}
