//! `shmgrpc ls` and `shmgrpc gc`.

use std::time::Duration;

use shmgrpc::inventory::{self, SegmentInfo};

#[derive(clap::Args)]
pub(crate) struct LsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub(crate) struct GcArgs {
    /// Only show what would be removed.
    #[arg(long)]
    dry_run: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn json(list: &[SegmentInfo]) -> serde_json::Value {
    serde_json::Value::Array(
        list.iter()
            .map(|s| {
                serde_json::json!({
                    "backend": s.backend.to_string(),
                    "name": s.name,
                    "pid": s.pid,
                    "alive": s.alive,
                    "size": s.size,
                    "age_s": s.age.map(|a| a.as_secs()),
                    "uid": s.uid,
                    "attached": s.attached,
                })
            })
            .collect(),
    )
}

fn age(d: Option<Duration>) -> String {
    match d.map(|d| d.as_secs()) {
        None => "-".into(),
        Some(s) if s < 120 => format!("{s}s"),
        Some(s) if s < 7200 => format!("{}m", s / 60),
        Some(s) if s < 172_800 => format!("{}h", s / 3600),
        Some(s) => format!("{}d", s / 86_400),
    }
}

fn table(list: &[SegmentInfo]) {
    println!(
        "{:<7} {:>8} {:<5} {:>12} {:>6} {:>6} {:>4}  NAME",
        "BACKEND", "PID", "STATE", "SIZE", "AGE", "UID", "ATT"
    );
    for s in list {
        println!(
            "{:<7} {:>8} {:<5} {:>12} {:>6} {:>6} {:>4}  {}",
            s.backend.to_string(),
            s.pid.map_or("-".into(), |p| p.to_string()),
            if s.alive { "alive" } else { "dead" },
            s.size,
            age(s.age),
            s.uid,
            s.attached.map_or("-".into(), |a| a.to_string()),
            s.name
        );
    }
}

pub(crate) fn ls(a: LsArgs) -> anyhow::Result<()> {
    let list = inventory::list()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json(&list))?);
    } else if list.is_empty() {
        println!("no shmgrpc segments");
    } else {
        table(&list);
    }
    Ok(())
}

pub(crate) fn gc(a: GcArgs) -> anyhow::Result<()> {
    let list = inventory::gc(a.dry_run)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json(&list))?);
        return Ok(());
    }
    let verb = if a.dry_run { "would remove" } else { "removed" };
    if list.is_empty() {
        println!("no orphaned segments");
    } else {
        table(&list);
        println!("{verb} {} segment(s), {} bytes", list.len(), list.iter().map(|s| s.size).sum::<u64>());
    }
    Ok(())
}
