//! Selection (pure): which products of verified streams the rack keeps.
//!
//! MAAS semantics: an image (os, arch, subarch, release, label) is taken when it
//! matches any selection of its source (`"*"` matches all); bootloader products are
//! always taken for every arch that has a selected image; of each product only the
//! latest version (lexically greatest name) that has downloadable items is kept.
//! With several sources, the first source that provides an image wins.

use std::collections::{BTreeMap, BTreeSet};

use crate::simplestreams::{Item, Products, Segment};
use crate::verify::Verified;

/// A boot-source selection (MAAS semantics; `"*"` matches everything).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Selection {
    pub os: String,
    pub release: String,
    pub arches: Vec<String>,
    pub subarches: Vec<String>,
    pub labels: Vec<String>,
}

impl Selection {
    /// MAAS's defaults for a new selection (the CLI's and the API's): ubuntu, every
    /// arch, subarch and label; the release is left to be given.
    pub fn maas_default() -> Selection {
        Selection {
            os: "ubuntu".into(),
            release: String::new(),
            arches: vec!["*".into()],
            subarches: vec!["*".into()],
            labels: vec!["*".into()],
        }
    }
}

/// A comma-separated list as the CLI and the API take one: items trimmed, empty ones
/// dropped.
pub fn split_list(v: &str) -> impl Iterator<Item = String> + '_ {
    v.split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Item types a rack downloads for boot images.
pub const IMAGE_FTYPES: &[&str] = &["boot-kernel", "boot-initrd", "boot-dtb", "squashfs"];
/// Item types of bootloader products.
pub const BOOTLOADER_FTYPES: &[&str] = &["archive.tar.xz"];
/// Item types rackboot knows and deliberately does not download.
pub const KNOWN_SKIPPED_FTYPES: &[&str] = &[
    "manifest",
    "squashfs.manifest",
    "root-tgz.manifest",
    "root-image.gz",
    "root-tgz",
    "root-tbz",
    "root-txz",
    "root-dd",
    "root-dd.tar",
    "root-dd.raw",
    "root-dd.gz",
    "root-dd.bz2",
    "root-dd.xz",
    "root-dd.tar.xz",
    "root-dd.tar.bz2",
    "bootloader",
    "notifications",
    "lxd.tar.xz",
    "disk-kvm.img",
];

/// The identity of an image in the rack layout.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageKey {
    pub os: String,
    pub arch: String,
    pub subarch: String,
    pub release: String,
    pub label: String,
}

impl std::fmt::Display for ImageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}/{}",
            self.os, self.arch, self.subarch, self.release, self.label
        )
    }
}

/// One selected product version and the items to keep of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectedProduct {
    /// Index of the source (in the order given to [`select`]) it comes from.
    pub source: usize,
    pub content_id: String,
    pub product_name: String,
    pub version_name: String,
    pub kind: ProductKind,
    /// Flattened product-level fields of the first item (for maas.meta and status).
    pub fields: BTreeMap<String, String>,
    pub items: Vec<Item>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProductKind {
    Image(ImageKey),
    Bootloader {
        bootloader_type: String,
        os: String,
        arch: String,
    },
}

/// What a sync keeps, in a stable order, plus the unknown ftypes it skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selected {
    pub products: Vec<SelectedProduct>,
    pub skipped_ftypes: BTreeSet<String>,
}

fn matches(list: &[String], value: &str) -> bool {
    list.iter().any(|v| v == "*" || v == value)
}

fn selection_matches(sel: &Selection, key: &ImageKey, aliases: &[String]) -> bool {
    (sel.os == "*" || sel.os == key.os)
        && (sel.release == "*" || sel.release == key.release)
        && matches(&sel.arches, &key.arch)
        && matches(&sel.labels, &key.label)
        && (matches(&sel.subarches, &key.subarch)
            || aliases.iter().any(|a| matches(&sel.subarches, a)))
}

