//! The image check's A/B update part: after the first boot and the recovery boot, the
//! same disk boots again (reboots allowed) and is updated with RAUC from a plain HTTP
//! server on the host (`python3 -m http.server` serving `<target dir>/image/updates/`,
//! reached from the guest as 10.0.2.2):
//!
//! 1. `rackboot-update http://10.0.2.2:PORT/v2` over SSH (signed SHA256SUMS, bundle,
//!    `rauc install` into slot B), a reboot, and the API must report v2's version
//!    (the same source built with `RACKBOOT_VERSION_SUFFIX`); rackboot-healthy marks
//!    slot B good; the synced snapshot is still there (same generation, the kernel
//!    with the upstream's sha256) and v2's first sync fetched no payload byte;
//! 2. v3 (v2 with a config rackboot refuses) into slot A and a reboot: rackboot cannot
//!    start, rackboot-healthy gives up and reboots, three times; GRUB then boots
//!    slot B by itself, the API answers with v2's version again, and the journal
//!    (persistent on the data partition, read over SSH) says why v3 failed.
//!
//! Every wait is bounded; QEMU and the HTTP server are killed by PID on every path.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{
    boot, free_port, http_get, serial_text, sha256_bytes, ssh, ssh_bounded, BootOpts, Vm,
    BOOT_FAILURES, BOOT_TIMEOUT, SYNC_TIMEOUT, V2_SUFFIX,
};
use crate::proc::Guard;

/// Fetching and installing one bundle under TCG (download, two hash passes, slot write).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(1500);
/// Three failed tries of v3 (boot, rackboot-healthy's 90 s, reboot) and the fallback.
const FALLBACK_TIMEOUT: Duration = Duration::from_secs(1800);
/// rackboot-healthy's confirmation after the API first answers.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(300);
/// Unconfirmed boots GRUB allows a slot (images/appliance/boot/esp-grub.cfg).
const TRIES: usize = 3;

/// What the first boot left for this part.
pub(super) struct Setup<'a> {
    pub dir: &'a Path,
    pub disk: &'a Path,
    pub key: &'a Path,
    pub kernel_path: &'a str,
    pub want_sha: &'a str,
    /// The snapshot generation the first boot synced.
    pub generation: u64,
}

/// The status JSON's version and generation.
fn version_and_generation(fwd: u16) -> Option<(String, Option<u64>)> {
    let body = http_get(&format!("http://127.0.0.1:{fwd}/api/v1/status"), 5)?;
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    Some((v["version"].as_str()?.to_string(), v["generation"].as_u64()))
}

/// One counter of the appliance's /metrics (`name` or `name_total`).
fn metric(fwd: u16, name: &str) -> Option<f64> {
    let body = http_get(&format!("http://127.0.0.1:{fwd}/metrics"), 10)?;
    let text = String::from_utf8_lossy(&body).into_owned();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let n = l.split_whitespace().next().unwrap_or("");
            n == name || n == format!("{name}_total")
        })
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// The serial log after byte `from` (each phase reads only what it caused).
fn serial_since(vm: &Vm, from: usize) -> String {
    let t = serial_text(&vm.serial);
    t.get(from..).unwrap_or("").to_string()
}

/// Runs `remote` over SSH; fails with its output unless it exits 0.
fn ssh_ok(s: &Setup, port: u16, remote: &str, limit: Duration) -> Result<String> {
    let o = ssh_bounded(s.key, port, &[], remote, limit)?;
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if !o.status.success() {
        bail!("over SSH, {remote:?} failed ({}):\n{out}", o.status);
    }
    Ok(out)
}

/// Waits for SSH, runs `remote` (up to `limit`) and requires each of `wants` in its
/// output, which it returns; `what` names the output in the error.
fn ssh_shows(
    s: &Setup,
    vm: &mut Vm,
    port: u16,
    remote: &str,
    limit: Duration,
    what: &str,
    wants: &[&str],
) -> Result<String> {
    wait_ssh(s, vm, port)?;
    let out = ssh_ok(s, port, remote, limit)?;
    if let Some(want) = wants.iter().find(|w| !out.contains(**w)) {
        bail!("{what} lack {want:?}:\n{out}");
    }
    Ok(out)
}

