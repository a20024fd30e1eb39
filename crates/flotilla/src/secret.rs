//! `flotilla secret …`: a project's secrets (sealed by the coordinator,
//! given to builds of trusted changes, masked in logs).

use std::io::Read as _;

use anyhow::{Context, bail};
use clap::Subcommand;

use crate::cli::NodeArgs;
use crate::output;

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Set a secret; the value is read from stdin (a trailing newline is dropped). Builders get it
    /// as an environment variable by listing it: secrets = ["NAME"] in flotilla.toml. Builds of
    /// watched branches get it; try runs never do. Every log masks it (and its base64 and URL
    /// forms).
    #[command(after_help = "Example:\n  printf %s \"$PYPI_TOKEN\" | flotilla secret set demo PYPI_TOKEN\n  \
        flotilla secret set demo DEPLOY_KEY < ~/.ssh/deploy_key")]
    Set { project: String, name: String },
    /// List a project's secrets: names and when each was set, never values.
    #[command(alias = "list")]
    Ls { project: String },
    /// Remove a secret; builders that list it fail until it is set again.
    #[command(alias = "remove")]
    Rm { project: String, name: String },
}

pub async fn run(cmd: SecretCommand, node: NodeArgs, json: bool) -> anyhow::Result<i32> {
    let c = crate::coordinator::client(&node)?;
    match cmd {
        SecretCommand::Set { project, name } => {
            let mut value = String::new();
            std::io::stdin()
                .take(flotilla_coordinator::secrets::MAX_VALUE as u64 + 2)
                .read_to_string(&mut value)
                .context("reading the secret's value from stdin (UTF-8 text)")?;
            let value = value.strip_suffix('\n').map(|v| v.strip_suffix('\r').unwrap_or(v)).unwrap_or(&value);
            if value.is_empty() {
                bail!(
                    "no value on stdin: pipe it in, e.g. printf %s \"$TOKEN\" | flotilla secret set {project} {name}"
                );
            }
            c.set_secret(&project, &name, value).await?;
            if !json {
                eprintln!("secret {name} set for project {project}; builders get it with secrets = [\"{name}\"]");
            }
        }
        SecretCommand::Ls { project } => {
            let list = c.secrets(&project).await?;
            if json {
                output::json(&list)?;
            } else {
                let rows: Vec<Vec<String>> =
                    list.iter().map(|s| vec![s.name.clone(), output::relative(s.updated_at)]).collect();
                output::table(&["NAME", "SET"], &rows);
            }
        }
        SecretCommand::Rm { project, name } => {
            c.remove_secret(&project, &name).await?;
            if !json {
                eprintln!("secret {name} removed from project {project}");
            }
        }
    }
    Ok(0)
}
