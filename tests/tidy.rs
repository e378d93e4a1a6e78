//! The layout rules of `src/` (ARCHITECTURE.md, "Dependency rule"), checked by reading
//! the source, as rust-analyzer's `tidy` test does: every file has a module doc; imports
//! go one way down the layers, so the graph of top-level modules (a folder counts as
//! one) has no circle; only `main` imports `cli`; nothing below `serve/` imports it; the
//! transports (`http/`, `tftp/`, `dhcp/`) import only `fsutil`, `file_class` and `pktinfo`; the pure modules
//! touch no files, sockets, tokio, threads, processes or clocks; no function is over
//! 120 lines. Test code (`#[cfg(test)] mod … { … }`), comments and string literals are
//! not looked at.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers, top first: a module may import its own layer (without a circle) or lower.
const LAYERS: &[&[&str]] = &[
    &["main"],
    &["cli"],
    &["serve"],
    &["sync", "mirror"],
    &[
        "store", "state", "machines", "config", "upstream", "download", "archive", "reexport",
        "fsck", "systemd", "http", "tftp", "dhcp",
    ],
    &["select", "plan", "verify"],
    &[
        "simplestreams",
        "bootcfg",
        "fsutil",
        "file_class",
        "pktinfo",
    ],
];

/// Files that must stay pure (no I/O, no clock: time is passed in).
const PURE: &[&str] = &[
    "src/simplestreams.rs",
    "src/select.rs",
    "src/plan.rs",
    "src/bootcfg.rs",
    "src/file_class.rs",
    "src/tftp/packet.rs",
    "src/tftp/path.rs",
    "src/tftp/engine.rs",
    "src/serve/web.rs",
    "src/dhcp/proxy.rs",
];

/// What a pure file may not name (in code, outside its tests).
const IMPURE: &[&str] = &[
    "std::fs",
    "std::net",
    "std::process",
    "std::thread",
    "std::env",
    "std::os",
    "tokio",
    "nix::",
    "libc::",
    "socket2",
    "hyper",
    "Instant::now",
    "SystemTime::now",
    "UNIX_EPOCH.elapsed",
];

/// Transports are building blocks: of the crate they use only these.
const TRANSPORTS: &[&str] = &["http", "tftp", "dhcp"];
const TRANSPORT_MAY_USE: &[&str] = &["fsutil", "file_class", "pktinfo"];

fn src_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src/") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            src_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source with comments removed and string/char literal contents blanked, so that
/// only code is matched.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == b'/' && next == Some(b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && next == Some(b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if b[i] == b'\n' {
                        out.push('\n');
                    }
                    i += 1;
                }
            }
        } else if c == b'r' && (next == Some(b'"') || next == Some(b'#')) && !ident_before(b, i) {
            // Raw string: r"…" or r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            j += 1;
            let from = j;
            while j < b.len() && !b[j..].starts_with(&close) {
                j += 1;
            }
            out.push_str("\"\"");
            push_newlines(&mut out, &src[from..j.min(src.len())]);
            i = j + close.len();
        } else if c == b'"' {
            i += 1;
            let from = i;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            out.push_str("\"\"");
            push_newlines(&mut out, &src[from..i.min(src.len())]);
            i += 1;
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{7f}'), else a lifetime.
            if next == Some(b'\\') {
                i += 2;
                while i < b.len() && b[i] != b'\'' {
                    i += 1;
                }
                i += 1;
                out.push_str("' '");
            } else if let Some(len) = src[i + 1..].chars().next().map(char::len_utf8) {
                if b.get(i + 1 + len) == Some(&b'\'') {
                    i += 2 + len;
                    out.push_str("' '");
                } else {
                    out.push('\'');
                    i += 1;
                }
            } else {
                i += 1;
            }
        } else {
            let ch = src[i..].chars().next().expect("char");
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// The line breaks of removed text, so that line numbers in the code stay those of the
/// file.
fn push_newlines(out: &mut String, removed: &str) {
    out.extend(std::iter::repeat_n('\n', removed.matches('\n').count()));
}

fn ident_before(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

/// Where the `}` that closes the `{` at `open` stands (`None`: it is not closed).
fn closing_brace(code: &str, open: usize) -> Option<usize> {
    let mut depth = 0;
    for (k, ch) in code[open..].char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(open + k);
                }
            }
            _ => {}
        }
    }
    None
}

