//! The Images page (`GET /`), like MAAS's: what the boot sources offer and which of it
//! is selected (with a checkbox per architecture), what is synced and served, the
//! sync's status and progress, "Save selection" and "Sync now".
//!
//! Plain server-rendered HTML and a little JavaScript, no build step. Rendering is
//! pure: [`render`] takes a [`Page`] model and returns the document. Every string
//! from outside (stream fields, URLs, errors) goes through [`esc`], the one place
//! that escapes HTML. Writes go through the JSON API with the bearer token the
//! operator types into the page (kept in the tab's sessionStorage only).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::plan::ManifestProduct;
use crate::select::CatalogEntry;
use crate::serve::bootlog::BootSummary;
use crate::serve::SyncStatus;
use crate::state::StoredSource;

/// Everything the page shows.
pub struct Page<'a> {
    pub version: &'a str,
    pub generation: Option<u64>,
    pub snapshot_created: Option<u64>,
    pub status: &'a SyncStatus,
    pub sync_auto: bool,
    pub sources: &'a [StoredSource],
    pub catalog: &'a [CatalogEntry],
    pub resources: &'a [ManifestProduct],
    /// Whether the API accepts writes (a token file is configured).
    pub writes_enabled: bool,
    /// The boot log's machines, most recent first.
    pub boots: &'a [BootSummary],
}

/// Escapes text for HTML element content and double-quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn when(unix: Option<u64>) -> String {
    match unix {
        Some(t) => {
            httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t))
        }
        None => "never".into(),
    }
}

fn status_line(p: &Page) -> String {
    let serving = match p.generation {
        Some(g) => format!(
            "serving generation {g} (since {})",
            when(p.snapshot_created)
        ),
        None => "nothing served yet: the first sync has not finished".into(),
    };
    let last = match (&p.status.last_result, &p.status.last_error) {
        (Some(r), Some(e)) => format!(
            "last sync {r} at {}: {}",
            when(p.status.last_finished),
            crate::config::redact_text(e)
        ),
        (Some(r), None) => format!("last sync {r} at {}", when(p.status.last_finished)),
        _ => "no sync finished since start".into(),
    };
    format!("{serving}; {last}")
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em;max-width:72em}\
table{border-collapse:collapse;margin:.5em 0 1.5em}\
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}\
th{background:#f0f0f0}td.n{text-align:right}\
#progress{width:24em}.err{color:#b00}.ok{color:#070}\
button{margin-right:.5em}";

/// The page's script: polls the status, saves selections, starts a sync.
const SCRIPT: &str = r#"
const tokenField = document.getElementById('token');
tokenField.value = sessionStorage.getItem('rackboot-token') || '';
tokenField.addEventListener('input', () => sessionStorage.setItem('rackboot-token', tokenField.value));
const message = document.getElementById('message');
function say(text, ok) { message.textContent = text; message.className = ok ? 'ok' : 'err'; }
async function call(method, path, body) {
  const headers = {'Authorization': 'Bearer ' + tokenField.value};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch('/api/v1/' + path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  const text = await r.text();
  let data = null;
  try { data = JSON.parse(text); } catch (e) {}
  if (!r.ok) throw new Error((data && data.error) || (r.status + ' ' + r.statusText));
  return data;
}
document.getElementById('save').addEventListener('click', async () => {
  const bySource = {};
  for (const box of document.querySelectorAll('input.arch')) {
    const s = box.dataset.source;
    bySource[s] = bySource[s] || {};
    const key = box.dataset.os + '/' + box.dataset.release;
    bySource[s][key] = bySource[s][key] || {os: box.dataset.os, release: box.dataset.release, arches: []};
    if (box.checked) bySource[s][key].arches.push(box.dataset.arch);
  }
  try {
    for (const [source, rows] of Object.entries(bySource)) {
      const selections = Object.values(rows).filter(r => r.arches.length > 0);
      await call('PUT', 'sources/' + source + '/selections', selections);
    }
    say('Selection saved; the next sync applies it.', true);
  } catch (e) { say('Saving the selection failed: ' + e.message, false); }
});
document.getElementById('sync').addEventListener('click', async () => {
  try { await call('POST', 'sync'); say('Sync started.', true); }
  catch (e) { say('Starting a sync failed: ' + e.message, false); }
});
const shown = document.body.dataset.generation;
async function poll() {
  try {
    const r = await fetch('/api/v1/status');
    const s = await r.json();
    const bar = document.getElementById('progress');
    const running = document.getElementById('running');
    if (s.sync_running && s.progress) {
      bar.max = s.progress.bytes_total || 1; bar.value = s.progress.bytes_done;
      bar.hidden = false;
      running.textContent = 'sync running: ' + s.progress.files_done + '/' + s.progress.files_total + ' files';
    } else { bar.hidden = true; running.textContent = s.sync_running ? 'sync running' : 'idle'; }
    if (String(s.generation) !== shown && s.generation !== null) location.reload();
  } catch (e) {}
  setTimeout(poll, 2000);
}
poll();
"#;

/// The page's Content-Security-Policy: its own inline script and style (by hash) and
/// nothing else; fetches go to its own origin only. Even markup that slipped past
/// [`esc`] could not run a script, and no script could send the token elsewhere.
pub fn csp() -> &'static str {
    static CSP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CSP.get_or_init(|| {
        use base64::Engine as _;
        use sha2::Digest as _;
        let hash = |s: &str| {
            base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(s.as_bytes()))
        };
        format!(
            "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            hash(SCRIPT),
            hash(STYLE)
        )
    })
}

