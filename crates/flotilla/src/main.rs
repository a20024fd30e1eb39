//! `flotilla`: one binary for every role. This file only parses, sets up
//! logging, runs, and maps the outcome to an exit code.
#![forbid(unsafe_code)]

mod app;
mod cli;
mod coordinator;
mod daemon;
mod doctor;
mod image;
mod names;
mod ops;
mod output;
mod project;
mod queue;
mod run;
mod sandbox;
mod secret;
mod transfer;
mod update;

/// Our arguments. As a microVM's PID 1 the kernel hands us the command-line
/// words it did not recognise: before ours (start at `agent`), and after
/// ours whatever QEMU appended (with ACPI off it lists its devices as
/// `virtio_mmio.device=…`, which the kernel has already read): drop those
/// `name=value` words, none of which is a flag of ours.
fn argv() -> Vec<std::ffi::OsString> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if std::process::id() == 1 {
        return init_argv(args);
    }
    args
}

fn init_argv(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    if let Some(i) = args.iter().position(|a| a == "agent") {
        args.drain(1..i);
    }
    args.retain(|a| {
        let a = a.to_string_lossy();
        a.starts_with('-') || !a.contains('=')
    });
    args
}

fn main() {
    let args = cli::parse(argv());
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(if args.command.is_daemon() { "info" } else { "warn" }));
    // Colours only on a terminal: a node's stderr is often a log file (and
    // after a revert by the watchdog, HOME/update.log).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    let code = match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            // A closed pipe (`flotilla ... | head`) is not a failure.
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                0
            } else {
                eprintln!("error: {}", output::error_text(&e));
                1
            }
        }
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    #[test]
    fn init_argv_keeps_only_our_words() {
        let words = |s: &str| s.split(' ').map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert_eq!(
            super::init_argv(words("/init nokaslr agent --init --vm virtio_mmio.device=512@0xfeb00e00:12")),
            words("/init agent --init --vm")
        );
        assert_eq!(
            super::init_argv(words("/init agent --init --vm --probe")),
            words("/init agent --init --vm --probe")
        );
    }
}
