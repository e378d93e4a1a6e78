//! Boot configs from the running daemon, over TFTP and HTTP, per MAC.

use std::time::Duration;

use crate::harness::*;
use crate::upstream::*;

/// The kernels of the rack's images, as paths in the served tree.
const AMD64_KERNEL: &str = "ubuntu/amd64/generic/noble/stable/boot-kernel";
const ARM64_KERNEL: &str = "ubuntu/arm64/generic/noble/stable/boot-kernel";

/// A rack with noble amd64 + arm64 images and bootloaders, synced and serving;
/// `listen` is the `[tftp]`/`[http]` listen list.
fn rack(listen: &str, extra: &str) -> (Env, MirrorServer, Served) {
    let env = Env::new();
    let mut p = vec![
        image("noble", "amd64", "20261101", 4096),
        image("noble", "arm64", "20261101", 4096),
    ];
    p.extend(bootloaders("20210819.0"));
    let (_key, mirror) = env.signed_upstream(&p);
    env.write_config(
        &mirror.url(),
        &["amd64", "arm64"],
        &format!("auto = false\n[tftp]\nlisten = {listen}\n[http]\nlisten = {listen}\n[boot]\ndefault_image = \"ubuntu/noble\"\nkernel_params = \"console=ttyS0\"\n{extra}"),
    );
    let s = env.serve_synced();
    (env, mirror, s)
}

