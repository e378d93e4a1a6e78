//! `boot-sources`, `boot-source-selections` and `machines`: `key=value` arguments
//! (MAAS CLI style) applied to `sources.json` / `machines.json` under the state lock.

use serde_json::json;

use crate::config::{self, Selection, Settings};
use crate::select::split_list;
use crate::state::{Sources, StoredSource};

use super::{print_json, usage, Cli};
/// Parses `key=value` arguments (MAAS CLI style).
fn kv(args: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    args.iter()
        .map(|a| {
            a.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.to_string()))
                .ok_or_else(|| usage(format!("argument {a:?} is not key=value")))
        })
        .collect()
}

fn id_arg(args: &[String], i: usize, what: &str) -> anyhow::Result<u64> {
    let a = args
        .get(i)
        .ok_or_else(|| usage(format!("missing {what}")))?;
    a.parse()
        .map_err(|_| usage(format!("{what} {a:?} is not a number")))
}

/// What `key=value` arguments edit: a field at a time, then the whole is checked.
trait KvFields {
    /// Its name in errors.
    const WHAT: &'static str;
    /// Sets field `k` to `v`; `Ok(false)`: no such field.
    fn set(&mut self, k: &str, v: &str) -> anyhow::Result<bool>;
    fn check(&self) -> anyhow::Result<()>;
}

fn apply_kv<T: KvFields>(t: &mut T, pairs: &[(String, String)]) -> anyhow::Result<()> {
    for (k, v) in pairs {
        if !t.set(k, v)? {
            return Err(usage(format!("unknown {} field {k:?}", T::WHAT)));
        }
    }
    t.check()
}

impl KvFields for StoredSource {
    const WHAT: &'static str = "boot-source";