/// One boot source's table: a row per (os, release), a checkbox per arch.
fn render_source(h: &mut String, p: &Page, i: usize, src: &StoredSource) {
    let _ = writeln!(
        h,
        "<h2>Boot source {}: {}</h2>",
        src.id,
        esc(&crate::config::redacted(&src.url))
    );
    let entries: Vec<&CatalogEntry> = p
        .catalog
        .iter()
        .filter(|e| match e.source_url.as_str() {
            "" => e.source == i,
            url => e.source_id == src.id && url == src.url,
        })
        .collect();
    let selections: Vec<crate::config::Selection> =
        src.selections.iter().map(|s| s.selection.clone()).collect();
    if entries.is_empty() {
        let _ = writeln!(
            h,
            "<p>No images listed yet: they appear after a sync has read this source.</p>"
        );
        return;
    }
    let arches: BTreeSet<&str> = entries.iter().map(|e| e.arch.as_str()).collect();
    // (os, release) → (title, latest version, arch → selected)
    type Row<'r> = (&'r str, &'r str, BTreeMap<&'r str, bool>);
    let mut rows: BTreeMap<(&str, &str), Row> = BTreeMap::new();
    for e in &entries {
        let row = rows.entry((e.os.as_str(), e.release.as_str())).or_insert((
            e.title.as_str(),
            e.version.as_str(),
            BTreeMap::new(),
        ));
        if e.version.as_str() > row.1 {
            row.1 = e.version.as_str();
        }
        let sel = row.2.entry(e.arch.as_str()).or_insert(false);
        *sel |= e.selected_by(&selections);
    }
    let _ = write!(
        h,
        "<table class=\"catalog\" data-source=\"{}\"><tr><th>OS</th><th>Release</th><th>Title</th>",
        src.id
    );
    for a in &arches {
        let _ = write!(h, "<th>{}</th>", esc(a));
    }
    let _ = writeln!(h, "<th>Latest version</th></tr>");
    for ((os, release), (title, version, by_arch)) in &rows {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td>",
            esc(os),
            esc(release),
            esc(title)
        );
        for a in &arches {
            match by_arch.get(a) {
                Some(selected) => {
                    let _ = write!(
                        h,
                        "<td><input type=\"checkbox\" class=\"arch\" data-source=\"{}\" data-os=\"{}\" data-release=\"{}\" data-arch=\"{}\" aria-label=\"{} {} {}\"{}></td>",
                        src.id,
                        esc(os),
                        esc(release),
                        esc(a),
                        esc(os),
                        esc(release),
                        esc(a),
                        if *selected { " checked" } else { "" }
                    );
                }
                None => h.push_str("<td></td>"),
            }
        }
        let _ = writeln!(h, "<td>{}</td></tr>", esc(version));
    }
    h.push_str("</table>\n");
}