#[test]
fn per_mac_configs_defaults_and_local_boot() {
    let (env, _mirror, s) = rack(
        "[\"127.0.0.1:0\"]",
        "[machines.\"52-54-00-00-00-0A\"]\nkernel_params = \"from.config=1\"\n",
    );
    env.ok(&[
        "machines",
        "set",
        "52:54:00:00:00:01",
        "kernel_params=rackboot.test=one quoted=\"a b\"",
    ]);
    env.ok(&["machines", "set", "52:54:00:00:00:02", "local_boot=true"]);
    let read = env.ok(&["--json", "machines", "read"]);
    let v: serde_json::Value = serde_json::from_str(&read).unwrap();
    assert_eq!(v["52:54:00:00:00:0a"]["kernel_params"], "from.config=1");
    assert_eq!(
        v["52:54:00:00:00:01"]["kernel_params"],
        "rackboot.test=one quoted=\"a b\""
    );

    // pxelinux over TFTP: per MAC, HTTP URLs for the host:port asked.
    let cfg = tftp_get(&s, "pxelinux.cfg/01-52-54-00-00-00-01").expect("per-MAC pxelinux config");
    // The HTTP address the configs name (the one the client asked).
    let host = format!("127.0.0.1:{}", s.http.port());
    let http = format!("http://{host}/images/ubuntu/amd64/generic/noble/stable/");
    assert!(cfg.contains(&format!("KERNEL {http}boot-kernel")), "{cfg}");
    assert!(cfg.contains(&format!("INITRD {http}boot-initrd")), "{cfg}");
    assert!(
        cfg.contains(&format!("root=squash:{http}squashfs")),
        "{cfg}"
    );
    assert!(
        cfg.contains("console=ttyS0 rackboot.test=one quoted=\"a b\""),
        "{cfg}"
    );
    assert!(cfg.contains("IPAPPEND 2"));
    // …TFTP paths for the TFTP-only pxelinux under bootloader/pxe/i386/.
    let cfg = tftp_get(&s, "bootloader/pxe/i386/pxelinux.cfg/01-52-54-00-00-00-01").unwrap();
    assert!(cfg.contains(&format!("KERNEL ::/{AMD64_KERNEL}")), "{cfg}");
    // Unknown MAC and `default`: the default config; UUID / hex IP probes: not found.
    let cfg = tftp_get(&s, "pxelinux.cfg/01-aa-bb-cc-dd-ee-ff").unwrap();
    assert!(
        cfg.contains("console=ttyS0") && !cfg.contains("rackboot.test"),
        "{cfg}"
    );
    assert!(tftp_get(&s, "pxelinux.cfg/default")
        .unwrap()
        .contains("KERNEL http://"));
    assert_eq!(tftp_get(&s, "pxelinux.cfg/C0A80001"), None);
    assert_eq!(
        tftp_get(&s, "pxelinux.cfg/8a1c2f6e-0000-4000-8000-525400000001"),
        None
    );
    // Local boot.
    let cfg = tftp_get(&s, "pxelinux.cfg/01-52-54-00-00-00-02").unwrap();
    assert!(
        cfg.contains("KERNEL chain.c32") && cfg.contains("APPEND hd0"),
        "{cfg}"
    );
    // Config-file machine settings apply too.
    assert!(tftp_get(&s, "pxelinux.cfg/01-52-54-00-00-00-0a")
        .unwrap()
        .contains("from.config=1"));

    // GRUB: the static chain, per MAC for both CPUs, TFTP paths over TFTP.
    let g = tftp_get(&s, "/grub/grub.cfg").unwrap();
    assert!(
        g.contains("configfile /grub/grub.cfg-${net_default_mac}"),
        "{g}"
    );
    let g = tftp_get(&s, "/grub/grub.cfg-52:54:00:00:00:01").unwrap();
    assert!(g.contains("if [ \"$grub_cpu\" = 'x86_64' ]"), "{g}");
    assert!(g.contains("elif [ \"$grub_cpu\" = 'arm64' ]"), "{g}");
    assert!(g.contains(&format!("linux '/{AMD64_KERNEL}'")), "{g}");
    assert!(g.contains(&format!("linux '/{ARM64_KERNEL}'")), "{g}");
    // Kernel double quotes become GRUB quoting (GRUB re-quotes for the kernel).
    assert!(g.contains("'rackboot.test=one' 'quoted=a b'"), "{g}");
    // Loaded over TFTP: HTTP after `insmod http`, TFTP under Secure Boot (locked
    // down, GRUB loads no modules).
    assert!(
        g.contains(&format!(
            "    if [ \"$lockdown\" = y ]; then\n      linux '/{AMD64_KERNEL}'"
        )),
        "{g}"
    );
    assert!(
        g.contains(&format!(
            "    else\n      insmod http\n      linux '(http,{host})/images/{AMD64_KERNEL}'"
        )),
        "{g}"
    );
    let g = tftp_get(&s, "grub/grub.cfg-default-amd64").unwrap();
    assert!(g.contains("x86_64") && !g.contains("arm64"), "{g}");
    assert!(tftp_get(&s, "grub/grub.cfg-52:54:00:00:00:02")
        .unwrap()
        .contains("chainloader"));
    // (curl refuses an OACK with tsize 0, so the empty file is fetched with atftp,
    // asking for tsize as GRUB does; atftp exits non-zero on a TFTP error.)
    let (res, lst) = run_client_to_file(
        "atftp",
        &[
            "--option",
            "tsize 0",
            "-g",
            "-r",
            "/grub/x86_64-efi/command.lst",
            "-l",
            OUT,
            "127.0.0.1",
            &s.tftp.port().to_string(),
        ],
        Duration::from_secs(20),
    );
    assert!(res.status.success(), "{res:?}");
    assert_eq!(lst.as_deref(), Some(&b""[..]));
    // Over HTTP (UEFI HTTP boot): HTTP paths.
    let g = s.get_text("/grub/grub.cfg-52:54:00:00:00:01");
    assert!(
        g.contains(&format!(
            "\n    linux '(http,{host})/images/{AMD64_KERNEL}'"
        )),
        "{g}"
    );
    assert!(!g.contains("insmod"), "{g}");

    // iPXE.
    let i = s.get_text("/boot.ipxe?mac=52:54:00:00:00:01");
    assert!(i.starts_with("#!ipxe\nkernel http://"), "{i}");
    assert!(
        i.contains("rackboot.test=one") && i.contains("initrd http://") && i.ends_with("boot\n"),
        "{i}"
    );
    let chain = tftp_get(&s, "ipxe.cfg").unwrap();
    assert!(
        chain.contains(&format!(
            "chain http://{host}/ipxe.cfg-${{mac}}?arch=${{buildarch}} ||"
        )),
        "{chain}"
    );
    // The chain passes iPXE's build architecture.
    let i = s.get_text("/ipxe.cfg-52:54:00:00:00:01?arch=arm64");
    assert!(i.contains(&format!("/images/{ARM64_KERNEL} ")), "{i}");
    // iPXE percent-encodes the `:` of `${mac}` in URLs.
    let i = s.get_text("/ipxe.cfg-52%3A54%3A00%3A00%3A00%3A01?arch=i386");
    assert!(
        i.contains(&format!("/images/{AMD64_KERNEL} ")) && i.contains("rackboot.test=one"),
        "{i}"
    );
    let i = s.get_text("/ipxe.cfg-default-x86_64");
    assert!(
        i.contains(&format!("/images/{AMD64_KERNEL} ")) && !i.contains("rackboot.test"),
        "{i}"
    );
    let (code, body) = s.get("/ipxe.cfg-52:54:00:00:00:02");
    assert_eq!(code, 200);
    assert!(String::from_utf8(body).unwrap().contains("sanboot"));

    // Through the API (with the token off, writes are refused; reads work).
    let (code, body) = s.get("/api/v1/machines/52-54-00-00-00-01");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("rackboot.test=one"));
    assert_eq!(
        curl(&[
            "-X",
            "PUT",
            "-d",
            "{}",
            &s.url("/api/v1/machines/52:54:00:00:00:01")
        ])
        .0,
        403
    );
    // Changes apply without a restart; delete returns the machine to the default.
    env.ok(&["machines", "delete", "52-54-00-00-00-01"]);
    let cfg = tftp_get(&s, "pxelinux.cfg/01-52-54-00-00-00-01").unwrap();
    assert!(!cfg.contains("rackboot.test"), "{cfg}");
    // Bad input is a usage error naming it.
    let e = env.fails(&["machines", "set", "not-a-mac", "local_boot=true"], 2);
    assert!(e.contains("not-a-mac"), "{e}");
    let e = env.fails(
        &["machines", "set", "52:54:00:00:00:03", "image=../../etc"],
        2,
    );
    assert!(e.contains("image"), "{e}");
}