/// The subarch directories an image product is served under (MAAS rack layout):
/// its own subarch, `generic` for GA / first-HWE generic kernels, and the
/// `…-rolling` name for rolling releases.
pub fn subarch_dirs(fields: &BTreeMap<String, String>) -> Vec<String> {
    let get = |k: &str| fields.get(k).map(String::as_str).unwrap_or("");
    let subarch = get("subarch");
    if subarch.is_empty() {
        return vec!["generic".into()];
    }
    let mut dirs = vec![subarch.to_string()];
    let release = get("release");
    let first = release.chars().next().map(String::from).unwrap_or_default();
    if get("kflavor") == "generic"
        && (subarch.starts_with("ga-") || subarch == format!("hwe-{first}"))
    {
        dirs.push("generic".into());
    }
    if matches!(get("rolling"), "True" | "true" | "1") {
        let mut parts: Vec<&str> = subarch.split('-').collect();
        if parts.len() >= 2 {
            parts[1] = "rolling";
            dirs.push(parts.join("-"));
        }
    }
    dirs.dedup();
    dirs
}

fn image_key(item: &Item) -> Option<ImageKey> {
    let release = item.prop("release");
    if release.is_empty() || !item.prop("bootloader-type").is_empty() {
        return None;
    }
    let os = match item.prop("os") {
        "" => "ubuntu",
        os => os,
    };
    let subarch = match item.prop("subarch") {
        "" => "generic",
        s => s,
    };
    let key = ImageKey {
        os: os.to_string(),
        arch: item.prop("arch").to_string(),
        subarch: subarch.to_string(),
        release: release.to_string(),
        label: item.prop("label").to_string(),
    };
    // Every part names a directory of the rack layout. `parse_products` refused
    // unsafe values already; an empty arch or label has no directory.
    [&key.os, &key.arch, &key.subarch, &key.release, &key.label]
        .iter()
        .all(|p| Segment::parse(p).is_some())
        .then_some(key)
}

fn product_fields(item: &Item) -> BTreeMap<String, String> {
    const ITEM_KEYS: &[&str] = &[
        "ftype",
        "path",
        "size",
        "sha256",
        "md5",
        "sha512",
        "item_name",
    ];
    item.props
        .iter()
        .filter(|(k, _)| !ITEM_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Keeps, for one product, the latest version that has wanted items.
fn latest<'a>(versions: &BTreeMap<&'a str, Vec<&'a Item>>) -> Option<(&'a str, Vec<&'a Item>)> {
    versions
        .iter()
        .rev()
        .find(|(_, items)| !items.is_empty())
        .map(|(v, items)| (*v, items.clone()))
}

/// Selects from the verified products of each source, in source order.
pub fn select(sources: &[(Vec<Verified<Products>>, Vec<Selection>)]) -> Selected {
    let mut out = Selected::default();
    let mut taken_images: BTreeMap<ImageKey, ()> = BTreeMap::new();
    let mut image_arches: BTreeSet<String> = BTreeSet::new();
    let mut bootloader_candidates: Vec<SelectedProduct> = Vec::new();

    for (source, (products, selections)) in sources.iter().enumerate() {
        let grouped = group_items(products, &mut out.skipped_ftypes);
        for ((content_id, product_name), versions) in &grouped {
            let Some((version, items)) = latest(versions) else {
                continue;
            };
            let first = items[0];
            let fields = product_fields(first);
            let btype = first.prop("bootloader-type");
            if !btype.is_empty() {
                if Segment::parse(first.prop("arch")).is_none() || Segment::parse(btype).is_none() {
                    continue; // no directory to unpack it into
                }
                let Some(items) = of_ftypes(&items, BOOTLOADER_FTYPES) else {
                    continue;
                };
                bootloader_candidates.push(SelectedProduct {
                    source,
                    content_id: content_id.to_string(),
                    product_name: product_name.to_string(),
                    version_name: version.to_string(),
                    kind: ProductKind::Bootloader {
                        bootloader_type: btype.to_string(),
                        os: first.prop("os").to_string(),
                        arch: first.prop("arch").to_string(),
                    },
                    fields,
                    items,
                });
                continue;
            }
            let Some(key) = image_key(first) else {
                continue;
            };
            let aliases = subarch_dirs(&fields);
            if !selections
                .iter()
                .any(|s| selection_matches(s, &key, &aliases))
            {
                continue;
            }
            if taken_images.contains_key(&key) {
                continue; // an earlier source provides this image
            }
            let Some(items) = of_ftypes(&items, IMAGE_FTYPES) else {
                continue;
            };
            taken_images.insert(key.clone(), ());
            image_arches.insert(key.arch.clone());
            out.products.push(SelectedProduct {
                source,
                content_id: content_id.to_string(),
                product_name: product_name.to_string(),
                version_name: version.to_string(),
                kind: ProductKind::Image(key),
                fields,
                items,
            });
        }
    }

    out.products
        .extend(bootloaders_for(bootloader_candidates, &image_arches));
    out
}

/// The items of one of `ftypes`, if there are any.
fn of_ftypes(items: &[&Item], ftypes: &[&str]) -> Option<Vec<Item>> {
    let kept: Vec<Item> = items
        .iter()
        .filter(|i| ftypes.contains(&i.ftype.as_str()))
        .map(|i| (*i).clone())
        .collect();
    (!kept.is_empty()).then_some(kept)
}

/// (content id, product name) → version → the wanted items of one source's products.
type Grouped<'a> = BTreeMap<(&'a str, &'a str), BTreeMap<&'a str, Vec<&'a Item>>>;

/// Groups the items of one source by product and version, keeping the wanted ones
/// (an unknown ftype goes to `skipped`; a version without wanted items stays, empty).
fn group_items<'a>(
    products: &'a [Verified<Products>],
    skipped: &mut BTreeSet<String>,
) -> Grouped<'a> {
    let mut grouped = Grouped::new();
    for p in products {
        for item in &p.get().items {
            let ftype = item.ftype.as_str();
            let wanted = IMAGE_FTYPES.contains(&ftype) || BOOTLOADER_FTYPES.contains(&ftype);
            if !wanted && !KNOWN_SKIPPED_FTYPES.contains(&ftype) {
                skipped.insert(ftype.to_string());
            }
            let versions = grouped
                .entry((item.content_id.as_str(), item.product_name.as_str()))
                .or_default();
            let items = versions.entry(item.version_name.as_str()).or_default();
            if wanted {
                items.push(item);
            }
        }
    }
    grouped
}

