//! The Images page in a real headless Chromium, driven through chromedriver's
//! WebDriver API: the catalog's checkboxes show the selection, "Save selection"
//! changes it through the API with the typed token, "Sync now" syncs it, and the page
//! follows the new generation.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::*;
use crate::upstream::*;

/// chromedriver, killed by PID on drop (it takes its browsers down with it).
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A WebDriver session (deleted on drop, which ends its browser).
struct Session<'a> {
    driver: &'a Driver,
    id: String,
}

/// One WebDriver command through curl; returns the response's `value`.
fn wd(method: &str, url: &str, body: Option<Value>) -> Value {
    wd_result(method, url, body).unwrap_or_else(|e| panic!("WebDriver {method} {url}: {e}"))
}

/// One WebDriver command; a WebDriver error (stale element, no such element…) is
/// returned as the error's `value`, so a caller that polls a reloading page can retry.
fn wd_result(method: &str, url: &str, body: Option<Value>) -> Result<Value, Value> {
    let mut args = vec![
        "-s".to_string(),
        "--max-time".into(),
        "60".into(),
        "-X".into(),
        method.into(),
        url.into(),
    ];
    if let Some(b) = body {
        args.extend([
            "-H".into(),
            "Content-Type: application/json".into(),
            "-d".into(),
            b.to_string(),
        ]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_client("curl", &args, Duration::from_secs(70));
    assert!(out.status.success(), "curl {url}: {out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{url}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let value = v["value"].clone();
    match value.get("error") {
        None => Ok(value),
        Some(_) => Err(value),
    }
}

/// The errors of an element that the page replaced or has not drawn yet: the page
/// reloads itself when a new generation is served, so a poll can race with it.
fn is_reload_race(e: &Value) -> bool {
    matches!(
        e["error"].as_str(),
        Some("stale element reference" | "no such element")
    )
}

impl Driver {
    fn start() -> Driver {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver must be installed (Debian: chromium-driver)");
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        wait_until(Duration::from_secs(30), "chromedriver to answer", || {
            curl(&[&format!("{}/status", driver.url)]).0 == 200
        });
        driver
    }

    fn session(&self, profile: &std::path::Path) -> Session<'_> {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }
        }}});
        let v = wd("POST", &format!("{}/session", self.url), Some(caps));
        Session {
            driver: self,
            id: v["sessionId"].as_str().expect("a session id").to_string(),
        }
    }
}

impl Session<'_> {
    fn url(&self, rest: &str) -> String {
        format!("{}/session/{}{rest}", self.driver.url, self.id)
    }
    fn go(&self, to: &str) {
        wd("POST", &self.url("/url"), Some(json!({ "url": to })));
    }
    fn find(&self, css: &str) -> String {
        let v = wd(
            "POST",
            &self.url("/element"),
            Some(json!({"using": "css selector", "value": css})),
        );
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}"))
            .to_string()
    }
    fn text(&self, css: &str) -> String {
        let e = self.find(css);
        wd("GET", &self.url(&format!("/element/{e}/text")), None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
    fn selected(&self, css: &str) -> bool {
        let e = self.find(css);
        wd("GET", &self.url(&format!("/element/{e}/selected")), None) == json!(true)
    }
    fn click(&self, css: &str) {
        let e = self.find(css);
        wd(
            "POST",
            &self.url(&format!("/element/{e}/click")),
            Some(json!({})),
        );
    }
    fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css);
        wd(
            "POST",
            &self.url(&format!("/element/{e}/value")),
            Some(json!({ "text": text })),
        );
    }
    /// `css`'s text, or `None` while the page is being replaced under it.
    fn text_during_reload(&self, css: &str) -> Option<String> {
        let found = wd_result(
            "POST",
            &self.url("/element"),
            Some(json!({"using": "css selector", "value": css})),
        );
        let e = match found {
            Ok(v) => v
                .as_object()
                .and_then(|o| o.values().next())
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("no element {css}: {v}"))
                .to_string(),
            Err(e) if is_reload_race(&e) => return None,
            Err(e) => panic!("WebDriver find {css}: {e}"),
        };
        match wd_result("GET", &self.url(&format!("/element/{e}/text")), None) {
            Ok(v) => Some(v.as_str().unwrap_or_default().to_string()),
            Err(e) if is_reload_race(&e) => None,
            Err(e) => panic!("WebDriver text of {css}: {e}"),
        }
    }
    /// Polls `css`'s text until `pred` holds (bounded); the page may reload meanwhile.
    fn wait_text(&self, css: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let t = self.text_during_reload(css).unwrap_or_default();
            if pred(&t) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "waiting for {what}: {css} says {t:?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let _ = run_client(
            "curl",
            &["-s", "--max-time", "30", "-X", "DELETE", &self.url("")],
            Duration::from_secs(40),
        );
    }
}

