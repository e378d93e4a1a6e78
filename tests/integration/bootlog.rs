//! The boot log from the running daemon: machines fetch a per-MAC config, kernel,
//! initrd and squashfs over HTTP and TFTP from their own 127.0.0.0/8 addresses;
//! `rackboot boots` and `/api/v1/boots` list the steps, bytes and results, a
//! missing file shows as the last event, the log stays within its bounds and
//! nothing is written to the state dir.

use std::time::Duration;

use serde_json::Value;

use crate::harness::*;
use crate::upstream::*;

/// Where the rack serves noble amd64 (the directory its configs name).
const IMAGE: &str = "ubuntu/amd64/generic/noble/stable";

fn rack() -> (Env, MirrorServer, Served) {
    let env = Env::new();
    let mut p = vec![image("noble", "amd64", "20261101", 48 << 10)];
    p.extend(bootloaders("20210819.0"));
    let (_key, mirror) = env.signed_upstream(&p);
    env.write_config(
        &mirror.url(),
        &["amd64"],
        "auto = false\n[tftp]\nlisten = [\"127.0.0.1:0\"]\n[http]\nlisten = [\"127.0.0.1:0\"]\n[boot]\ndefault_image = \"ubuntu/noble\"\n",
    );
    let s = env.serve_synced();
    // The sync's last writes (catalog, state) are done: the state dir stays as it is.
    s.wait_synced(1, Duration::from_secs(60));
    (env, mirror, s)
}

fn size_of(env: &Env, rel: &str) -> u64 {
    std::fs::metadata(env.current().join(rel)).unwrap().len()
}

