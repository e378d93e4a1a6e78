//! Per-machine boot settings, by MAC: an image (`os/release[/arch/subarch/label]`),
//! extra kernel parameters, or "boot from the local disk". Entries come from the
//! config's `[machines."<mac>"]` tables and from `state_dir/machines.json` (written
//! atomically by the CLI and the API; it wins over the config). Read at every boot
//! request, so changes apply without a restart. `kernel_params` is checked when set
//! (length, no control characters: [`crate::bootcfg::check_kernel_params`]);
//! `dhcp_boot` (what ProxyDHCP offers the machine) as a [`crate::dhcp::Override`].

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::bootcfg::Mac;
use crate::fsutil::{atomic_write, ctx};

/// Settings of one machine; unset fields fall back to `[boot]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_params: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_boot: Option<bool>,
    /// What ProxyDHCP offers this machine: `ipxe`, `local` (no answer) or a boot
    /// file ([`crate::dhcp::Override::parse`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp_boot: Option<String>,
}

/// An image reference: `os/release[/arch[/subarch[/label]]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    pub os: String,
    pub release: String,
    pub arch: Option<String>,
    pub subarch: Option<String>,
    pub label: Option<String>,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
        };
        if !(2..=5).contains(&parts.len()) || !parts.iter().all(|p| ok(p)) {
            return Err(format!(
                "image {s:?} is not os/release[/arch/subarch/label]"
            ));
        }
        let get = |i: usize| parts.get(i).map(|p| p.to_string());
        Ok(ImageRef {
            os: parts[0].into(),
            release: parts[1].into(),
            arch: get(2),
            subarch: get(3),
            label: get(4),
        })
    }
}

impl Machine {
    /// Sets a text field (`image`, `kernel_params`, `dhcp_boot`), for the CLI and the
    /// API alike: `None` or an empty value clears it, another is checked first (an image
    /// reference, kernel parameters, a `dhcp_boot` override).
    pub fn set_text(&mut self, field: &str, value: Option<&str>) -> Result<(), String> {
        type Check = fn(&str) -> Result<(), String>;
        let (slot, check): (_, Check) = match field {
            "image" => (&mut self.image, |v| ImageRef::parse(v).map(drop)),
            "kernel_params" => (&mut self.kernel_params, crate::bootcfg::check_kernel_params),
            "dhcp_boot" => (&mut self.dhcp_boot, |v| {
                crate::dhcp::Override::parse(v).map(drop)
            }),
            _ => {
                return Err(format!(
                    "unknown machine field {field:?} (image, kernel_params, local_boot, dhcp_boot)"
                ))
            }
        };
        match value.filter(|v| !v.is_empty()) {
            None => *slot = None,
            Some(v) => {
                check(v)?;
                *slot = Some(v.to_string());
            }
        }
        Ok(())
    }
}

/// Applies `key=value` pairs (the CLI).
pub fn apply_kv(m: &mut Machine, pairs: &[(String, String)]) -> Result<(), String> {
    for (k, v) in pairs {
        if k == "local_boot" {
            m.local_boot = Some(
                v.parse()
                    .map_err(|_| format!("local_boot={v:?}: expected true or false"))?,
            );
        } else {
            m.set_text(k, Some(v))?;
        }
    }
    Ok(())
}

/// Checks that a machine's `kernel_params` fit beside `[boot] kernel_params`: both
/// go on every command line, [`crate::bootcfg::MAX_EXTRA_PARAMS`] bytes together.
pub fn check_fits(m: &Machine, boot_params: &str) -> Result<(), String> {
    let own = m.kernel_params.as_deref().unwrap_or("");
    let together = own.len() + boot_params.len() + 1;
    if !own.trim().is_empty()
        && !boot_params.trim().is_empty()
        && together > crate::bootcfg::MAX_EXTRA_PARAMS
    {
        return Err(format!(
            "kernel_params is {} bytes and [boot] kernel_params {}: {together} together; at most {} are allowed",
            own.len(),
            boot_params.len(),
            crate::bootcfg::MAX_EXTRA_PARAMS
        ));
    }
    Ok(())
}