/// The table of what is synced and served.
fn render_resources(h: &mut String, resources: &[ManifestProduct]) {
    let _ = writeln!(h, "<h2>Synced and served</h2>");
    if resources.is_empty() {
        let _ = writeln!(h, "<p>Nothing yet.</p>");
    } else {
        let _ = writeln!(
            h,
            "<table id=\"resources\"><tr><th>Resource</th><th>Version</th><th>Size</th><th>Files</th></tr>"
        );
        for r in resources {
            let size = r.size();
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                esc(&r.name),
                esc(&r.version_name),
                esc(&crate::sync::human_bytes(size)),
                r.items.len()
            );
        }
        h.push_str("</table>\n");
    }
}

/// Rows of "Recent boots" shown (the API and `rackboot boots` list them all).
const BOOT_ROWS: usize = 20;

/// The table of machines that booted lately, from the boot log.
fn render_boots(h: &mut String, boots: &[BootSummary]) {
    let _ = writeln!(h, "<h2>Recent boots</h2>");
    if boots.is_empty() {
        let _ = writeln!(
            h,
            "<p>No machine has asked for a boot file since the start.</p>"
        );
        return;
    }
    let _ = writeln!(
        h,
        "<table id=\"boots\"><tr><th>MAC</th><th>IP</th><th>Last step</th><th>Last file</th><th>Result</th><th>When</th></tr>"
    );
    for b in boots.iter().take(BOOT_ROWS) {
        let (file, result) = match &b.last_event {
            Some(e) => (e.file.as_str(), e.result.as_str()),
            None => ("", ""),
        };
        let failed = b.last_event.as_ref().is_some_and(|e| !e.ok);
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"step\">{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
            esc(b.mac.as_deref().unwrap_or("(not known yet)")),
            esc(&b.ip.map(|ip| ip.to_string()).unwrap_or_default()),
            esc(b.last_step.map_or("none", |s| s.label())),
            esc(file),
            if failed { "err" } else { "ok" },
            esc(result),
            esc(&when(Some(b.last_seen)))
        );
    }
    h.push_str("</table>\n");
}