/// Waits until SSH as root answers (sshd starts after the API on a fresh boot).
fn wait_ssh(s: &Setup, vm: &mut Vm, port: u16) -> Result<()> {
    vm.wait_for("SSH as root", Duration::from_secs(180), |_| {
        let o = ssh(s.key, port, &[], "true").ok()?;
        o.status.success().then_some(())
    })
}

/// `rackboot-update URL` over SSH, then a reboot; returns the install's time and where
/// the serial log stood at the reboot.
fn update(s: &Setup, vm: &mut Vm, ssh_port: u16, url: &str) -> Result<(Duration, usize)> {
    wait_ssh(s, vm, ssh_port)?;
    let started = Instant::now();
    let out = ssh_ok(
        s,
        ssh_port,
        &format!("rackboot-update {url}"),
        INSTALL_TIMEOUT,
    )?;
    if !out.contains("rackboot-update: installed") {
        bail!("rackboot-update {url} did not say it installed:\n{out}");
    }
    let took = started.elapsed();
    eprintln!(
        "rackboot-update {url} installed in {:.0} s:\n{out}",
        took.as_secs_f64()
    );
    let env = ssh_ok(
        s,
        ssh_port,
        "grub-editenv /boot/efi/EFI/debian/grubenv list",
        Duration::from_secs(60),
    )?;
    eprintln!("grubenv after the install:\n{env}");
    let mark = serial_text(&vm.serial).len();
    // The connection may drop as the system goes down: the result does not matter.
    let _ = ssh(s.key, ssh_port, &[], "systemctl reboot");
    Ok((took, mark))
}

/// Waits until the API answers with `want` as its version.
fn wait_version(vm: &mut Vm, fwd: u16, want: &str, limit: Duration) -> Result<Option<u64>> {
    vm.wait_for(&format!("the API reporting version {want}"), limit, |_| {
        let (v, g) = version_and_generation(fwd)?;
        (v == want).then_some(g)
    })
}