/// `code` without its `#[cfg(test)]` items (modules and functions: the brace block
/// after the attribute); their line breaks stay.
fn without_tests(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let Some(open) = after.find(['{', ';']) else {
            rest = "";
            break;
        };
        if after.as_bytes()[open] == b';' {
            push_newlines(&mut out, &after[..open + 1]);
            rest = &after[open + 1..];
            continue;
        }
        let end = closing_brace(after, open).map_or(after.len(), |c| c + 1);
        push_newlines(&mut out, &after[..end]);
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The top-level module a file belongs to: `src/serve/boot.rs` → `serve`.
fn top_module(rel: &Path) -> String {
    let first = rel.components().next().expect("path");
    let s = first.as_os_str().to_string_lossy();
    s.strip_suffix(".rs").unwrap_or(&s).to_string()
}

/// Top-level modules `code` names as `crate::x` (or `rackboot::x` from the binary).
fn imports(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        let before_ok = at == 0 || !ident_before(rest.as_bytes(), at);
        let tail = &rest[at + prefix.len()..];
        if before_ok {
            if let Some(group) = tail.strip_prefix('{') {
                // `use crate::{a, b::c}`: the first segment of each entry.
                let inner = &group[..group.find('}').unwrap_or(group.len())];
                for entry in inner.split(',') {
                    let name: String = entry
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        out.insert(name);
                    }
                }
            } else {
                let name: String = tail
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        }
        rest = &rest[at + prefix.len()..];
    }
    out
}

struct Tree {
    /// Path relative to `src/` → code without comments, literals and tests.
    code: BTreeMap<PathBuf, String>,
    /// Path relative to `src/` → the raw text.
    raw: BTreeMap<PathBuf, String>,
}

fn read_tree(root: &Path) -> Tree {
    let src = root.join("src");
    let mut files = Vec::new();
    src_files(&src, &mut files);
    let mut tree = Tree {
        code: BTreeMap::new(),
        raw: BTreeMap::new(),
    };
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read source");
        let rel = f.strip_prefix(&src).expect("below src").to_path_buf();
        tree.code
            .insert(rel.clone(), without_tests(&code_only(&text)));
        tree.raw.insert(rel, text);
    }
    tree
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// Every broken rule, one line each, naming the file and what it imports.
fn violations(tree: &Tree) -> Vec<String> {
    let mut bad = Vec::new();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, raw) in &tree.raw {
        if !raw.trim_start().starts_with("//!") {
            bad.push(format!(
                "src/{}: no module doc (`//!`) at the top",
                rel.display()
            ));
        }
    }
    for (rel, code) in &tree.code {
        let shown = format!("src/{}", rel.display());
        let module = top_module(rel);
        if module == "lib" {
            continue; // only declares the modules
        }
        let prefix = if module == "main" {
            "rackboot::"
        } else {
            "crate::"
        };
        let Some(layer) = layer_of(&module) else {
            bad.push(format!(
                "{shown}: module `{module}` has no layer in tests/tidy.rs (add it to LAYERS and ARCHITECTURE.md)"
            ));
            continue;
        };
        for dep in imports(code, prefix) {
            if dep == module {
                continue;
            }
            if dep == "cli" && module != "main" {
                bad.push(format!("{shown}: imports `cli`; only main may"));
            }
            if dep == "serve" && !["cli", "main"].contains(&module.as_str()) {
                bad.push(format!("{shown}: imports `serve`, which is above it"));
            }
            if TRANSPORTS.contains(&module.as_str()) && !TRANSPORT_MAY_USE.contains(&dep.as_str()) {
                bad.push(format!(
                    "{shown}: the transport imports `{dep}`; transports use only {TRANSPORT_MAY_USE:?}"
                ));
            }
            match layer_of(&dep) {
                Some(l) if l < layer => bad.push(format!(
                    "{shown}: imports `{dep}`, a layer above `{module}` (ARCHITECTURE.md, Dependency rule)"
                )),
                _ => {}
            }
            graph.entry(module.clone()).or_default().insert(dep);
        }
    }
    for pure in PURE {
        let rel = Path::new(pure.strip_prefix("src/").expect("src/ path"));
        let Some(code) = tree.code.get(rel) else {
            bad.push(format!(
                "{pure}: listed as pure in tests/tidy.rs but missing"
            ));
            continue;
        };
        for word in IMPURE {
            if code.contains(word) {
                bad.push(format!(
                    "{pure}: pure module names `{word}` (no I/O, no clock)"
                ));
            }
        }
    }
    if let Some(circle) = find_circle(&graph) {
        bad.push(format!(
            "import circle between modules: {}",
            circle.join(" → ")
        ));
    }
    bad
}

