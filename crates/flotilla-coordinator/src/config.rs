//! `flotilla.toml`: builders and triggers.
