//! Planning (pure): from the selection and what the store already holds to what to
//! fetch, what the new snapshot contains, and its `maas.meta`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::select::{subarch_dirs, ProductKind, Selected};
use crate::simplestreams::{Item, Sha256};

/// One product as recorded in a snapshot manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestProduct {
    pub content_id: String,
    pub product_name: String,
    pub version_name: String,
    /// `os/arch/subarch/release/label` for images, `bootloader/<type>/<arch>` for
    /// bootloaders.
    pub name: String,
    pub items: Vec<ManifestItem>,
    /// Product-level fields as published upstream (release_title, subarches, …).
    pub fields: BTreeMap<String, String>,
}

impl ManifestProduct {
    /// The bytes of all its files.
    pub fn size(&self) -> u64 {
        self.items.iter().map(|i| i.size).sum()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestItem {
    pub item_name: String,
    pub ftype: String,
    /// Path in the upstream stream.
    pub path: String,
    pub sha256: Sha256,
    pub size: u64,
}

/// An archive to unpack into `dir` of the snapshot (bootloaders).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchivePlan {
    pub sha256: Sha256,
    pub dir: String,
    pub bootloader_type: String,
    pub arch: String,
}

/// A payload and the source it is fetched from: its path is only meaningful below
/// that source's root (two sources may carry the same bytes under other paths).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedItem {
    /// Index of the source (as given to `select`).
    pub source: usize,
    pub item: Item,
}

impl std::ops::Deref for PlannedItem {
    type Target = Item;
    fn deref(&self) -> &Item {
        &self.item
    }
}

/// What a sync will do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Unique payloads missing from the store, in selection order.
    pub fetch: Vec<PlannedItem>,
    /// Payloads the store already holds.
    pub have: Vec<PlannedItem>,
    /// Snapshot files: served path → blob.
    pub files: BTreeMap<String, Sha256>,
    pub archives: Vec<ArchivePlan>,
    pub products: Vec<ManifestProduct>,
    /// The `maas.meta` document of the new snapshot (deterministic JSON).
    pub meta: String,
}

impl Plan {
    pub fn fetch_bytes(&self) -> u64 {
        self.fetch.iter().map(|i| i.size).sum()
    }
    pub fn total_bytes(&self) -> u64 {
        self.fetch_bytes() + self.have.iter().map(|i| i.size).sum::<u64>()
    }
}

fn nest(root: &mut Value, keys: &[&str], leaf: Value) {
    let mut cur = root;
    for k in keys {
        cur = cur
            .as_object_mut()
            .expect("maas.meta levels are objects")
            .entry(k.to_string())
            .or_insert_with(|| json!({}));
    }
    *cur = leaf;
}

/// Builds the plan. `have` tells whether the store holds a blob.
pub fn plan(selected: &Selected, have: &dyn Fn(&Sha256) -> bool) -> Plan {
    let mut p = Plan::default();
    let mut seen = BTreeSet::new();
    let mut meta = json!({});
    for product in &selected.products {
        let field = |k: &str| product.fields.get(k).cloned().unwrap_or_default();
        let name;
        match &product.kind {
            ProductKind::Image(key) => {
                name = key.to_string();
                for dir in subarch_dirs(&product.fields) {
                    for item in &product.items {
                        let dest = format!(
                            "{}/{}/{}/{}/{}/{}",
                            key.os,
                            key.arch,
                            dir,
                            key.release,
                            key.label,
                            item.path.file_name()
                        );
                        p.files.insert(dest, item.sha256);
                    }
                    let kflavor = match field("kflavor") {
                        k if k.is_empty() => "generic".to_string(),
                        k => k,
                    };
                    nest(
                        &mut meta,
                        &[&key.os, &key.arch, &dir, &kflavor, &key.release, &key.label],
                        json!({
                            "content_id": product.content_id,
                            "product_name": product.product_name,
                            "version_name": product.version_name,
                            "path": product.items[0].path.as_str(),
                            "subarches": field("subarches"),
                            "release_title": field("release_title"),
                            "release_codename": field("release_codename"),
                            "support_eol": field("support_eol"),
                            "kflavor": kflavor,
                        }),
                    );
                }
            }
            ProductKind::Bootloader {
                bootloader_type,
                os,
                arch,
            } => {
                let dir = format!("bootloader/{bootloader_type}/{arch}");
                name = dir.clone();
                for item in &product.items {
                    p.archives.push(ArchivePlan {
                        sha256: item.sha256,
                        dir: dir.clone(),
                        bootloader_type: bootloader_type.clone(),
                        arch: arch.clone(),
                    });
                }
                nest(
                    &mut meta,
                    &[
                        os,
                        arch,
                        "generic",
                        "bootloader",
                        bootloader_type,
                        &field("label"),
                    ],
                    json!({
                        "content_id": product.content_id,
                        "product_name": product.product_name,
                        "version_name": product.version_name,
                        "path": product.items[0].path.as_str(),
                        "bootloader-type": bootloader_type,
                    }),
                );
            }
        }
        for item in &product.items {
            if seen.insert(item.sha256) {
                let planned = PlannedItem {
                    source: product.source,
                    item: item.clone(),
                };
                if have(&item.sha256) {
                    p.have.push(planned);
                } else {
                    p.fetch.push(planned);
                }
            }
        }
        p.products.push(ManifestProduct {
            content_id: product.content_id.clone(),
            product_name: product.product_name.clone(),
            version_name: product.version_name.clone(),
            name,
            fields: product.fields.clone(),
            items: product
                .items
                .iter()
                .map(|i| ManifestItem {
                    item_name: i.item_name.clone(),
                    ftype: i.ftype.clone(),
                    path: i.path.to_string(),
                    sha256: i.sha256,
                    size: i.size,
                })
                .collect(),
        });
    }
    p.meta = serde_json::to_string_pretty(&meta).expect("json values serialise");
    p
}