fn files(events: &Value) -> Vec<String> {
    events["event_list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["file"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn an_http_boot_is_logged_per_mac_with_steps_bytes_and_a_404_last() {
    let (env, _mirror, s) = rack();
    let before = env.state_tree();
    let mac = "52:54:00:00:00:21";
    let from = "127.0.0.21";
    // UEFI HTTP boot: the loader (MAC not known yet), the per-MAC GRUB config
    // (now it is), then the images the config names.
    let (code, _) = curl_from(from, &s.url("/bootx64.efi"));
    assert_eq!(code, 200);
    let (code, cfg) = curl_from(from, &s.url(&format!("/grub/grub.cfg-{mac}")));
    assert_eq!(code, 200);
    let cfg = String::from_utf8(cfg).unwrap();
    assert!(
        cfg.contains(&format!("/images/{IMAGE}/boot-kernel")),
        "{cfg}"
    );
    for f in ["boot-kernel", "boot-initrd", "squashfs"] {
        let (code, body) = curl_from(from, &s.url(&format!("/images/{IMAGE}/{f}")));
        assert_eq!(code, 200);
        assert_eq!(body.len() as u64, size_of(&env, &format!("{IMAGE}/{f}")));
    }
    let log = s.boots_with(mac, 5);
    assert_eq!(
        files(&log),
        [
            "bootx64.efi".to_string(),
            format!("grub/grub.cfg-{mac}"),
            format!("{IMAGE}/boot-kernel"),
            format!("{IMAGE}/boot-initrd"),
            format!("{IMAGE}/squashfs"),
        ]
    );
    let ev = log["event_list"].as_array().unwrap();
    let steps: Vec<&str> = ev.iter().map(|e| e["step"].as_str().unwrap()).collect();
    assert_eq!(steps, ["loader", "config", "kernel", "initrd", "squashfs"]);
    for e in ev {
        assert_eq!(e["kind"], "http", "{e}");
        assert_eq!(e["result"], "200", "{e}");
        assert_eq!(e["ok"], true, "{e}");
        assert_eq!(e["ip"], from, "{e}");
        assert!(e["duration_ms"].is_u64(), "{e}");
    }
    assert_eq!(ev[1]["config"], "grub");
    assert_eq!(ev[1]["config_for"], mac);
    assert_eq!(ev[1]["bytes"], cfg.len() as u64);
    for (i, f) in [(2, "boot-kernel"), (3, "boot-initrd"), (4, "squashfs")] {
        assert_eq!(
            ev[i]["bytes"],
            size_of(&env, &format!("{IMAGE}/{f}")),
            "{f}"
        );
    }
    assert_eq!(log["last_step"], "squashfs");
    assert_eq!(log["mac"], mac);
    assert_eq!(log["ip"], from);

    // The list: this machine, its last step and last file.
    let all = s.boots(None);
    let m = all["machines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mac"] == mac)
        .unwrap_or_else(|| panic!("{mac} not listed: {all}"));
    assert_eq!(m["last_step"], "squashfs");
    assert_eq!(m["last_event"]["file"], format!("{IMAGE}/squashfs"));
    assert_eq!(m["events"], 5);
    assert_eq!(
        s.metric("rackboot_boot_machines{step=\"squashfs\"}"),
        1.0,
        "{}",
        s.metrics()
    );
    assert!(s.metric("rackboot_boot_events_total{kind=\"http\"}") >= 5.0);

    // A HEAD is a probe: logged, but it reaches no step.
    let (code, _) = curl(&["-I", "--interface", from, &s.url("/grubx64.efi")]);
    assert_eq!(code, 200);
    let log = s.boots_with(mac, 6);
    assert_eq!(log["last_event"]["result"], "HEAD 200", "{log}");
    assert_eq!(log["last_step"], "squashfs");

    // A kernel the rack does not have: the machine's last event is that 404.
    let missing = "ubuntu/amd64/generic/oracular/stable/boot-kernel";
    let (code, _) = curl_from(from, &s.url(&format!("/images/{missing}")));
    assert_eq!(code, 404);
    let log = s.boots_with(mac, 7);
    let last = &log["last_event"];
    assert_eq!(last["file"], missing, "{log}");
    assert_eq!(last["result"], "404");
    assert_eq!(last["ok"], false);
    assert_eq!(last["step"], "kernel");

    // The CLI: a table, a timeline, and --json the API body.
    let url = s.url("/");
    let table = env.ok(&["boots", "--url", &url]);
    let row = table
        .lines()
        .find(|l| l.starts_with(mac))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains(from) && row.contains("squashfs"), "{row}");
    assert!(row.contains("404") && row.ends_with(missing), "{row}");
    let timeline = env.ok(&["boots", "52-54-00-00-00-21", "--url", &url]);
    assert!(timeline.contains("last step:  squashfs"), "{timeline}");
    assert!(
        timeline.contains(&format!("(grub config for {mac})")),
        "{timeline}"
    );
    let kernel_line = timeline
        .lines()
        .find(|l| l.contains(&format!("{IMAGE}/boot-kernel  ")))
        .unwrap_or_else(|| panic!("{timeline}"));
    assert!(
        kernel_line.contains(" http ") && kernel_line.contains(" 200 "),
        "{kernel_line}"
    );
    let json: Value =
        serde_json::from_str(&env.ok(&["--json", "boots", mac, "--url", &url])).unwrap();
    assert_eq!(json, s.boots(Some(mac)));
    let err = env.fails(&["boots", "not-a-mac", "--url", &url], 2);
    assert!(err.contains("not a MAC address"), "{err}");
    let (code, body) = s.get("/api/v1/boots/52:54:00:99:99:99");
    assert_eq!(code, 404, "{}", String::from_utf8_lossy(&body));

    // Memory only: nothing was written to the state dir.
    assert_eq!(env.state_tree(), before);
}

