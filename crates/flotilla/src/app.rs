//! `flotilla app ...`: long-lived apps on a node.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use flotilla_api::app::{AppInstallation, AppInstance, AppLogsQuery, Envelope, InstallRequest};
use http_body_util::BodyExt;

use crate::cli::NodeArgs;
use crate::output;
use crate::sandbox::client;

#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// Install an app from an envelope file (TOML, or JSON if it ends in .json); prints APP/INST.
    ///
    /// A relative `binary.path` in the envelope is taken from the envelope's directory.
    #[command(after_help = "Example envelope (hello.toml):\n  \
        title = \"hello-web\"\n  \
        image = \"host\"\n  \
        command = [\"python3\", \"-m\", \"http.server\", \"8080\"]\n  \
        ports = [8080]\n  \
        publish = [\"apps/hello-web\"]\n  \
        [restart]\n  \
        policy = \"on-failure\"\n\n\
        Then: flotilla app start hello-web/1")]
    Install { envelope: PathBuf },
    /// List instances: state, version, forwarded addresses.
    #[command(alias = "list")]
    Ls,
    /// Show an installation (APP/INST) or an instance (APP/INST/INSTANCE).
    Show { address: String },
    /// Start a new instance of APP/INST on its current version; prints APP/INST/INSTANCE.
    Start { installation: String },
    /// Install a new version of APP/INST from an envelope with the same title, and move its
    /// running instances onto it one at a time.
    Update { installation: String, envelope: PathBuf },
    /// Go back to APP/INST's previous version (current and previous swap).
    Revert { installation: String },
    /// Stop and delete every instance of APP/INST and mark it uninstalled.
    Uninstall { installation: String },
    /// Stop an instance: SIGTERM, then SIGKILL after its stop timeout. It stays stopped.
    Stop { instance: String },
    /// Suspend a serving instance where it is (SIGSTOP); its names are unpublished.
    Suspend { instance: String },
    /// Resume a suspended instance.
    Resume { instance: String },
    /// Restart an instance on the installation's current version (also a stopped one).
    Restart { instance: String },
    /// Print an instance's log: each line stamped with when the node got it and its stream
    /// (out, err; `---` for the node's own notes).
    Logs {
        instance: String,
        /// Keep following, across restarts, until the instance stops.
        #[arg(short, long)]
        follow: bool,
        /// The run before the current one (why did it crash?).
        #[arg(long, conflicts_with = "follow")]
        previous: bool,
    },
}

/// Reads an envelope file; a relative `binary.path` is made absolute
/// against the file's directory.
pub fn read_envelope(path: &Path) -> anyhow::Result<InstallRequest> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the envelope {}", path.display()))?;
    let mut envelope: Envelope = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
    } else {
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
    };
    let base = std::path::absolute(path)?.parent().map(Path::to_path_buf).unwrap_or_default();
    if let Some(b) = envelope.binary.as_mut()
        && let Some(p) = b.path.as_mut()
        && !p.starts_with('/')
    {
        *p = base.join(&*p).display().to_string();
    }
    envelope.validate().with_context(|| format!("checking {}", path.display()))?;
    Ok(InstallRequest { envelope, origin: Some(std::path::absolute(path)?.display().to_string()) })
}

fn check_address(address: &str, parts: usize, what: &str) -> anyhow::Result<()> {
    let n = address.split('/').count();
    if n != parts || address.split('/').any(str::is_empty) {
        bail!("{address:?} is not {what}");
    }
    Ok(())
}

const INSTALLATION: &str = "an installation address APP/INST";
const INSTANCE: &str = "an instance address APP/INST/INSTANCE";