#[test]
fn images_page_in_headless_chromium_selects_and_syncs() {
    let env = Env::new();
    let mut products = vec![
        image("noble", "amd64", "20261101", 16 << 10),
        image("noble", "arm64", "20261101", 16 << 10),
    ];
    products.extend(bootloaders("20210819.0"));
    let (_key, mirror) = env.signed_upstream(&products);
    let token = env.dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    env.write_config(
        &mirror.url(),
        &["amd64"],
        &format!(
            "auto = false\n[tftp]\nlisten = [\"127.0.0.1:0\"]\n[http]\nlisten = [\"127.0.0.1:0\"]\ntoken_file = \"{}\"\n",
            token.display()
        ),
    );
    let s = env.serve_synced();
    // A machine boots over HTTP before the page is opened: "Recent boots" shows it.
    let mac = "52:54:00:00:00:77";
    let image = "images/ubuntu/amd64/generic/noble/stable";
    for path in [
        format!("/grub/grub.cfg-{mac}"),
        format!("/{image}/boot-kernel"),
        format!("/{image}/boot-initrd"),
    ] {
        assert_eq!(curl_from("127.0.0.77", &s.url(&path)).0, 200, "{path}");
    }
    assert_eq!(s.boots_with(mac, 3)["last_step"], "initrd");

    let driver = Driver::start();
    let profile = env.dir.path().join("chromium-profile");
    let browser = driver.session(&profile);
    browser.go(&s.url("/"));
    let status = browser.text("#status");
    assert!(status.contains("serving generation 1"), "{status}");
    // The catalog: noble for amd64 (selected) and arm64 (not).
    let amd64 = "input.arch[data-release='noble'][data-arch='amd64']";
    let arm64 = "input.arch[data-release='noble'][data-arch='arm64']";
    assert!(browser.selected(amd64));
    assert!(!browser.selected(arm64));
    let resources = browser.text("#resources");
    assert!(
        resources.contains("ubuntu/amd64/ga-24.04/noble/stable"),
        "{resources}"
    );
    assert!(!resources.contains("arm64/ga-24.04"), "{resources}");
    let boots = browser.text("#boots");
    let row = boots
        .lines()
        .find(|l| l.contains(mac))
        .unwrap_or_else(|| panic!("{mac} not in Recent boots: {boots}"));
    assert!(
        row.contains("127.0.0.77") && row.contains("initrd") && row.contains("boot-initrd 200"),
        "{row}"
    );

    // Without the token, saving is refused and the page says why.
    browser.click(arm64);
    browser.click("#save");
    browser.wait_text("#message", "the refusal", |t| t.contains("failed"));
    // With it, the selection is saved through the API…
    browser.type_into("#token", "s3cret-token");
    browser.click("#save");
    browser.wait_text("#message", "the save", |t| t.contains("Selection saved"));
    let (code, body) = s.get("/api/v1/sources/1/selections");
    assert_eq!(code, 200);
    let sels: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(sels.as_array().unwrap().len(), 1, "{sels}");
    let arches: Vec<&str> = sels[0]["arches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(arches, vec!["amd64", "arm64"], "{sels}");
    assert_eq!(sels[0]["release"], "noble");

    // …and "Sync now" brings arm64 in; the page reloads itself on the new generation.
    browser.click("#sync");
    browser.wait_text("#status", "generation 2", |t| {
        t.contains("serving generation 2")
    });
    let resources = browser.text("#resources");
    assert!(
        resources.contains("ubuntu/arm64/ga-24.04/noble/stable"),
        "{resources}"
    );
    assert!(
        browser.selected(arm64),
        "the reloaded page shows the saved selection"
    );
    assert!(env
        .current()
        .join("ubuntu/arm64/ga-24.04/noble/stable/boot-kernel")
        .exists());
}