#[test]
fn the_boot_log_stays_within_its_bounds() {
    let (env, _mirror, s) = rack();
    let before = env.state_tree();
    let caps = s.boots(None);
    let (max_machines, max_events) = (
        caps["max_machines"].as_u64().unwrap(),
        caps["max_events"].as_u64().unwrap(),
    );
    assert!(max_machines >= 64 && max_events >= 8, "{caps}");
    // More MACs than the cap (each a per-MAC iPXE config request from one client),
    // through one curl run with a URL list.
    let n = max_machines + 100;
    let list = env.dir.path().join("urls");
    let mut text = String::new();
    let mac = |i: u64| {
        let b = i.to_be_bytes();
        format!("02:00:{:02x}:{:02x}:{:02x}:{:02x}", b[4], b[5], b[6], b[7])
    };
    for i in 0..n {
        text.push_str(&format!(
            "url = \"{}\"\noutput = \"/dev/null\"\n",
            s.url(&format!("/ipxe.cfg-{}?arch=none", mac(i)))
        ));
    }
    // …then more events than a machine keeps, for the last MAC.
    for _ in 0..max_events + 10 {
        text.push_str(&format!(
            "url = \"{}\"\noutput = \"/dev/null\"\n",
            s.url(&format!("/images/{IMAGE}/boot-initrd"))
        ));
    }
    std::fs::write(&list, text).unwrap();
    let out = run_client(
        "curl",
        &["-sS", "--max-time", "300", "-K", list.to_str().unwrap()],
        Duration::from_secs(310),
    );
    assert!(out.status.success(), "{out:?}");
    let last = mac(n - 1);
    // Its config request and max_events + 10 initrds: 11 dropped from its ring.
    wait_until(Duration::from_secs(30), "the last events", || {
        s.boots(Some(&last))["dropped"].as_u64() == Some(11)
    });
    let log = s.boots(Some(&last));
    assert_eq!(log["events"], max_events, "{log}");
    assert_eq!(
        log["event_list"].as_array().unwrap().len() as u64,
        max_events
    );
    assert_eq!(log["last_step"], "initrd");
    let all = s.boots(None);
    let listed = all["machines"].as_array().unwrap();
    assert_eq!(listed.len() as u64, max_machines, "{}", listed.len());
    // The oldest were evicted, the newest kept.
    let (code, _) = s.get(&format!("/api/v1/boots/{}", mac(0)));
    assert_eq!(code, 404);
    assert_eq!(s.boots(Some(&mac(n - 2)))["events"], 1);
    assert_eq!(
        s.metric("rackboot_boot_machines{step=\"none\"}")
            + s.metric("rackboot_boot_machines{step=\"initrd\"}"),
        max_machines as f64
    );
    assert_eq!(env.state_tree(), before);
}

#[test]
fn a_tftp_boot_is_logged_with_bytes_and_a_tftp_error_last() {
    let (env, _mirror, s) = rack();
    let before = env.state_tree();
    let mac = "52:54:00:00:00:31";
    let from = "127.0.0.31";
    // BIOS: pxelinux and its module (MAC not known yet), the per-MAC config of the
    // TFTP-only pxelinux, kernel and initrd over TFTP, the squashfs over HTTP.
    let cfg_path = format!(
        "bootloader/pxe/i386/pxelinux.cfg/01-{}",
        mac.replace(':', "-")
    );
    let mut sizes = Vec::new();
    for path in ["pxelinux.0", "ldlinux.c32", &cfg_path] {
        let got = tftp_from(&s, from, path).unwrap_or_else(|e| panic!("{path}: {e}"));
        sizes.push(got.len() as u64);
    }
    let cfg = String::from_utf8(tftp_from(&s, from, &cfg_path).unwrap()).unwrap();
    assert!(
        cfg.contains(&format!("KERNEL ::/{IMAGE}/boot-kernel")),
        "{cfg}"
    );
    for f in ["boot-kernel", "boot-initrd"] {
        let got = tftp_from(&s, from, &format!("{IMAGE}/{f}")).unwrap();
        assert_eq!(got.len() as u64, size_of(&env, &format!("{IMAGE}/{f}")));
        sizes.push(got.len() as u64);
    }
    let (code, _) = curl_from(from, &s.url(&format!("/images/{IMAGE}/squashfs")));
    assert_eq!(code, 200);
    let log = s.boots_with(mac, 7);
    assert_eq!(
        files(&log),
        [
            "pxelinux.0".to_string(),
            "ldlinux.c32".into(),
            cfg_path.clone(),
            cfg_path.clone(),
            format!("{IMAGE}/boot-kernel"),
            format!("{IMAGE}/boot-initrd"),
            format!("{IMAGE}/squashfs"),
        ],
        "{log}"
    );
    let ev = log["event_list"].as_array().unwrap();
    let kinds: Vec<&str> = ev.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["tftp", "tftp", "tftp", "tftp", "tftp", "tftp", "http"]
    );
    let steps: Vec<&str> = ev.iter().map(|e| e["step"].as_str().unwrap()).collect();
    assert_eq!(
        steps,
        ["loader", "loader", "config", "config", "kernel", "initrd", "squashfs"]
    );
    for (e, size) in ev
        .iter()
        .zip(&sizes[..3])
        .chain(ev[4..6].iter().zip(&sizes[3..]))
    {
        assert_eq!(e["result"], "ok", "{e}");
        assert_eq!(e["bytes"], *size, "{e}");
        assert_eq!(e["ip"], from, "{e}");
    }
    assert_eq!(ev[2]["config"], "pxelinux");
    assert_eq!(ev[2]["config_for"], mac);
    assert_eq!(log["last_step"], "squashfs");

    // A kernel the rack does not have: TFTP ERROR 1 is the machine's last event.
    let missing = "ubuntu/amd64/generic/oracular/stable/boot-kernel";
    let err = tftp_from(&s, from, missing).unwrap_err();
    // curl's exit code 68: "file not found on the TFTP server".
    assert!(err.contains("(68)"), "{err}");
    let log = s.boots_with(mac, 8);
    let last = &log["last_event"];
    assert_eq!(last["file"], missing, "{log}");
    assert_eq!(last["kind"], "tftp");
    assert_eq!(last["ok"], false);
    assert!(
        last["result"].as_str().unwrap().starts_with("ERROR 1:"),
        "{last}"
    );
    let table = env.ok(&["boots", "--url", &s.url("/")]);
    let row = table.lines().find(|l| l.starts_with(mac)).unwrap();
    assert!(row.contains("ERROR 1") && row.ends_with(missing), "{row}");
    assert!(s.metric("rackboot_boot_events_total{kind=\"tftp\"}") >= 7.0);
    assert_eq!(env.state_tree(), before);
}