pub async fn run(cmd: AppCommand, node: NodeArgs, json: bool) -> anyhow::Result<i32> {
    let c = client(&node).await?;
    match cmd {
        AppCommand::Install { envelope } => {
            let req = read_envelope(&envelope)?;
            let a = c.install_app(&req).await.with_context(|| format!("installing {}", envelope.display()))?;
            print_installation(&a, json, true)?;
        }
        AppCommand::Ls => {
            let list = c.apps().await?;
            if json {
                output::json(&list)?;
            } else {
                instance_rows(&list);
            }
        }
        AppCommand::Show { address } => match address.split('/').count() {
            2 => {
                check_address(&address, 2, INSTALLATION)?;
                let a: AppInstallation = c.app(&address).await?;
                print_installation(&a, json, false)?;
            }
            3 => {
                check_address(&address, 3, INSTANCE)?;
                let i: AppInstance = c.app(&address).await?;
                print_instance(&i, json)?;
            }
            _ => bail!("{address:?} is neither {INSTALLATION} nor {INSTANCE}"),
        },
        AppCommand::Start { installation } => {
            check_address(&installation, 2, INSTALLATION)?;
            let i: AppInstance = c
                .app_action(&installation, "start", None)
                .await
                .with_context(|| format!("starting an instance of {installation}"))?;
            if json {
                output::json(&i)?;
            } else {
                println!("{}", i.address);
                if let Some(r) = &i.reason {
                    eprintln!("flotilla: {} is {}: {r}", i.address, i.state.as_str());
                }
            }
        }
        AppCommand::Update { installation, envelope } => {
            check_address(&installation, 2, INSTALLATION)?;
            let req = read_envelope(&envelope)?;
            let a: AppInstallation = c
                .app_action(&installation, "update", Some(&req))
                .await
                .with_context(|| format!("updating {installation}"))?;
            print_installation(&a, json, false)?;
        }
        AppCommand::Revert { installation } => {
            check_address(&installation, 2, INSTALLATION)?;
            let a: AppInstallation = c
                .app_action(&installation, "revert", None)
                .await
                .with_context(|| format!("reverting {installation}"))?;
            print_installation(&a, json, false)?;
        }
        AppCommand::Uninstall { installation } => {
            check_address(&installation, 2, INSTALLATION)?;
            let a: AppInstallation = c
                .app_action(&installation, "uninstall", None)
                .await
                .with_context(|| format!("uninstalling {installation}"))?;
            print_installation(&a, json, false)?;
        }
        AppCommand::Stop { instance } => return instance_op(&c, &instance, "stop", json).await,
        AppCommand::Suspend { instance } => return instance_op(&c, &instance, "suspend", json).await,
        AppCommand::Resume { instance } => return instance_op(&c, &instance, "resume", json).await,
        AppCommand::Restart { instance } => return instance_op(&c, &instance, "restart", json).await,
        AppCommand::Logs { instance, follow, previous } => {
            check_address(&instance, 3, INSTANCE)?;
            let mut body = c.app_logs(&instance, &AppLogsQuery { follow, previous }).await?;
            let mut out = std::io::stdout().lock();
            while let Some(frame) = body.frame().await {
                let frame = frame.context("reading the log")?;
                if let Ok(data) = frame.into_data() {
                    out.write_all(&data)?;
                    out.flush()?;
                }
            }
        }
    }
    Ok(0)
}

async fn instance_op(c: &flotilla_node::NodeClient, address: &str, op: &str, json: bool) -> anyhow::Result<i32> {
    check_address(address, 3, INSTANCE)?;
    let i: AppInstance = c.app_action(address, op, None).await.with_context(|| format!("{op} {address}"))?;
    print_instance(&i, json)?;
    Ok(0)
}

fn print_installation(a: &AppInstallation, json: bool, address_only: bool) -> anyhow::Result<()> {
    if json {
        return output::json(a);
    }
    if address_only {
        println!("{}", a.address);
        return Ok(());
    }
    println!("installation  {}", a.address);
    println!("state         {}", a.state.as_str());
    println!("current       {}", a.current);
    if let Some(p) = &a.previous {
        println!("previous      {p}");
    }
    println!("versions      {}", a.versions.join(" "));
    println!("image         {}", a.envelope.image());
    if !a.instances.is_empty() {
        println!();
        instance_rows(std::slice::from_ref(a));
    }
    Ok(())
}

fn print_instance(i: &AppInstance, json: bool) -> anyhow::Result<()> {
    if json {
        return output::json(i);
    }
    println!("instance      {}", i.address);
    println!("state         {}", i.state.as_str());
    println!("version       {}", i.version);
    if let Some(s) = &i.sandbox {
        println!("sandbox       {s}");
    }
    if let Some(p) = i.pid {
        println!("pid           {p}");
    }
    if let Some(t) = i.started_at {
        println!("started       {t} ({})", output::relative(t));
    }
    for p in &i.ports {
        println!("port          {} -> {}", p.address, p.port);
    }
    if !i.published.is_empty() {
        println!("published     {}", i.published.join(" "));
    }
    println!("restarts      {}", i.restarts);
    if let Some(e) = &i.last_exit {
        println!("last exit     {}", e.shell_code());
    }
    if let Some(r) = &i.reason {
        println!("why           {r}");
    }
    if let Some(t) = i.retry_at {
        println!("retry         {t} ({})", output::relative(t));
    }
    Ok(())
}

fn instance_rows(list: &[AppInstallation]) {
    let mut rows = Vec::new();
    for a in list {
        if a.instances.is_empty() {
            rows.push(vec![a.address.clone(), a.state.as_str().into(), a.current.clone(), "-".into(), "".into()]);
        }
        for i in &a.instances {
            let ports = i.ports.iter().map(|p| format!("{}->{}", p.address, p.port)).collect::<Vec<_>>().join(" ");
            let mut note = i.reason.clone().unwrap_or_default();
            if let Some(t) = i.retry_at {
                note = format!("{note} (retry {})", output::relative(t));
            }
            rows.push(vec![i.address.clone(), i.state.as_str().into(), i.version.clone(), ports, note]);
        }
    }
    output::table(&["ADDRESS", "STATE", "VERSION", "PORTS", "NOTE"], &rows);
}