/// Loaders served under a fixed name, by bootloader type and arch: the name, and the
/// archive members it is taken from (first found wins). MAAS serves lpxelinux.0
/// (HTTP-capable) as pxelinux.0.
fn fixed_names(
    bootloader_type: &str,
    arch: &str,
) -> &'static [(&'static str, &'static [&'static str])] {
    match (bootloader_type, arch) {
        ("pxe", _) => &[("pxelinux.0", &["lpxelinux.0", "pxelinux.0"])],
        ("uefi", "amd64") => &[
            (
                "bootx64.efi",
                &["bootx64.efi", "shimx64.efi.signed", "shimx64.efi"],
            ),
            (
                "grubx64.efi",
                &["grubx64.efi", "grubnetx64.efi.signed", "grubx64.efi.signed"],
            ),
        ],
        ("uefi", "arm64") => &[
            (
                "bootaa64.efi",
                &["bootaa64.efi", "shimaa64.efi.signed", "shimaa64.efi"],
            ),
            (
                "grubaa64.efi",
                &[
                    "grubaa64.efi",
                    "grubnetaa64.efi.signed",
                    "grubaa64.efi.signed",
                ],
            ),
        ],
        ("open-firmware", _) => &[("bootppc64.bin", &["bootppc64.bin", "grub.elf"])],
        _ => &[],
    }
}

