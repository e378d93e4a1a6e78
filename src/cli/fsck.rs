//! `rackboot fsck [--repair]`: the store check ([`crate::fsck`]) as a command: one
//! line per problem, a summary, exit 1 when problems were found.

/// The command: waits for a running sync (the check must not see one half done),
/// prints each problem on one line and a summary.
pub fn cmd(settings: &crate::config::Settings, repair: bool, json: bool) -> anyhow::Result<()> {
    let store = crate::store::Store::existing(&settings.state_dir);
    if !store.root().join("blobs/sha256").is_dir() {
        anyhow::bail!(
            "{} is not a rackboot store (no blobs/sha256)",
            store.root().display()
        );
    }
    let _lock = store.lock(true, |msg| eprintln!("rackboot: {msg}; waiting for it"))?;
    let r = crate::fsck::check(&store, repair)
        .map_err(|e| anyhow::anyhow!("checking {}: {e}", store.root().display()))?;
    if json {
        let v = serde_json::json!({
            "problems": r.problems.iter().map(|p| serde_json::json!({
                "path": p.path, "problem": p.what, "repaired": p.repaired,
            })).collect::<Vec<_>>(),
            "blobs": r.blobs, "bytes": r.bytes, "files": r.files,
            "generations": r.generations, "leftovers": r.leftovers,
        });
        println!("{v:#}");
    } else {
        for p in &r.problems {
            println!("{p}");
        }
        eprintln!(
            "fsck: {} blobs ({}) re-hashed, {} files in {} generations checked, \
             {} leftovers of interrupted runs, {} problems",
            r.blobs,
            crate::sync::human_bytes(r.bytes),
            r.files,
            r.generations,
            r.leftovers,
            r.problems.len()
        );
    }
    if r.problems.is_empty() {
        Ok(())
    } else {
        Err(crate::fsck::ProblemsFound(r.problems.len()).into())
    }
}
