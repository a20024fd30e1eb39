//! An instance's output on disk: one file per run, split when it grows past
//! a size, the oldest files dropped beyond a count, and every line stamped
//! with the time the node received it and the stream it came on.
//!
//! `logs/run-<RUN>.<PART>.log` (zero-padded, so names sort in order), lines
//! `2026-12-04T15:50:01.123Z out hello`. The node's own notes about the run
//! (started, exited, restarting) are lines on stream `---`.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use flotilla_api::Timestamp;

/// A file is split once it is this large (as Nomad and Kubernetes: 10 MiB).
pub const DEFAULT_FILE_BYTES: u64 = 10 << 20;

/// Files kept per instance, across its runs.
pub const DEFAULT_FILES: usize = 5;

/// A partial line is written out once it is this long.
const MAX_LINE: usize = 64 << 10;

/// Which stream a line came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Out,
    Err,
    Note,
}

impl Stream {
    fn tag(self) -> &'static str {
        match self {
            Stream::Out => "out",
            Stream::Err => "err",
            Stream::Note => "---",
        }
    }
}

/// Size and count limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub file_bytes: u64,
    pub files: usize,
}

impl Limits {
    /// The defaults, or `FLOTILLA_APP_LOG_BYTES` / `FLOTILLA_APP_LOG_FILES`.
    pub fn from_env() -> Limits {
        let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        Limits {
            file_bytes: env("FLOTILLA_APP_LOG_BYTES").unwrap_or(DEFAULT_FILE_BYTES).max(1024),
            files: env("FLOTILLA_APP_LOG_FILES").map(|n| n as usize).unwrap_or(DEFAULT_FILES).max(2),
        }
    }
}

/// Writes one run's output.
#[derive(Debug)]
pub struct LogWriter {
    dir: PathBuf,
    run: u64,
    part: u32,
    file: std::fs::File,
    size: u64,
    limits: Limits,
    partial: [Vec<u8>; 2],
}

fn file_name(run: u64, part: u32) -> String {
    format!("run-{run:08}.{part:04}.log")
}

fn parse_name(name: &str) -> Option<(u64, u32)> {
    let rest = name.strip_prefix("run-")?.strip_suffix(".log")?;
    let (run, part) = rest.split_once('.')?;
    Some((run.parse().ok()?, part.parse().ok()?))
}

/// Every log file in `dir` as `(run, part, path)`, oldest first.
pub fn files(dir: &Path) -> Vec<(u64, u32, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<_> = rd
        .filter_map(|e| {
            let e = e.ok()?;
            let (run, part) = parse_name(&e.file_name().to_string_lossy())?;
            Some((run, part, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// The files of one run, in order.
pub fn run_files(dir: &Path, run: u64) -> Vec<PathBuf> {
    files(dir).into_iter().filter(|(r, _, _)| *r == run).map(|(_, _, p)| p).collect()
}

/// The runs that still have output, oldest first.
pub fn runs(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = files(dir).into_iter().map(|(r, _, _)| r).collect();
    v.dedup();
    v
}

impl LogWriter {
    /// Opens run `run` for appending (its last part, or a new one).
    pub fn open(dir: &Path, run: u64, limits: Limits) -> io::Result<LogWriter> {
        std::fs::create_dir_all(dir)?;
        let part = files(dir).into_iter().filter(|(r, _, _)| *r == run).map(|(_, p, _)| p).max().unwrap_or(0);
        let path = dir.join(file_name(run, part));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        let w = LogWriter { dir: dir.to_path_buf(), run, part, file, size, limits, partial: [Vec::new(), Vec::new()] };
        w.prune();
        Ok(w)
    }

    /// Writes output bytes; complete lines go out stamped with `now`, a
    /// trailing partial line waits for its end (or [`LogWriter::flush`]).
    pub fn write(&mut self, stream: Stream, data: &[u8], now: Timestamp) -> io::Result<()> {
        let slot = if stream == Stream::Err { 1 } else { 0 };
        let mut rest = data;
        while let Some(i) = rest.iter().position(|b| *b == b'\n') {
            let mut line = std::mem::take(&mut self.partial[slot]);
            line.extend_from_slice(&rest[..i]);
            self.line(stream, &line, now)?;
            rest = &rest[i + 1..];
        }
        self.partial[slot].extend_from_slice(rest);
        if self.partial[slot].len() >= MAX_LINE {
            let line = std::mem::take(&mut self.partial[slot]);
            self.line(stream, &line, now)?;
        }
        Ok(())
    }

    /// Writes out partial lines (at the end of a run).
    pub fn flush(&mut self, now: Timestamp) -> io::Result<()> {
        for (slot, stream) in [(0, Stream::Out), (1, Stream::Err)] {
            if !self.partial[slot].is_empty() {
                let line = std::mem::take(&mut self.partial[slot]);
                self.line(stream, &line, now)?;
            }
        }
        Ok(())
    }

    /// A note from the node about the run.
    pub fn note(&mut self, text: &str, now: Timestamp) -> io::Result<()> {
        self.line(Stream::Note, text.as_bytes(), now)
    }

    fn line(&mut self, stream: Stream, line: &[u8], now: Timestamp) -> io::Result<()> {
        let mut buf = Vec::with_capacity(line.len() + 30);
        write!(buf, "{now} {} ", stream.tag())?;
        buf.extend_from_slice(line);
        buf.push(b'\n');
        if self.size > 0 && self.size + buf.len() as u64 > self.limits.file_bytes {
            self.part += 1;
            self.file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(file_name(self.run, self.part)))?;
            self.size = 0;
            self.prune();
        }
        self.file.write_all(&buf)?;
        self.size += buf.len() as u64;
        Ok(())
    }

    /// Drops the oldest files beyond the count.
    fn prune(&self) {
        let all = files(&self.dir);
        if all.len() > self.limits.files {
            for (_, _, p) in &all[..all.len() - self.limits.files] {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_stamped_split_by_size_and_pruned() {
        let d = tempfile::tempdir().unwrap();
        let limits = Limits { file_bytes: 1024, files: 3 };
        let mut w = LogWriter::open(d.path(), 1, limits).unwrap();
        w.write(Stream::Out, b"hel", Timestamp(0)).unwrap();
        w.write(Stream::Err, b"oops\n", Timestamp(0)).unwrap();
        w.write(Stream::Out, b"lo\nwor", Timestamp(1000)).unwrap();
        w.flush(Timestamp(2000)).unwrap();
        let text = std::fs::read_to_string(&run_files(d.path(), 1)[0]).unwrap();
        assert_eq!(
            text,
            "1970-01-01T00:00:00.000Z err oops\n1970-01-01T00:00:01.000Z out hello\n1970-01-01T00:00:02.000Z out wor\n"
        );
        for i in 0..200 {
            w.write(Stream::Out, format!("line {i}\n").as_bytes(), Timestamp(3000)).unwrap();
        }
        let all = files(d.path());
        assert_eq!(all.len(), 3, "only the newest files are kept: {all:?}");
        assert!(all.iter().all(|(_, _, p)| std::fs::metadata(p).unwrap().len() <= 1024));
        let last = std::fs::read_to_string(&all[2].2).unwrap();
        assert!(last.ends_with("out line 199\n"), "{last}");
        // A new run starts its own file; the older run's are kept (up to the count).
        let mut w2 = LogWriter::open(d.path(), 2, limits).unwrap();
        w2.note("started", Timestamp(4000)).unwrap();
        assert_eq!(runs(d.path()), [1, 2]);
        assert_eq!(run_files(d.path(), 2).len(), 1);
    }
}
