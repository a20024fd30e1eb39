//! `flotilla`: one binary for every role. This file only parses, sets up
//! logging, runs, and maps the outcome to an exit code.
#![forbid(unsafe_code)]

mod cli;
mod daemon;
mod doctor;
mod image;
mod names;
mod ops;
mod output;
mod sandbox;
mod transfer;

use clap::Parser;

/// Our arguments. As a microVM's PID 1 the kernel may put command-line
/// words it did not recognise before ours: start at `agent` there.
fn argv() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if std::process::id() == 1
        && let Some(i) = args.iter().position(|a| a == "agent")
    {
        args.drain(1..i);
    }
    args
}

fn main() {
    let args = cli::Cli::parse_from(argv());
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(if args.command.is_daemon() { "info" } else { "warn" }));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
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