/// A client that names thousands of made-up MACs (each per-MAC config is served, so
/// each would establish its machine) fills the log, but evicts only its own: the
/// machine that booted from another address keeps its record, and the flooder keeps
/// at most `max_established_per_source` of its MACs protected.
#[test]
fn made_up_macs_from_one_address_do_not_push_out_a_machine_that_booted() {
    let (env, _mirror, s) = rack();
    let mac = "52:54:00:00:00:31";
    let from = "127.0.0.31";
    assert_eq!(curl_from(from, &s.url("/bootx64.efi")).0, 200);
    assert_eq!(
        curl_from(from, &s.url(&format!("/grub/grub.cfg-{mac}"))).0,
        200
    );
    assert_eq!(
        curl_from(from, &s.url(&format!("/images/{IMAGE}/boot-kernel"))).0,
        200
    );
    s.boots_with(mac, 3);
    let caps = s.boots(None);
    let max_machines = caps["max_machines"].as_u64().unwrap();
    let per_source = caps["max_established_per_source"].as_u64().unwrap();
    assert!(per_source >= 1 && per_source < max_machines, "{caps}");
    let fake = |i: u64| {
        let b = i.to_be_bytes();
        format!("02:00:{:02x}:{:02x}:{:02x}:{:02x}", b[4], b[5], b[6], b[7])
    };
    let n = max_machines + 100;
    let list = env.dir.path().join("flood");
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!(
            "url = \"{}\"\noutput = \"/dev/null\"\n",
            s.url(&format!("/grub/grub.cfg-{}", fake(i)))
        ));
    }
    std::fs::write(&list, text).unwrap();
    let out = run_client(
        "curl",
        &[
            "-sS",
            "--fail",
            "--interface",
            "127.0.0.32",
            "--max-time",
            "300",
            "-K",
            list.to_str().unwrap(),
        ],
        Duration::from_secs(310),
    );
    assert!(out.status.success(), "{out:?}");
    wait_until(Duration::from_secs(30), "the last fake MAC", || {
        s.get(&format!("/api/v1/boots/{}", fake(n - 1))).0 == 200
    });
    // The log is full, and the machine that booted is still in it, whole.
    let all = s.boots(None);
    assert_eq!(
        all["machines"].as_array().unwrap().len() as u64,
        max_machines
    );
    let log = s.boots(Some(mac));
    assert_eq!(files(&log).len(), 3, "{log}");
    assert_eq!(log["last_step"], "kernel");
    // The flooder's first MACs were established and kept; the rest were not.
    for i in 0..per_source {
        assert_eq!(s.get(&format!("/api/v1/boots/{}", fake(i))).0, 200, "{i}");
    }
    assert_eq!(s.get(&format!("/api/v1/boots/{}", fake(per_source))).0, 404);
    assert_eq!(
        s.metric("rackboot_boot_unestablished_total"),
        (n - per_source) as f64
    );
}