/// Runs the update part; returns the report's rows.
pub(super) fn check(s: &Setup) -> Result<Vec<String>> {
    let v1 = crate::dist::version()?;
    let v2 = format!("{v1}+{V2_SUFFIX}");
    let updates = super::updates_dir();
    let port = free_port()?;
    let log = s.dir.join("update-server.log");
    let updates_s = updates.to_str().context("utf-8 path")?;
    let port_s = port.to_string();
    let _server = Guard::spawn(
        "python3 -m http.server (the update server)",
        "python3",
        &[
            "-m",
            "http.server",
            &port_s,
            "--bind",
            "127.0.0.1",
            "--directory",
            updates_s,
        ],
        &log,
    )?;
    let started = Instant::now();
    while http_get(&format!("http://127.0.0.1:{port}/v2/SHA256SUMS"), 5).is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the update server does not answer; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(300));
    }

    let opts = BootOpts {
        tag: "update",
        reboot: true,
        failures: BOOT_FAILURES,
        arch: &super::arch::AMD64,
    };
    let mut vm = boot(s.dir, s.disk, opts)?;
    let (fwd, ssh_port) = (vm.http_port, vm.ssh_port);
    wait_version(&mut vm, fwd, &v1, BOOT_TIMEOUT)?;
    let mut rows = Vec::new();

    // 1. v1 → v2.
    let url = format!("http://10.0.2.2:{port}/v2");
    let (install_v2, mark) = update(s, &mut vm, ssh_port, &url)?;
    let reboot_started = Instant::now();
    let generation = wait_version(&mut vm, fwd, &v2, BOOT_TIMEOUT)?;
    let to_v2 = reboot_started.elapsed();
    vm.wait_for(
        "rackboot-healthy marking slot B good",
        HEALTHY_TIMEOUT,
        |vm| {
            serial_since(vm, mark)
                .contains("rackboot-healthy: slot B (image ")
                .then_some(())
        },
    )?;
    if !serial_since(&vm, mark).contains(" is good: rackboot serves") {
        bail!(
            "rackboot-healthy did not confirm slot B; see {}",
            vm.serial.display()
        );
    }
    if generation != Some(s.generation) {
        bail!(
            "after the update the snapshot generation is {generation:?}, before it {}",
            s.generation
        );
    }
    // v2's own first sync: finished, and it fetched no payload (the store is kept).
    vm.wait_for("v2's first sync to finish", SYNC_TIMEOUT, |_| {
        (metric(fwd, "rackboot_sync_runs")? >= 1.0).then_some(())
    })?;
    let fetched = metric(fwd, "rackboot_sync_fetched_bytes").context("no fetched bytes metric")?;
    let failures = metric(fwd, "rackboot_sync_failures").context("no sync failures metric")?;
    if fetched != 0.0 || failures != 0.0 {
        bail!("v2's first sync fetched {fetched} payload bytes with {failures} failures: want 0 and 0 (the synced images kept, the upstream reached)");
    }
    let base = format!("http://127.0.0.1:{fwd}");
    let got = http_get(&format!("{base}/{}", s.kernel_path), 120)
        .context("v2 does not serve the kernel synced before the update")?;
    if sha256_bytes(&got) != s.want_sha {
        bail!("after the update the kernel's sha256 differs from the upstream's");
    }
    ssh_shows(
        s,
        &mut vm,
        ssh_port,
        "cat /etc/rackboot-image; rauc status --output-format=json; echo; grub-editenv /boot/efi/EFI/debian/grubenv list",
        Duration::from_secs(60),
        "after the update to v2, the appliance's RAUC state and GRUB environment",
        &["\"booted\":\"B\"", "B_OK=1", "B_TRY=0", "ORDER=B A"],
    )?;
    rows.push(format!(
        "| update v1 → v2 from `python3 -m http.server` (`rackboot-update`: signed SHA256SUMS, RAUC bundle into slot B) | install {:.0} s; reboot to the API reporting `{v2}` {:.0} s; slot B marked good by rackboot-healthy |",
        install_v2.as_secs_f64(),
        to_v2.as_secs_f64()
    ));
    rows.push(format!(
        "| synced images kept across the update (data partition) | generation {} unchanged, v2's first sync succeeded and fetched 0 payload bytes, kernel sha256 matches |",
        s.generation
    ));

    // 2. v3 (rackboot cannot start) → three failed tries → back to v2 by itself.
    let url = format!("http://10.0.2.2:{port}/v3");
    let (install_v3, mark) = update(s, &mut vm, ssh_port, &url)?;
    let reboot_started = Instant::now();
    let failed = "rackboot did not serve within";
    vm.wait_for(
        &format!("{TRIES} failed tries of v3 on the console"),
        FALLBACK_TIMEOUT,
        |vm| (serial_since(vm, mark).matches(failed).count() >= TRIES).then_some(()),
    )?;
    let fallback_mark = serial_text(&vm.serial).len();
    vm.wait_for("GRUB booting slot B again", BOOT_TIMEOUT, |vm| {
        serial_since(vm, fallback_mark)
            .contains("rackboot: booting slot B")
            .then_some(())
    })?;
    wait_version(&mut vm, fwd, &v2, BOOT_TIMEOUT)?;
    let to_fallback = reboot_started.elapsed();
    let text = serial_since(&vm, mark);
    if !text.contains("slot A failed 3 boots in a row") {
        bail!(
            "GRUB did not say it gave up slot A; see {}",
            vm.serial.display()
        );
    }
    let journal = ssh_shows(
        s,
        &mut vm,
        ssh_port,
        "journalctl -m --no-pager -o cat -u rackboot-healthy.service -u rackboot.service -u rackboot-config.service | tail -n 400; grub-editenv /boot/efi/EFI/debian/grubenv list; rauc status --output-format=json",
        Duration::from_secs(120),
        "after the fallback, the journal and RAUC state over SSH",
        &[
            "rackboot did not serve within",
            "no_such_key",
            "A_TRY=3",
            "\"booted\":\"B\"",
        ],
    )?;
    let why = journal
        .lines()
        .find(|l| l.contains("no_such_key"))
        .unwrap_or("")
        .trim()
        .to_string();
    rows.push(format!(
        "| bad update v3 (rackboot refuses its config): {TRIES} failed tries, then GRUB boots v2 by itself | install {:.0} s; reboot to v2 serving again {:.0} s; the journal says `{}` |",
        install_v3.as_secs_f64(),
        to_fallback.as_secs_f64(),
        why.replace('|', "/").replace('`', "'").chars().take(160).collect::<String>()
    ));
    vm.power_down()?;
    Ok(rows)
}