/// The machines in the state file.
pub fn load(state_dir: &Path) -> anyhow::Result<BTreeMap<Mac, Machine>> {
    let p = state_dir.join("machines.json");
    let raw: BTreeMap<String, Machine> = match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => anyhow::bail!("cannot read {}: {e}", p.display()),
    };
    raw.into_iter()
        .map(|(k, v)| {
            Ok((
                Mac::parse(&k).ok_or_else(|| anyhow::anyhow!("{}: bad MAC {k:?}", p.display()))?,
                v,
            ))
        })
        .collect()
}

pub fn save(state_dir: &Path, machines: &BTreeMap<Mac, Machine>) -> anyhow::Result<()> {
    let p = state_dir.join("machines.json");
    let raw: BTreeMap<String, &Machine> =
        machines.iter().map(|(k, v)| (k.to_string(), v)).collect();
    std::fs::create_dir_all(state_dir)?;
    ctx(
        atomic_write(&p, &serde_json::to_vec_pretty(&raw)?),
        "cannot write",
        &p,
    )
}

/// Config entries overlaid with the state's: what applies to `mac`.
pub fn effective(
    config: &BTreeMap<Mac, Machine>,
    state: &BTreeMap<Mac, Machine>,
    mac: &Mac,
) -> Machine {
    let base = config.get(mac).cloned().unwrap_or_default();
    match state.get(mac) {
        None => base,
        Some(s) => Machine {
            image: s.image.clone().or(base.image),
            kernel_params: s.kernel_params.clone().or(base.kernel_params),
            local_boot: s.local_boot.or(base.local_boot),
            dhcp_boot: s.dhcp_boot.clone().or(base.dhcp_boot),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_refs() {
        let r = ImageRef::parse("ubuntu/noble/amd64/ga-24.04/stable").unwrap();
        assert_eq!(r.arch.as_deref(), Some("amd64"));
        assert!(ImageRef::parse("ubuntu").is_err());
        assert!(ImageRef::parse("ubuntu/../etc").is_err());
        assert!(ImageRef::parse("a/b/c/d/e/f").is_err());
    }

    #[test]
    fn kernel_params_are_limited_alone_and_beside_the_boot_ones() {
        let mut m = Machine::default();
        let long = "a".repeat(crate::bootcfg::MAX_EXTRA_PARAMS + 1);
        let e = apply_kv(&mut m, &[("kernel_params".into(), long)]).unwrap_err();
        assert!(e.contains("kernel_params"), "{e}");
        let e = apply_kv(&mut m, &[("kernel_params".into(), "a\nKERNEL x".into())]).unwrap_err();
        assert!(e.contains("control character"), "{e}");
        apply_kv(&mut m, &[("kernel_params".into(), "a".repeat(600))]).unwrap();
        assert!(check_fits(&m, "").is_ok());
        assert!(check_fits(&m, &"b".repeat(400)).is_ok());
        let e = check_fits(&m, &"b".repeat(500)).unwrap_err();
        assert!(
            e.contains("[boot] kernel_params") && e.contains("1101"),
            "{e}"
        );
    }

    #[test]
    fn state_wins_over_config_field_by_field() {
        let mac = Mac::parse("52:54:00:00:00:01").unwrap();
        let config = BTreeMap::from([(
            mac,
            Machine {
                image: Some("a/b".into()),
                kernel_params: Some("x=1".into()),
                local_boot: None,
                dhcp_boot: Some("local".into()),
            },
        )]);
        let state = BTreeMap::from([(
            mac,
            Machine {
                kernel_params: Some("y=2".into()),
                ..Default::default()
            },
        )]);
        let e = effective(&config, &state, &mac);
        assert_eq!(e.image.as_deref(), Some("a/b"));
        assert_eq!(e.kernel_params.as_deref(), Some("y=2"));
        assert_eq!(e.dhcp_boot.as_deref(), Some("local"));
    }

    #[test]
    fn dhcp_boot_is_checked_when_set() {
        let mut m = Machine::default();
        apply_kv(&mut m, &[("dhcp_boot".into(), "ipxe".into())]).unwrap();
        assert_eq!(m.dhcp_boot.as_deref(), Some("ipxe"));
        let e = apply_kv(&mut m, &[("dhcp_boot".into(), "../x".into())]).unwrap_err();
        assert!(e.contains("dhcp_boot"), "{e}");
        apply_kv(&mut m, &[("dhcp_boot".into(), String::new())]).unwrap();
        assert_eq!(m.dhcp_boot, None);
    }
}