/// Bootloaders for every arch that has an image; first source wins per (type, arch).
fn bootloaders_for(
    candidates: Vec<SelectedProduct>,
    image_arches: &BTreeSet<String>,
) -> Vec<SelectedProduct> {
    let mut out = Vec::new();
    let mut taken_bootloaders = BTreeSet::new();
    for bl in candidates {
        let ProductKind::Bootloader {
            bootloader_type,
            arch,
            ..
        } = &bl.kind
        else {
            continue;
        };
        let serves: BTreeSet<String> = bl
            .fields
            .get("arches")
            .map(|a| a.split(',').map(|s| s.trim().to_string()).collect())
            .unwrap_or_else(|| BTreeSet::from([arch.clone()]));
        if serves.is_disjoint(image_arches) {
            continue;
        }
        if taken_bootloaders.insert((bootloader_type.clone(), arch.clone())) {
            out.push(bl);
        }
    }
    out
}

/// One image a boot source offers (its latest version), for the Images page and
/// `boot-resources`: what could be selected, and whether the selections take it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CatalogEntry {
    /// Index of the source (0-based, in source order).
    pub source: usize,
    pub os: String,
    pub release: String,
    pub arch: String,
    pub subarch: String,
    pub label: String,
    pub version: String,
    /// `release_title` (e.g. `24.04 LTS`), else the release.
    pub title: String,
    /// Bytes of the items a rack downloads (kernel, initrd, dtb, squashfs).
    pub size: u64,
    pub selected: bool,
    /// The source's id and URL in `sources.json` when the catalog was written: the
    /// page keys rows by them, not by position (a source deleted since must not lend
    /// its rows to the next one). Empty in catalogs written before they existed.
    #[serde(default)]
    pub source_id: u64,
    #[serde(default)]
    pub source_url: String,
    /// Other subarch names the image is served under (`generic`, `…-rolling`).
    #[serde(default)]
    pub subarch_aliases: Vec<String>,
}