#[test]
fn ipv6_and_host_without_port_name_the_right_address() {
    let (_env, _mirror, s) = rack("[\"127.0.0.1:0\", \"[::1]:0\"]", "");
    let log = s.log_text();
    let v6 = |what: &str| -> String {
        log.lines()
            .filter_map(|l| l.split(&format!("listening for {what} on ")).nth(1))
            .find(|a| a.starts_with("[::1]"))
            .unwrap_or_else(|| panic!("no IPv6 {what} listener in {log}"))
            .trim()
            .to_string()
    };
    let (tftp6, http6) = (v6("TFTP"), v6("HTTP"));
    // Over TFTP on ::1: URLs name [::1] and the IPv6 listener's HTTP port; the
    // initramfs is told to configure IPv6.
    let cfg = tftp_get_at(&tftp6, "pxelinux.cfg/default").expect("config over IPv6");
    assert!(
        cfg.contains(&format!("KERNEL http://{http6}/images/ubuntu/amd64/")),
        "{cfg}"
    );
    assert!(cfg.contains(" ip=off ip6=dhcp "), "{cfg}");
    // Over HTTP on ::1 the Host header decides.
    let i = curl_text(&[&format!("http://{http6}/ipxe.cfg-default-amd64")]);
    assert!(i.contains(&format!("kernel http://{http6}/images/")), "{i}");
    // GRUB sends Host without a port: the listener's port is used.
    let g = curl_text(&[
        "-H",
        "Host: 10.9.8.7",
        &s.url("/grub/grub.cfg-default-amd64"),
    ]);
    assert!(
        g.contains(&format!(
            "linux '(http,10.9.8.7:{})/images/ubuntu/amd64/",
            s.http.port()
        )),
        "{g}"
    );
    assert!(g.contains("'ip=::::rackboot:BOOTIF'"), "{g}");
}
