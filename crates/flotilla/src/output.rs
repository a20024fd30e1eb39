//! Human and JSON output.

use flotilla_api::units::format_duration;
use flotilla_api::{Operation, Sandbox, Step, Timestamp};

/// Prints a value as pretty JSON.
pub fn json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    use std::io::Write;
    // An error, not a panic, when the reader went away (`| head`): main
    // treats a broken pipe as a clean end.
    writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(v)?)?;
    Ok(())
}

/// `error: cause: cause`, with the API error's details when useful.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut parts = Vec::new();
    for c in e.chain() {
        let s = c.to_string();
        if parts.last() != Some(&s) && !parts.iter().any(|p: &String| p.ends_with(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

/// "in 59m", "3s ago".
pub fn relative(t: Timestamp) -> String {
    let now = Timestamp::now();
    if t >= now {
        format!("in {}", format_duration(now.until(t)))
    } else {
        format!("{} ago", format_duration(t.until(now)))
    }
}

/// A left-aligned table with a header row.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        // A reader that went away (`| head`) ends the table, not the program.
        let _ = std::io::Write::write_all(&mut std::io::stdout(), format!("{}\n", s.trim_end()).as_bytes());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

pub fn sandbox_rows(list: &[Sandbox]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                s.name.clone(),
                s.state.to_string(),
                s.image.clone(),
                relative(s.created_at),
                s.delete_at.map(relative).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(&["ID", "NAME", "STATE", "IMAGE", "CREATED", "DELETE AT"], &rows);
}

pub fn sandbox_detail(s: &Sandbox) {
    let r = &s.resources;
    println!("id:         {}", s.id);
    println!("name:       {}", s.name);
    println!("state:      {}", s.state);
    if let Some(e) = &s.error {
        println!("error:      {e}");
    }
    println!("image:      {}", s.image);
    println!("backend:    {}", s.backend.as_str());
    println!("network:    {}", s.network.as_str());
    println!(
        "limits:     cpus {}, memory {}, pids {}",
        r.cpus.map(|c| c.to_string()).unwrap_or_else(|| "unlimited".into()),
        r.memory_bytes.map(flotilla_api::units::format_size).unwrap_or_else(|| "unlimited".into()),
        r.pids.map(|p| p.to_string()).unwrap_or_else(|| "unlimited".into()),
    );
    println!("created:    {} ({})", s.created_at, relative(s.created_at));
    match s.delete_at {
        Some(d) => println!("delete at:  {d} ({})", relative(d)),
        None => println!("delete at:  never"),
    }
    if let Some(idle) = s.idle_ttl_s {
        println!(
            "idle ttl:   {} (every exec, put, get or session renews the deadline)",
            format_duration(std::time::Duration::from_secs(idle))
        );
    }
    for (k, v) in &s.labels {
        println!("label:      {k}={v}");
    }
    for (k, v) in &s.env {
        println!("env:        {k}={v}");
    }
    steps(&s.steps);
}

fn steps(steps: &[Step]) {
    if let Some(first) = steps.first() {
        println!("steps:");
        for st in steps {
            let detail = st.detail.as_deref().map(|d| format!("  {d}")).unwrap_or_default();
            println!("  +{:>6}ms  {:<22}{detail}", first.at.until(st.at).as_millis(), st.name);
        }
    }
}

pub fn operation_rows(list: &[Operation]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|o| {
            vec![
                o.id.clone(),
                o.kind.as_str().to_string(),
                o.state.to_string(),
                o.target.clone(),
                o.steps.last().map(|s| s.name.clone()).unwrap_or_else(|| "-".into()),
                relative(o.created_at),
            ]
        })
        .collect();
    table(&["ID", "KIND", "STATE", "TARGET", "LAST STEP", "CREATED"], &rows);
}

pub fn operation_detail(o: &Operation) {
    println!("id:         {}", o.id);
    println!("kind:       {}", o.kind.as_str());
    println!("state:      {}", o.state);
    println!("target:     {}", o.target);
    println!("created:    {} ({})", o.created_at, relative(o.created_at));
    if let Some(f) = o.finished_at {
        println!("finished:   {f} (took {})", format_duration(o.created_at.until(f)));
    }
    if let Some(e) = &o.error {
        println!("error:      {}", operation_error(o, e));
    }
    steps(&o.steps);
}

/// "step `agent_up` failed: ..." for a failed operation.
pub fn operation_error(o: &Operation, e: &flotilla_api::ApiError) -> String {
    let step = e
        .details
        .as_ref()
        .and_then(|d| d.get("step"))
        .and_then(|s| s.as_str())
        .map(str::to_string)
        .or_else(|| o.steps.last().map(|s| s.name.clone()));
    match step {
        Some(step) if !e.message.contains(&format!("`{step}`")) => {
            format!("{} failed at step `{step}`: {} ({})", o.kind.as_str(), e.message, e.code.as_str())
        }
        _ => format!("{} ({})", e.message, e.code.as_str()),
    }
}

/// Progress of a long local job with named steps: a spinner on a terminal;
/// elsewhere (CI logs) one line per step, so a log shows where it got.
pub struct Steps {
    bar: Option<indicatif::ProgressBar>,
    last: String,
}

impl Steps {
    pub fn new(what: &str) -> Steps {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new_spinner().with_style(
                indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            b.enable_steady_tick(std::time::Duration::from_millis(120));
            b.set_message(what.to_string());
            b
        });
        Steps { bar, last: String::new() }
    }

    /// `step` may carry a count in parentheses ("compiling (120 files)"):
    /// the spinner shows it, a log gets a line only when the step changes.
    pub fn set(&mut self, step: &str) {
        match &self.bar {
            Some(b) => b.set_message(step.to_string()),
            None => {
                let name = step.split(" (").next().unwrap_or(step);
                if name != self.last {
                    eprintln!("  {name}");
                    self.last = name.to_string();
                }
            }
        }
    }

    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}