impl CatalogEntry {
    /// Whether `selections` (e.g. the current ones, not the last sync's) take it.
    pub fn selected_by(&self, selections: &[Selection]) -> bool {
        let key = ImageKey {
            os: self.os.clone(),
            arch: self.arch.clone(),
            subarch: self.subarch.clone(),
            release: self.release.clone(),
            label: self.label.clone(),
        };
        selections
            .iter()
            .any(|s| selection_matches(s, &key, &self.subarch_aliases))
    }
}

/// Every image of the verified sources with whether the selections take it.
pub fn catalog(sources: &[(Vec<Verified<Products>>, Vec<Selection>)]) -> Vec<CatalogEntry> {
    let mut out = Vec::new();
    for (source, (products, selections)) in sources.iter().enumerate() {
        let mut grouped: BTreeMap<(&str, &str), BTreeMap<&str, Vec<&Item>>> = BTreeMap::new();
        for p in products {
            for item in &p.get().items {
                if IMAGE_FTYPES.contains(&item.ftype.as_str()) {
                    grouped
                        .entry((item.content_id.as_str(), item.product_name.as_str()))
                        .or_default()
                        .entry(item.version_name.as_str())
                        .or_default()
                        .push(item);
                }
            }
        }
        for versions in grouped.values() {
            let Some((version, items)) = latest(versions) else {
                continue;
            };
            let Some(key) = image_key(items[0]) else {
                continue;
            };
            let fields = product_fields(items[0]);
            let aliases = subarch_dirs(&fields);
            let title = fields
                .get("release_title")
                .cloned()
                .unwrap_or_else(|| key.release.clone());
            out.push(CatalogEntry {
                source,
                selected: selections
                    .iter()
                    .any(|s| selection_matches(s, &key, &aliases)),
                source_id: 0,
                source_url: String::new(),
                subarch_aliases: aliases.clone(),
                os: key.os,
                release: key.release,
                arch: key.arch,
                subarch: key.subarch,
                label: key.label,
                version: version.to_string(),
                title,
                size: items.iter().map(|i| i.size).sum(),
            });
        }
    }
    out.sort_by(|a, b| {
        (a.source, &a.os, &a.release, &a.arch, &a.subarch, &a.label)
            .cmp(&(b.source, &b.os, &b.release, &b.arch, &b.subarch, &b.label))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simplestreams::parse_products;

    fn doc() -> String {
        let d = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let item = |f: &str, p: &str| {
            format!(r#""{f}":{{"ftype":"{f}","path":"{p}","size":1,"sha256":"{d}"}}"#)
        };
        format!(
            r#"{{"format":"products:1.0","content_id":"c","products":{{
            "p:22.04:amd64:ga-22.04":{{"os":"ubuntu","release":"jammy","arch":"amd64","subarch":"ga-22.04","kflavor":"generic","label":"stable",
              "versions":{{"20250101":{{"items":{{{}}}}},"20250805":{{"items":{{{},{}}}}},"20250900":{{"items":{{{}}}}}}}}},
            "p:22.04:arm64:hwe-22.04":{{"os":"ubuntu","release":"jammy","arch":"arm64","subarch":"hwe-22.04","kflavor":"generic","label":"stable",
              "versions":{{"20250805":{{"items":{{{}}}}}}}}},
            "b:pxelinux:pxe:i386":{{"os":"pxelinux","arch":"i386","arches":"i386,amd64","bootloader-type":"pxe","label":"stable",
              "versions":{{"20210819.0":{{"items":{{{}}}}}}}}},
            "b:grub-efi:uefi:arm64":{{"os":"grub-efi","arch":"arm64","arches":"arm64","bootloader-type":"uefi","label":"stable",
              "versions":{{"20210819.0":{{"items":{{{}}}}}}}}}
            }}}}"#,
            item("boot-kernel", "old/k"),
            item("boot-kernel", "new/k"),
            item("boot-initrd", "new/i"),
            item("manifest", "newer/manifest"),
            item("boot-kernel", "arm/k"),
            item("archive.tar.xz", "bl/pxe.tar.xz"),
            item("archive.tar.xz", "bl/grub.tar.xz"),
        )
    }

    fn sel(release: &str, arches: &[&str], subarches: &[&str]) -> Selection {
        Selection {
            os: "ubuntu".into(),
            release: release.into(),
            arches: arches.iter().map(|s| s.to_string()).collect(),
            subarches: subarches.iter().map(|s| s.to_string()).collect(),
            labels: vec!["*".into()],
        }
    }

    fn run(selections: Vec<Selection>) -> Selected {
        let p = parse_products(&doc(), "c").unwrap();
        let v = crate::verify::accept_unsigned(String::new(), crate::verify::UnsignedSource(()))
            .map(|_| p);
        select(&[(vec![v], selections)])
    }

    #[test]
    fn latest_version_with_wanted_items_and_bootloaders_for_selected_arches() {
        let s = run(vec![sel("jammy", &["amd64"], &["*"])]);
        let names: Vec<_> = s
            .products
            .iter()
            .map(|p| {
                (
                    p.product_name.as_str(),
                    p.version_name.as_str(),
                    p.items.len(),
                )
            })
            .collect();
        // 20250900 only has a manifest: the latest *usable* version is 20250805.
        assert_eq!(
            names,
            vec![
                ("p:22.04:amd64:ga-22.04", "20250805", 2),
                ("b:pxelinux:pxe:i386", "20210819.0", 1),
            ]
        );
        assert!(s.skipped_ftypes.is_empty());
    }

    #[test]
    fn subarch_generic_alias_selects_ga_but_not_hwe() {
        let s = run(vec![sel("jammy", &["*"], &["generic"])]);
        let names: Vec<_> = s.products.iter().map(|p| p.product_name.as_str()).collect();
        assert!(names.contains(&"p:22.04:amd64:ga-22.04"));
        assert!(!names.contains(&"p:22.04:arm64:hwe-22.04"));
        let s = run(vec![sel("jammy", &["arm64"], &["*"])]);
        let names: Vec<_> = s.products.iter().map(|p| p.product_name.as_str()).collect();
        assert_eq!(
            names,
            vec!["p:22.04:arm64:hwe-22.04", "b:grub-efi:uefi:arm64"]
        );
    }

    #[test]
    fn catalog_lists_every_image_with_its_selection() {
        let p = parse_products(&doc(), "c").unwrap();
        let v = crate::verify::accept_unsigned(String::new(), crate::verify::UnsignedSource(()))
            .map(|_| p);
        let c = catalog(&[(vec![v], vec![sel("jammy", &["amd64"], &["*"])])]);
        let got: Vec<(&str, &str, &str, u64, bool)> = c
            .iter()
            .map(|e| {
                (
                    e.arch.as_str(),
                    e.subarch.as_str(),
                    e.version.as_str(),
                    e.size,
                    e.selected,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("amd64", "ga-22.04", "20250805", 2, true),
                ("arm64", "hwe-22.04", "20250805", 1, false),
            ],
            "bootloaders are not listed; versions with only a manifest do not count"
        );
        assert_eq!(c[0].title, "jammy");
    }

    #[test]
    fn nothing_selected_means_no_bootloaders() {
        let s = run(vec![sel("focal", &["*"], &["*"])]);
        assert!(s.products.is_empty());
    }

    #[test]
    fn subarch_dirs_follow_maas() {
        let f = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(
            subarch_dirs(&f(&[
                ("subarch", "ga-22.04"),
                ("kflavor", "generic"),
                ("release", "jammy")
            ])),
            vec!["ga-22.04", "generic"]
        );
        assert_eq!(
            subarch_dirs(&f(&[
                ("subarch", "hwe-22.04"),
                ("kflavor", "generic"),
                ("release", "jammy")
            ])),
            vec!["hwe-22.04"]
        );
        assert_eq!(
            subarch_dirs(&f(&[
                ("subarch", "hwe-x"),
                ("kflavor", "generic"),
                ("release", "xenial")
            ])),
            vec!["hwe-x", "generic"]
        );
        assert_eq!(
            subarch_dirs(&f(&[("subarch", "hwe-24.04-edge"), ("rolling", "True")])),
            vec!["hwe-24.04-edge", "hwe-rolling-edge"]
        );
        assert_eq!(subarch_dirs(&f(&[])), vec!["generic"]);
    }
}