    fn set(&mut self, k: &str, v: &str) -> anyhow::Result<bool> {
        match k {
            "url" => self.url = v.to_string(),
            "keyring_filename" => self.keyring_filename = (!v.is_empty()).then(|| v.into()),
            "keyring_data" => self.keyring_data = (!v.is_empty()).then(|| v.to_string()),
            "unsigned" => {
                self.unsigned = v
                    .parse()
                    .map_err(|_| usage(format!("unsigned={v:?}: expected true or false")))?
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn check(&self) -> anyhow::Result<()> {
        config::check_source(&self.config()).map_err(usage)
    }
}

impl KvFields for Selection {
    const WHAT: &'static str = "selection";

    fn set(&mut self, k: &str, v: &str) -> anyhow::Result<bool> {
        match k {
            "os" => self.os = v.to_string(),
            "release" => self.release = v.to_string(),
            "arches" => self.arches = split_list(v).collect(),
            "subarches" => self.subarches = split_list(v).collect(),
            "labels" => self.labels = split_list(v).collect(),
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.release.is_empty() {
            return Err(usage("a selection needs release=…"));
        }
        Ok(())
    }
}

/// A new selection made from `key=value` pairs over MAAS's defaults (ubuntu, every
/// arch, subarch and label; the release must be given).
fn selection_from_kv(pairs: &[(String, String)]) -> anyhow::Result<Selection> {
    let mut sel = Selection::maas_default();
    apply_kv(&mut sel, pairs)?;
    Ok(sel)
}

/// The boot sources for `op`; unless it only reads, with the state lock, held by the
/// caller until the changed file is written, so no concurrent edit is lost.
fn load_for(
    settings: &Settings,
    op: &str,
) -> anyhow::Result<(Option<crate::state::StateLock>, Sources)> {
    let lock = (op != "read")
        .then(|| crate::state::StateLock::acquire(&settings.state_dir))
        .transpose()?;
    Ok((lock, Sources::current(settings)?))
}

pub(super) fn cmd_sources(
    cli: &Cli,
    settings: &Settings,
    op: &str,
    args: &[String],
) -> anyhow::Result<()> {
    let (_lock, mut sources) = load_for(settings, op)?;
    match op {
        "read" => {
            if cli.json {
                return print_json(&crate::serve::routes::shown_sources(&sources.sources));
            }
            for s in &sources.sources {
                let keyring = s
                    .keyring_filename
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .or(s
                        .keyring_data
                        .as_ref()
                        .map(|_| "<inline keyring_data>".into()))
                    .unwrap_or_else(|| "<unsigned>".into());
                println!(
                    "{}\t{}\t{}\t{} selections",
                    s.id,
                    crate::config::redacted(&s.url),
                    keyring,
                    s.selections.len()
                );
            }
            return Ok(());
        }
        "create" => {
            let pairs = kv(args)?;
            sources.add_source(|s| apply_kv(s, &pairs))?;
        }
        "update" => {
            let id = id_arg(args, 0, "boot source id")?;
            let pairs = kv(&args[1..])?;
            sources.edit_source(id, |s| apply_kv(s, &pairs))?;
        }
        "delete" => {
            sources.delete_source(id_arg(args, 0, "boot source id")?)?;
        }
        other => {
            return Err(usage(format!(
                "unknown boot-sources operation {other:?} (read, create, update, delete)"
            )))
        }
    }
    std::fs::create_dir_all(&settings.state_dir)?;
    sources.save(&settings.state_dir)?;
    if cli.json {
        print_json(&crate::serve::routes::shown_sources(&sources.sources))
    } else {
        println!("saved; the next sync applies it");
        Ok(())
    }
}

pub(super) fn cmd_selections(
    cli: &Cli,
    settings: &Settings,
    op: &str,
    args: &[String],
) -> anyhow::Result<()> {
    let (_lock, mut sources) = load_for(settings, op)?;
    let source_id = id_arg(args, 0, "boot source id")?;
    match op {
        "read" => {
            let source = sources
                .sources
                .iter()
                .find(|s| s.id == source_id)
                .ok_or(crate::state::EditError::NoSource(source_id))?;
            if cli.json {
                return print_json(&source.selections);
            }
            for s in &source.selections {
                let sel = &s.selection;
                println!(
                    "{}\tos={}\trelease={}\tarches={}\tsubarches={}\tlabels={}",
                    s.id,
                    sel.os,
                    sel.release,
                    sel.arches.join(","),
                    sel.subarches.join(","),
                    sel.labels.join(",")
                );
            }
            return Ok(());
        }
        "create" => {
            let sel = selection_from_kv(&kv(&args[1..])?)?;
            sources.add_selection(source_id, sel)?;
        }
        "update" => {
            let id = id_arg(args, 1, "selection id")?;
            let pairs = kv(&args[2..])?;
            sources.edit_selection(source_id, id, |s| apply_kv(s, &pairs))?;
        }
        "delete" => {
            sources.delete_selection(source_id, id_arg(args, 1, "selection id")?)?;
        }
        other => {
            return Err(usage(format!(
                "unknown boot-source-selections operation {other:?} (read, create, update, delete)"
            )))
        }
    }
    std::fs::create_dir_all(&settings.state_dir)?;
    sources.save(&settings.state_dir)?;
    if !cli.json {
        println!("saved; the next sync applies it");
    }
    Ok(())
}

pub(super) fn cmd_machines(
    cli: &Cli,
    settings: &Settings,
    op: &str,
    args: &[String],
) -> anyhow::Result<()> {
    use crate::bootcfg::Mac;
    let mac_arg = |i: usize| -> anyhow::Result<Mac> {
        let a = args.get(i).ok_or_else(|| usage("missing MAC address"))?;
        Mac::parse(a).ok_or_else(|| usage(format!("{a:?} is not a MAC address")))
    };
    let _lock = (op != "read")
        .then(|| crate::state::StateLock::acquire(&settings.state_dir))
        .transpose()?;
    let mut state = crate::machines::load(&settings.state_dir)?;
    match op {
        "read" => {
            let macs: Vec<Mac> = match args.first() {
                Some(_) => vec![mac_arg(0)?],
                None => settings
                    .machines
                    .keys()
                    .chain(state.keys())
                    .copied()
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect(),
            };
            let all: serde_json::Map<String, serde_json::Value> = macs
                .iter()
                .map(|m| {
                    (
                        m.to_string(),
                        json!(crate::machines::effective(&settings.machines, &state, m)),
                    )
                })
                .collect();
            if cli.json {
                return print_json(&all);
            }
            for (mac, m) in &all {
                println!(
                    "{mac}\timage={}\tkernel_params={}\tlocal_boot={}\tdhcp_boot={}",
                    m["image"].as_str().unwrap_or("(default)"),
                    m["kernel_params"].as_str().unwrap_or(""),
                    m["local_boot"].as_bool().unwrap_or(false),
                    m["dhcp_boot"].as_str().unwrap_or("(default)")
                );
            }
            Ok(())
        }
        "set" => {
            let mac = mac_arg(0)?;
            let pairs = kv(&args[1..])?;
            crate::machines::apply_kv(state.entry(mac).or_default(), &pairs).map_err(usage)?;
            let merged = crate::machines::effective(&settings.machines, &state, &mac);
            crate::machines::check_fits(&merged, &settings.boot.kernel_params).map_err(usage)?;
            crate::machines::save(&settings.state_dir, &state)?;
            if cli.json {
                print_json(&crate::machines::effective(
                    &settings.machines,
                    &state,
                    &mac,
                ))
            } else {
                println!("saved {mac}; applies to its next boot");
                Ok(())
            }
        }
        "delete" => {
            let mac = mac_arg(0)?;
            if state.remove(&mac).is_none() {
                anyhow::bail!(
                    "no settings for {mac} in {}/machines.json",
                    settings.state_dir.display()
                );
            }
            crate::machines::save(&settings.state_dir, &state)?;
            if !cli.json {
                println!("deleted {mac}");
            }
            Ok(())
        }
        other => Err(usage(format!(
            "unknown machines operation {other:?} (set, read, delete)"
        ))),
    }
}
