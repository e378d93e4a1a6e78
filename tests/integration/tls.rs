//! TLS listeners: files and the API over HTTPS with the configured certificate, and
//! config errors that name the certificate or key file.

use std::time::Duration;

use crate::harness::*;
use crate::upstream::*;

#[test]
fn tls_listener_serves_files_and_the_api_with_the_configured_certificate() {
    let (r, cert) = rack_with_tls(1 << 20);
    let (s, addrs) = r.env.serve_with(&["TFTP", "HTTP", "HTTPS"], |_| {});
    s.wait_generation(1, Duration::from_secs(60));
    let https = |p: &str| format!("https://{}{p}", addrs[2]);
    let cacert = cert.to_str().unwrap();
    let want = kernel_of("20261101", 1 << 20);
    let (code, body) = curl(&["--cacert", cacert, &https(KERNEL)]);
    assert_eq!(code, 200);
    assert_eq!(sha256_hex(&body), sha256_hex(&want), "the file over TLS");
    let (code, body) = curl(&["--cacert", cacert, "-r", "1000-1999", &https(KERNEL)]);
    assert_eq!((code, body.as_slice()), (206, &want[1000..2000]));
    let (code, body) = curl(&["--cacert", cacert, &https("/api/v1/status")]);
    assert_eq!(code, 200);
    assert_eq!(json(&body)["generation"], 1);
    // The certificate really is the configured one: without it curl refuses.
    let out = run_client(
        "curl",
        &["-s", "-o", "/dev/null", "--max-time", "20", &https(KERNEL)],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(60), "curl: unknown CA");
    // Plain HTTP on the TLS port gets no HTTP answer; the plain port is unaffected.
    let (code, _) = curl(&[&format!("http://{}{KERNEL}", addrs[2])]);
    assert_eq!(code, 0);
    assert_eq!(s.get(KERNEL).0, 200);
}

#[test]
fn tls_config_errors_name_the_file_or_key() {
    let env = Env::new();
    TestKey::generate().write_keyring(&env.keyring);
    env.write_config("http://127.0.0.1:1/", &["amd64"], "");
    let bad = env.dir.path().join("not-a-cert.pem");
    std::fs::write(&bad, "hello\n").unwrap();
    let cfg = std::fs::read_to_string(&env.config).unwrap();
    let with = |http: &str| {
        std::fs::write(
            &env.config,
            cfg.replace(
                "[sync]",
                &format!("[tftp]\nlisten = []\n[http]\nlisten = [\"127.0.0.1:0\"]\n{http}\n[sync]"),
            ),
        )
        .unwrap();
    };
    with(&format!(
        "tls_listen = [\"127.0.0.1:0\"]\ntls_cert = \"{0}\"\ntls_key = \"{0}\"",
        bad.display()
    ));
    let out = env.run_for(&["serve"], Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.contains("error:")).unwrap_or("");
    assert!(
        line.contains(bad.to_str().unwrap()) && line.contains("no certificate"),
        "{err}"
    );
    with(&format!("tls_cert = \"{}\"", bad.display()));
    let err = env.fails(&["serve"], 2);
    assert!(err.contains("tls_cert and http.tls_key"), "{err}");
}