/// A circle in the module graph, as the list of modules along it.
fn find_circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|s| s == n) {
            let mut circle = stack[at..].to_vec();
            circle.push(n.to_string());
            return Some(circle);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for dep in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(dep, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        if let Some(c) = visit(n, graph, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

/// Longest a function in `src/` may be (its tests excepted), from `fn` to its closing
/// brace: a longer one has stages to name.
const MAX_FN_LINES: usize = 120;

/// The functions with a body in `code` (comments, literals and tests already out, line
/// breaks kept): name, first line, length in lines. A nested function counts on its
/// own and inside its parent.
fn functions(code: &str) -> Vec<(String, usize, usize)> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(k) = code[at..].find("fn ") {
        let start = at + k;
        at = start + 3;
        if ident_before(b, start) {
            continue;
        }
        let name: String = code[at..]
            .trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            continue;
        }
        // The body is the first `{` outside brackets; a `;` first is a declaration.
        let mut depth = 0i32;
        let mut open = None;
        for (j, c) in code[at..].char_indices() {
            match c {
                '(' | '[' => depth += 1,
                ')' | ']' => depth -= 1,
                ';' if depth == 0 => break,
                '{' if depth == 0 => {
                    open = Some(at + j);
                    break;
                }
                _ => {}
            }
        }
        let Some(open) = open else { continue };
        let close = closing_brace(code, open).unwrap_or(code.len());
        let first = code[..start].matches('\n').count() + 1;
        let last = code[..close].matches('\n').count() + 1;
        out.push((name, first, last - first + 1));
    }
    out
}

/// Every function over [`MAX_FN_LINES`], one line each: file, line, name, length.
fn long_functions(tree: &Tree) -> Vec<String> {
    let mut bad = Vec::new();
    for (rel, code) in &tree.code {
        for (name, line, len) in functions(code) {
            if len > MAX_FN_LINES {
                bad.push(format!(
                    "src/{}:{line}: fn {name} is {len} lines (at most {MAX_FN_LINES}: split it into named stages)",
                    rel.display()
                ));
            }
        }
    }
    bad
}

/// Applies `rule` to this crate's `src/`; fails listing what it found.
fn check_src(rule: fn(&Tree) -> Vec<String>, what: &str) {
    let bad = rule(&read_tree(Path::new(env!("CARGO_MANIFEST_DIR"))));
    assert!(bad.is_empty(), "{what}:\n{}", bad.join("\n"));
}

#[test]
fn no_function_in_src_is_over_120_lines() {
    check_src(long_functions, "functions too long");
}

/// The length check counts real lines: comments, multi-line strings and test modules
/// before a function do not shift it, braces in literals do not end it.
#[test]
fn the_length_check_measures_functions() {
    let body = |n: usize| "    let _x = 1;\n".repeat(n);
    let text = format!(
        "//! doc\n/* a\nblock */\nconst S: &str = \"multi\nline {{\";\n#[cfg(test)]\nmod tests {{\n    fn long() {{\n{}    }}\n}}\ntrait T {{ fn decl(&self) -> [u8; 4]; }}\nfn short() -> [u8; 2] {{\n    let _c = '}}';\n{}}}\nfn long_one() {{\n{}}}\n",
        body(200),
        body(MAX_FN_LINES - 3),
        body(MAX_FN_LINES - 1),
    );
    let mut tree = Tree {
        code: BTreeMap::new(),
        raw: BTreeMap::new(),
    };
    tree.code
        .insert(PathBuf::from("x.rs"), without_tests(&code_only(&text)));
    let fns = functions(&tree.code[Path::new("x.rs")]);
    let names: Vec<&str> = fns.iter().map(|f| f.0.as_str()).collect();
    assert_eq!(names, ["short", "long_one"], "{fns:?}");
    let short_line = text
        .lines()
        .position(|l| l.starts_with("fn short"))
        .unwrap()
        + 1;
    assert_eq!(fns[0], ("short".into(), short_line, MAX_FN_LINES));
    assert_eq!(fns[1].2, MAX_FN_LINES + 1);
    assert_eq!(
        long_functions(&tree),
        [format!(
            "src/x.rs:{}: fn long_one is {} lines (at most {MAX_FN_LINES}: split it into named stages)",
            short_line + MAX_FN_LINES,
            MAX_FN_LINES + 1
        )]
    );
}

#[test]
fn src_follows_the_dependency_rule() {
    check_src(violations, "layout rules broken");
}

/// The checker itself: each rule fires on a file that breaks it.
#[test]
fn the_checker_catches_forbidden_imports() {
    let file = |code: &str| (without_tests(&code_only(code)), code.to_string());
    let mut tree = Tree {
        code: BTreeMap::new(),
        raw: BTreeMap::new(),
    };
    let mut add = |path: &str, text: &str| {
        let (code, raw) = file(text);
        tree.code.insert(PathBuf::from(path), code);
        tree.raw.insert(PathBuf::from(path), raw);
    };
    add("simplestreams.rs", "//! ok\nuse std::fs;\n");
    add("select.rs", "//! ok\n// crate::cli in a comment\nconst S: &str = \"tokio\";\nfn f() { let _ = crate::serve::x; }\n#[cfg(test)]\nmod tests { use std::net::UdpSocket; use crate::cli; }\n");
    add(
        "plan.rs",
        "//! ok\nfn f<'a>(c: char) -> bool { c == '{' && crate::select::x() }\n",
    );
    add("store.rs", "//! ok\nuse crate::{sync, fsutil};\n");
    add("sync.rs", "//! ok\nuse crate::store::Store;\n");
    add(
        "http/mod.rs",
        "//! ok\nuse crate::config::Settings;\nuse crate::fsutil;\n",
    );
    add("bootcfg.rs", "no doc\n");
    let bad = violations(&tree);
    let has = |needle: &str| bad.iter().any(|l| l.contains(needle));
    assert!(
        has("src/simplestreams.rs: pure module names `std::fs`"),
        "{bad:#?}"
    );
    assert!(has("src/select.rs: imports `serve`"), "{bad:#?}");
    assert!(
        has("src/store.rs: imports `sync`, a layer above"),
        "{bad:#?}"
    );
    assert!(has("import circle between modules: "), "{bad:#?}");
    assert!(
        has("src/http/mod.rs: the transport imports `config`"),
        "{bad:#?}"
    );
    assert!(has("src/bootcfg.rs: no module doc"), "{bad:#?}");
    // Comments, strings, char literals and test modules are not code.
    assert!(!has("src/select.rs: imports `cli`"), "{bad:#?}");
    assert!(!has("select.rs: pure module names"), "{bad:#?}");
    assert!(
        !bad.iter().any(|l| l.starts_with("src/plan.rs")),
        "{bad:#?}"
    );
    // Only main may import cli.
    let mut tree = Tree {
        code: BTreeMap::new(),
        raw: BTreeMap::new(),
    };
    tree.code
        .insert(PathBuf::from("main.rs"), "rackboot::cli::run()".into());
    tree.code
        .insert(PathBuf::from("state.rs"), "crate::cli::x".into());
    let bad = violations(&tree);
    assert!(
        bad.iter()
            .any(|l| l == "src/state.rs: imports `cli`; only main may"),
        "{bad:#?}"
    );
    assert!(
        !bad.iter().any(|l| l.starts_with("src/main.rs")),
        "{bad:#?}"
    );
}