/// Served names of bootloader archive members: (path at the snapshot root, member
/// path inside the archive). Firmware asks for the final names; archives may carry
/// either those or Debian's package names.
pub fn root_links(bootloader_type: &str, arch: &str, members: &[String]) -> Vec<(String, String)> {
    let has = |m: &str| members.iter().any(|x| x == m);
    let first = |cands: &[&str]| cands.iter().find(|c| has(c)).map(|c| c.to_string());
    let mut out = Vec::new();
    let mut link = |served: &str, member: Option<String>| {
        if let Some(m) = member {
            out.push((served.to_string(), m));
        }
    };
    if bootloader_type == "pxe" {
        for m in members {
            if !m.contains('/') && (m.ends_with(".c32") || m.ends_with(".0")) && m != "pxelinux.0" {
                link(m, Some(m.clone()));
            }
        }
    }
    for (served, cands) in fixed_names(bootloader_type, arch) {
        link(served, first(cands));
    }
    // GRUB module trees (grub/x86_64-efi/http.mod, …) are served at the root too.
    for m in members {
        if m.starts_with("grub/") && !m.ends_with('/') {
            out.push((m.clone(), m.clone()));
        }
    }
    out.sort();
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::Selection;
    use crate::simplestreams::{parse_products, RelPath};

    const D1: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const D2: &str = "0000000000000000000000000000000000000000000000000000000000000001";

    fn all() -> Selection {
        Selection {
            os: "*".into(),
            release: "*".into(),
            arches: vec!["*".into()],
            subarches: vec!["*".into()],
            labels: vec!["*".into()],
        }
    }

    fn verified(
        doc: &serde_json::Value,
    ) -> Option<crate::verify::Verified<crate::simplestreams::Products>> {
        let p = parse_products(&doc.to_string(), "c").ok()?;
        Some(
            crate::verify::accept_unsigned(String::new(), crate::verify::UnsignedSource(()))
                .map(|_| p),
        )
    }

    /// An image product and a bootloader product whose path-forming fields are `f`.
    fn hostile_doc(f: &[String; 7], kpath: &str) -> serde_json::Value {
        json!({"format": "products:1.0", "content_id": "c", "products": {
            "img": {"os": f[0], "arch": f[1], "subarch": f[2], "release": f[3], "label": f[4],
                    "kflavor": f[5], "rolling": "True",
                    "versions": {"1": {"items": {
                        "boot-kernel": {"ftype": "boot-kernel", "path": kpath, "size": 1, "sha256": D1}}}}},
            "bl": {"os": f[0], "arch": f[1], "arches": f[1], "bootloader-type": f[6], "label": f[4],
                   "versions": {"1": {"items": {
                       "a": {"ftype": "archive.tar.xz", "path": "bl/a.tar.xz", "size": 1, "sha256": D2}}}}}
        }})
    }

    fn field() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        const TRICKY: &[&str] = &[
            "amd64",
            "../../x",
            "/tmp/x",
            ".",
            "..",
            "file:/etc/passwd",
            "http://other/x",
            "",
        ];
        // Each tricky value as likely as each pattern.
        prop_oneof![
            TRICKY.len() as u32 => proptest::sample::select(TRICKY).prop_map(String::from),
            1 => "[a-z0-9./:%~_+\\-]{0,12}",
            1 => ".{0,8}",
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]
        /// Whatever strings upstream puts in the fields the layout is built from,
        /// the document is refused or every planned path stays below the snapshot.
        #[test]
        fn planned_paths_stay_under_the_root(
            f in proptest::array::uniform7(field()),
            kpath in field(),
            members in proptest::collection::vec("[a-z./]{1,10}", 0..4),
        ) {
            let Some(v) = verified(&hostile_doc(&f, &kpath)) else { return Ok(()); };
            let selected = crate::select::select(&[(vec![v], vec![all()])]);
            let p = plan(&selected, &|_| false);
            for path in p.files.keys() {
                proptest::prop_assert!(RelPath::parse(path).is_some(), "{path:?}");
            }
            let members: Vec<String> = members.into_iter().filter(|m| RelPath::parse(m).is_some()).collect();
            for a in &p.archives {
                proptest::prop_assert!(RelPath::parse(&a.dir).is_some(), "{:?}", a.dir);
                for (served, _) in root_links(&a.bootloader_type, &a.arch, &members) {
                    proptest::prop_assert!(RelPath::parse(&served).is_some(), "{served:?}");
                    let joined = format!("{}/{served}", a.dir);
                    proptest::prop_assert!(RelPath::parse(&joined).is_some());
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Items built by hand (no `parse_products` checks): `select` and `plan`
        /// still never plan a path outside the root.
        #[test]
        fn planned_paths_stay_under_the_root_without_parse_checks(
            f in proptest::array::uniform7(field()),
        ) {
            let good = [
                "ubuntu", "amd64", "ga-24.04", "noble", "stable", "generic", "pxe",
            ]
            .map(String::from);
            let Some(v) = verified(&hostile_doc(&good, "k/boot-kernel")) else {
                panic!("the good document parses");
            };
            let v = v.map(|mut p| {
                for item in &mut p.items {
                    for (k, val) in ["os", "arch", "subarch", "release", "label", "kflavor", "bootloader-type"]
                        .iter()
                        .zip(&f)
                    {
                        if item.props.contains_key(*k) {
                            item.props.insert(k.to_string(), val.clone());
                        }
                    }
                }
                p
            });
            let selected = crate::select::select(&[(vec![v], vec![all()])]);
            let p = plan(&selected, &|_| false);
            for path in p.files.keys() {
                proptest::prop_assert!(RelPath::parse(path).is_some(), "{path:?}");
            }
            for a in &p.archives {
                proptest::prop_assert!(RelPath::parse(&a.dir).is_some(), "{:?}", a.dir);
            }
        }
    }

    #[test]
    fn identical_bytes_from_two_sources_are_fetched_where_listed() {
        let image = |release: &str, path: &str| {
            json!({"format": "products:1.0", "content_id": "c", "products": {
                release: {"os": "ubuntu", "arch": "amd64", "subarch": "ga", "release": release, "label": "stable",
                    "versions": {"1": {"items": {
                        "boot-kernel": {"ftype": "boot-kernel", "path": path, "size": 1, "sha256": D1}}}}}}})
        };
        let a = verified(&image("jammy", "a/jammy/k")).unwrap();
        let b = verified(&image("noble", "b/noble/k")).unwrap();
        let selected = crate::select::select(&[(vec![a], vec![all()]), (vec![b], vec![all()])]);
        assert_eq!(selected.products.len(), 2);
        let p = plan(&selected, &|_| false);
        assert_eq!(p.fetch.len(), 1, "one download per digest");
        let f = &p.fetch[0];
        // The path is listed by the source the item is fetched from.
        assert_eq!((f.source, f.path.as_str()), (0, "a/jammy/k"));
        assert_eq!(p.files.len(), 2, "both images are served");
    }

    #[test]
    fn root_links_map_package_names() {
        let m = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let amd = root_links(
            "uefi",
            "amd64",
            &m(&[
                "shimx64.efi.signed",
                "grubnetx64.efi.signed",
                "grub/x86_64-efi/http.mod",
            ]),
        );
        assert_eq!(
            amd,
            vec![
                ("bootx64.efi".to_string(), "shimx64.efi.signed".to_string()),
                (
                    "grub/x86_64-efi/http.mod".into(),
                    "grub/x86_64-efi/http.mod".into()
                ),
                ("grubx64.efi".into(), "grubnetx64.efi.signed".into()),
            ]
        );
        let pxe = root_links(
            "pxe",
            "i386",
            &m(&["pxelinux.0", "lpxelinux.0", "ldlinux.c32"]),
        );
        assert!(pxe.contains(&("pxelinux.0".into(), "lpxelinux.0".into())));
        assert!(pxe.contains(&("lpxelinux.0".into(), "lpxelinux.0".into())));
        assert!(pxe.contains(&("ldlinux.c32".into(), "ldlinux.c32".into())));
    }
}