/// Renders the page.
pub fn render(p: &Page) -> String {
    let mut h = String::new();
    let generation = p.generation.map(|g| g.to_string()).unwrap_or_default();
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>rackboot: images</title><style>{STYLE}</style></head>\n<body data-generation=\"{}\">\n<h1>Images</h1>\n",
        esc(&generation)
    );
    let _ = writeln!(
        h,
        "<p id=\"status\">{}</p>\n<p><span id=\"running\">{}</span> <progress id=\"progress\" hidden></progress></p>",
        esc(&status_line(p)),
        if p.status.running { "sync running" } else { "idle" }
    );
    let auto = if p.sync_auto {
        "Images sync automatically every few minutes."
    } else {
        "Automatic sync is paused (sync.auto = false)."
    };
    let _ = writeln!(h, "<p>{auto}</p>");
    if p.writes_enabled {
        let _ = writeln!(
            h,
            "<p><label>API token <input id=\"token\" type=\"password\" autocomplete=\"off\"></label></p>"
        );
    } else {
        let _ = writeln!(
            h,
            "<p>Changes are off: set <code>http.token_file</code> to allow them.<input id=\"token\" type=\"hidden\"></p>"
        );
    }
    let _ = writeln!(
        h,
        "<p><button id=\"save\">Save selection</button><button id=\"sync\">Sync now</button> <span id=\"message\"></span></p>"
    );

    // Catalog rows belong to a source by its id and URL: a source deleted or changed
    // since the catalog was written shows none (a catalog from before entries carried
    // them falls back to the source's position). Checkboxes show the selections as
    // they are now, which may be newer than the catalog.
    for (i, src) in p.sources.iter().enumerate() {
        render_source(&mut h, p, i, src);
    }

    render_resources(&mut h, p.resources);
    render_boots(&mut h, p.boots);
    let _ = write!(
        h,
        "<p>rackboot {}; <a href=\"/api/v1/status\">status</a>, <a href=\"/metrics\">metrics</a></p>\n<script>{SCRIPT}</script>\n</body></html>\n",
        esc(p.version)
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(arch: &str, release: &str, selected: bool) -> CatalogEntry {
        CatalogEntry {
            source: 0,
            os: "ubuntu".into(),
            release: release.into(),
            arch: arch.into(),
            subarch: "ga-24.04".into(),
            label: "stable".into(),
            version: "20261101".into(),
            title: "24.04 LTS".into(),
            size: 1,
            selected,
            source_id: 1,
            source_url: "http://mirror/<x>".into(),
            subarch_aliases: vec!["ga-24.04".into(), "generic".into()],
        }
    }

    /// Source 1, whose selection takes noble on amd64.
    fn source() -> StoredSource {
        StoredSource {
            id: 1,
            url: "http://mirror/<x>".into(),
            keyring_filename: None,
            keyring_data: None,
            unsigned: false,
            selections: vec![crate::state::StoredSelection {
                id: 1,
                selection: crate::config::Selection {
                    os: "ubuntu".into(),
                    release: "noble".into(),
                    arches: vec!["amd64".into()],
                    subarches: vec!["generic".into()],
                    labels: vec!["*".into()],
                },
            }],
        }
    }

    fn page_of<'a>(
        status: &'a SyncStatus,
        sources: &'a [StoredSource],
        catalog: &'a [CatalogEntry],
    ) -> String {
        render(&Page {
            version: "0.1.0",
            generation: Some(3),
            snapshot_created: Some(0),
            status,
            sync_auto: true,
            sources,
            catalog,
            resources: &[],
            writes_enabled: true,
            boots: &[],
        })
    }

    #[test]
    fn rows_follow_their_source_by_id_and_url_and_boxes_the_current_selection() {
        let status = SyncStatus::default();
        // The catalog was written when source 1 came first; it has been deleted, and
        // source 2 (whose upstream is down, so no newer catalog) is now first.
        let mut gone = entry("amd64", "noble", true);
        gone.source_url = "http://gone/".into();
        let mut two = source();
        two.id = 2;
        two.url = "http://two/".into();
        two.selections.clear();
        let html = page_of(&status, std::slice::from_ref(&two), &[gone]);
        assert!(!html.contains("data-arch=\"amd64\""), "{html}");
        assert!(html.contains("No images listed yet"), "{html}");
        // A selection saved since the last sync shows at once, through an alias.
        let stale = entry("amd64", "noble", false);
        let html = page_of(&status, &[source()], &[stale]);
        assert!(
            html.contains("data-source=\"1\" data-os=\"ubuntu\" data-release=\"noble\" data-arch=\"amd64\" aria-label=\"ubuntu noble amd64\" checked>"),
            "{html}"
        );
        // A selection dropped since is unchecked.
        let mut unselected = source();
        unselected.selections.clear();
        let html = page_of(&status, &[unselected], &[entry("amd64", "noble", true)]);
        assert!(!html.contains(" checked>"), "{html}");
    }

    #[test]
    fn credentials_in_a_source_url_or_an_error_are_not_shown() {
        let status = SyncStatus {
            last_result: Some("failed".into()),
            last_error: Some("http://u:hunter2@m/streams/v1/index.sjson: 401".into()),
            last_finished: Some(0),
            ..Default::default()
        };
        let mut s = source();
        s.url = "http://u:hunter2@m/".into();
        let html = page_of(&status, &[s], &[]);
        assert!(!html.contains("hunter2"), "{html}");
        assert!(html.contains("Boot source 1: http://***@m/"), "{html}");
    }

    #[test]
    fn checkboxes_follow_the_selection_and_outside_strings_are_escaped() {
        let mut hostile = entry("arm64", "noble\"><script>alert(1)</script>", false);
        hostile.title = "<b>x</b>".into();
        let catalog = vec![
            entry("amd64", "noble", true),
            entry("arm64", "noble", false),
            hostile,
        ];
        let status = SyncStatus {
            last_result: Some("failed".into()),
            last_error: Some("http://x/<y>: 503".into()),
            last_finished: Some(0),
            ..Default::default()
        };
        let sources = [source()];
        // A file name a client asked for is outside text too.
        let boots = [crate::serve::bootlog::BootSummary {
            mac: Some("52:54:00:12:34:56".into()),
            ip: None,
            first_seen: 0,
            last_seen: 0,
            last_step: Some(crate::serve::bootlog::Step::Config),
            events: 1,
            dropped: 0,
            last_event: Some(crate::serve::bootlog::Event {
                at_ms: 0,
                kind: crate::serve::bootlog::Kind::Http,
                ip: None,
                file: "x/<script>alert(2)</script>".into(),
                step: None,
                ok: false,
                result: "404".into(),
                bytes: Some(0),
                duration_ms: Some(0),
                config: None,
                config_for: None,
                arch: None,
            }),
        }];
        let html = render(&Page {
            version: "0.1.0",
            generation: Some(3),
            snapshot_created: Some(0),
            status: &status,
            sync_auto: true,
            sources: &sources,
            catalog: &catalog,
            resources: &[],
            writes_enabled: true,
            boots: &boots,
        });
        assert!(
            html.contains("<td>52:54:00:12:34:56</td><td></td><td class=\"step\">config</td><td>x/&lt;script&gt;alert(2)&lt;/script&gt;</td><td class=\"err\">404</td>"),
            "{html}"
        );
        assert!(html.contains("data-os=\"ubuntu\" data-release=\"noble\" data-arch=\"amd64\" aria-label=\"ubuntu noble amd64\" checked>"), "{html}");
        assert!(
            html.contains(
                "data-release=\"noble\" data-arch=\"arm64\" aria-label=\"ubuntu noble arm64\">"
            ),
            "{html}"
        );
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(html.contains("noble&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("&lt;b&gt;x&lt;/b&gt;"));
        assert!(html.contains("Boot source 1: http://mirror/&lt;x&gt;"));
        assert!(
            html.contains(
                "last sync failed at Thu, 01 Jan 1970 00:00:00 GMT: http://x/&lt;y&gt;: 503"
            ),
            "{html}"
        );
        assert!(html.contains("data-generation=\"3\""));
        // Exactly one script element: the page's own.
        assert_eq!(html.matches("<script>").count(), 1);
    }

    #[test]
    fn no_token_file_means_no_token_field() {
        let status = SyncStatus::default();
        let html = render(&Page {
            version: "0.1.0",
            generation: None,
            snapshot_created: None,
            status: &status,
            sync_auto: false,
            sources: &[source()],
            catalog: &[],
            resources: &[],
            writes_enabled: false,
            boots: &[],
        });
        assert!(html.contains("Changes are off"));
        assert!(html.contains("Automatic sync is paused"));
        assert!(html.contains("nothing served yet"));
        assert!(html.contains("No images listed yet"));
        assert!(html.contains("No machine has asked for a boot file"));
    }

    proptest::proptest! {
        #[test]
        fn escaped_text_has_no_markup(s in "\\PC{0,40}") {
            let e = esc(&s);
            proptest::prop_assert!(!e.contains('<') && !e.contains('>') && !e.contains('"') && !e.contains('\''));
        }
    }
}
