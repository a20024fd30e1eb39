//! Parsing and printing of the human units the CLI and config accept:
//! durations (`90s`, `1h30m`, `500ms`) and sizes (`512M`, `2G`, `1.5GiB`).

use std::time::Duration;

/// Parses a duration made of `<number><unit>` parts: `ms`, `s`, `m`, `h`,
/// `d`. A bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let n_end = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        if n_end == 0 {
            return Err(format!("bad duration {s:?}: expected a number at {rest:?}"));
        }
        let n: f64 = rest[..n_end].parse().map_err(|_| format!("bad number in duration {s:?}"))?;
        rest = &rest[n_end..];
        let u_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let unit = match &rest[..u_end] {
            "ms" => 0.001,
            "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            u => return Err(format!("bad duration {s:?}: unknown unit {u:?} (use ms, s, m, h, d)")),
        };
        rest = &rest[u_end..];
        // Checked: a config is a stranger's input, and `from_secs_f64`
        // panics past what a Duration holds.
        let part = Duration::try_from_secs_f64(n * unit).map_err(|_| format!("duration {s:?} is too long"))?;
        total = total.checked_add(part).ok_or_else(|| format!("duration {s:?} is too long"))?;
    }
    Ok(total)
}

/// Prints a duration compactly: `1h2m`, `45s`, `250ms`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    let (h, m, sec) = (s / 3600, s % 3600 / 60, s % 60);
    match (h, m, sec) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, 0, _) if h % 24 == 0 => format!("{}d", h / 24),
        (h, 0, _) => format!("{h}h"),
        (h, m, _) => format!("{h}h{m}m"),
    }
}

/// Parses a byte size: `512M`, `2G`, `1.5GiB`, `4096`. Units are binary
/// (K = 1024) whether or not written with an `i`, as `docker -m` does.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let n_end = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    if n_end == 0 {
        return Err(format!("bad size {s:?}: expected a number"));
    }
    let n: f64 = t[..n_end].parse().map_err(|_| format!("bad number in size {s:?}"))?;
    let unit = t[n_end..].trim().to_ascii_lowercase();
    let mult: u64 = match unit.trim_end_matches('b').trim_end_matches('i') {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        u => return Err(format!("bad size {s:?}: unknown unit {u:?} (use K, M, G, T)")),
    };
    Ok((n * mult as f64) as u64)
}

/// Prints a byte size with a binary unit: `512MiB`, `1.5GiB`.
pub fn format_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 || v.fract() == 0.0 { format!("{}{}", v as u64, UNITS[i]) } else { format!("{v:.1}{}", UNITS[i]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        // Regression: `timeout = "1000000000000000d"` in a flotilla.toml panicked the poller.
        assert!(parse_duration("1000000000000000d").unwrap_err().contains("too long"));
        assert!(parse_duration("18446744073709551615s1s").unwrap_err().contains("too long"));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        assert!(parse_duration("5x").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("h").is_err());
        assert_eq!(format_duration(Duration::from_secs(3720)), "1h2m");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_secs(45)), "45s");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("10kb").unwrap(), 10240);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert_eq!(format_size(512 << 20), "512MiB");
        assert_eq!(format_size(3 << 29), "1.5GiB");
        assert_eq!(format_size(12), "12B");
    }
}
