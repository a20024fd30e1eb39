//! `flotilla queue`: what the scheduler sees and why builds wait.

use crate::cli::NodeArgs;
use crate::output;

pub async fn show(node: NodeArgs, json: bool) -> anyhow::Result<i32> {
    let c = crate::coordinator::client(&node)?;
    let q = c.queue().await?;
    if json {
        output::json(&q)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = q
        .nodes
        .iter()
        .map(|n| {
            if !n.up {
                return vec![
                    n.name.clone(),
                    "down".into(),
                    String::new(),
                    String::new(),
                    String::new(),
                    n.running.to_string(),
                    n.error.clone().unwrap_or_default(),
                ];
            }
            vec![
                n.name.clone(),
                "up".into(),
                n.platform.clone(),
                format!("{}/{}", n.used_millicpus as f64 / 1000.0, n.millicpus as f64 / 1000.0),
                format!("{}/{} MiB", n.used_memory_bytes >> 20, n.memory_bytes >> 20),
                n.running.to_string(),
                String::new(),
            ]
        })
        .collect();
    output::table(&["NODE", "STATE", "PLATFORM", "CPUS", "MEMORY", "BUILDS", "ERROR"], &rows);
    println!();
    if q.waiting.is_empty() {
        println!("no builds waiting");
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = q
        .builders
        .iter()
        .map(|b| {
            vec![
                b.builder.clone(),
                b.waiting.to_string(),
                output::relative(b.oldest),
                output::relative(b.newest),
                b.last_moved.map_or_else(|| "-".into(), output::relative),
            ]
        })
        .collect();
    output::table(&["BUILDER", "WAITING", "OLDEST", "NEWEST", "LAST STARTED"], &rows);
    println!();
    let rows: Vec<Vec<String>> = q
        .waiting
        .iter()
        .map(|w| {
            vec![
                w.build.to_string(),
                w.run.to_string(),
                w.project.clone(),
                w.builder.clone(),
                w.priority.clone(),
                output::relative(w.queued_at),
                w.reason.clone(),
            ]
        })
        .collect();
    output::table(&["BUILD", "RUN", "PROJECT", "BUILDER", "PRIORITY", "QUEUED", "WHY IT WAITS"], &rows);
    Ok(0)
}
