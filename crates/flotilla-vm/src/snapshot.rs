//! Snapshots: a booted, idle guest saved once and restored in place of a
//! cold boot (QEMU's migration stream to a file, then `-incoming`).
//!
//! A snapshot belongs to a pool key (image version, memory, vCPUs,
//! workspace size) and to the exact kernel, initramfs and accelerator it was
//! made with; its directory, `<home>/vm/snapshots/<hash of all that>/`,
//! holds the saved state and the disks as they were at that moment
//! (`root.qcow2` over the image's base disk, `workspace.ext4`,
//! `config.json`). Making one: boot the guest cold, wait until its init
//! serves (it then waits for a host), pause it, stream its state over a
//! Unix socket into `state` (QEMU's own `exec:` would need the spawning
//! that its seccomp sandbox denies), end QEMU and move the disks beside.
//! Restoring: copy the disks (sparsely) into the new VM's directory, start a
//! QEMU with the same devices and `-incoming unix:…`, feed it the state.
//! The guest runs on from where it was saved; on the first attach the host
//! hands it the time and fresh randomness ([`crate::mux`]), so restored
//! guests neither live in the past nor share random numbers.
//!
//! A restored guest keeps the snapshot's hostname; a sandbox that is
//! stopped and started again boots cold from its own disks.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_sandbox::sys;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::pool::PoolKey;
use crate::qemu::{self, Incoming};
use crate::{VmBackend, VmError, VmRunning, VmSpec, io_step};

/// The saved state in a snapshot's directory.
pub const STATE: &str = "state";
/// The files of a VM's directory a snapshot keeps.
const DISKS: [&str; 3] = ["root.qcow2", "workspace.ext4", "config.json"];
/// What the guest's init prints once it serves (see `guest::serve`).
const SERVING: &str = "flotilla: agent serving on";

impl VmBackend {
    pub fn snapshots_dir(&self) -> PathBuf {
        self.assets_dir().join("snapshots")
    }

    /// Where the snapshot for `key` on this node's guest assets and
    /// accelerator lives (whether or not it was made yet).
    pub(crate) async fn snapshot_dir(&self, key: &PoolKey) -> Result<PathBuf, VmError> {
        let assets = self.assets().await?;
        let accel = self.accel().await?.accel;
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(key).unwrap_or_default());
        h.update(assets.vmlinux.as_os_str().as_encoded_bytes());
        h.update(assets.initramfs.as_os_str().as_encoded_bytes());
        h.update(accel.as_str());
        let hex: String = h.finalize().iter().take(10).map(|b| format!("{b:02x}")).collect();
        Ok(self.snapshots_dir().join(hex))
    }

    /// Boots `spec` cold, saves it once its init serves, and keeps the
    /// state and disks as the snapshot `to`. The VM is gone afterwards.
    pub(crate) async fn make_snapshot(&self, spec: &VmSpec, to: &Path) -> Result<(), VmError> {
        let assets = self.assets().await?;
        let accel = self.accel().await?;
        let launch = self.prepare_disks(spec, &assets, accel.accel).await?;
        let running = self.spawn_vmm(&spec.id, &launch, &|_, _| {}).await?;
        let saved = self.save(&running, to).await;
        if running.exit_now().is_none() {
            let _ = flotilla_sandbox::process::kill_and_wait(&running.pidfd, running.pid, running.exited()).await;
        }
        self.cleanup(&spec.id);
        let _ = std::fs::remove_dir_all(self.vm_dir(&spec.id));
        saved
    }

    async fn save(&self, running: &VmRunning, to: &Path) -> Result<(), VmError> {
        let dir = &running.dir;
        let deadline = Instant::now() + self.boot_timeout;
        loop {
            if let Some(e) = running.exit_now() {
                return Err(VmError::Died(e.to_string(), qemu::console_tail(dir, 5), String::new()));
            }
            if std::fs::read_to_string(qemu::console_log(dir)).is_ok_and(|c| c.contains(SERVING)) {
                break;
            }
            if Instant::now() > deadline {
                return Err(VmError::Timeout(self.boot_timeout, qemu::console_tail(dir, 5)));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let step = |what: &str| io_step(format!("saving a snapshot: {what}"));
        let qmp = qemu::Qmp::connect(&qemu::qmp_socket(dir), Duration::from_secs(5)).await.map_err(step("QMP"))?;
        qmp.stop().await.map_err(step("pausing the guest"))?;
        let tmp = to.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(step("creating its directory"))?;
        let sock = dir.join("save.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock).map_err(step("binding the state socket"))?;
        // QEMU connects as the unprivileged uid it runs as: give it (and
        // only it) this one socket.
        if let Some(uid) = sys::process_uid(running.pid) {
            std::os::unix::fs::chown(&sock, Some(uid), Some(uid)).map_err(step("handing QEMU the state socket"))?;
        }
        let state = tmp.join(STATE);
        let receive = tokio::spawn({
            let state = state.clone();
            async move {
                let (mut s, _) = listener.accept().await?;
                let mut f = tokio::fs::File::create(&state).await?;
                tokio::io::copy(&mut s, &mut f).await?;
                f.sync_all().await
            }
        });
        let within = Duration::from_secs(120);
        if let Err(e) = qmp.save(&format!("unix:{}", sock.display()), within).await {
            receive.abort();
            return Err(step("migrating to a file")(e));
        }
        match tokio::time::timeout(Duration::from_secs(30), receive).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(step("writing the state")(e)),
            _ => return Err(step("writing the state")(io::Error::other("the state stream did not end"))),
        }
        let _ = qmp.quit().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), running.exited()).await;
        for f in DISKS {
            std::fs::rename(dir.join(f), tmp.join(f)).map_err(step(&format!("keeping {f}")))?;
        }
        let _ = std::fs::remove_dir_all(to);
        std::fs::rename(&tmp, to).map_err(step("moving it into place"))?;
        Ok(())
    }

    /// Boots `spec` from the snapshot `snap`: its own copies of the disks,
    /// the saved state fed to a QEMU with the same devices.
    pub(crate) async fn restore(
        &self,
        snap: &Path,
        spec: &VmSpec,
        step: &(dyn Fn(&str, Option<String>) + Send + Sync),
    ) -> Result<VmRunning, VmError> {
        let assets = self.assets().await?;
        let accel = self.accel().await?;
        let dir = self.vm_dir(&spec.id);
        std::fs::create_dir_all(&dir).map_err(io_step(format!("creating {}", dir.display())))?;
        for f in DISKS {
            // `cp --sparse=always`: the workspace disk is gigabytes of
            // holes around a few megabytes of ext4.
            crate::run_tool(std::process::Command::new("cp").arg("--sparse=always").arg(snap.join(f)).arg(dir.join(f)))
                .await?;
        }
        step("disks", Some(format!("from snapshot {}", snap.file_name().and_then(|n| n.to_str()).unwrap_or("?"))));
        let launch = qemu::LaunchSpec {
            incoming: Some(Incoming { state: snap.join(STATE), socket: dir.join("incoming.sock"), dir: dir.clone() }),
            ..crate::launch_spec(spec, dir, &assets, accel.accel)
        };
        self.launch(spec, &launch, step).await
    }

    /// Removes every snapshot but those in `keep` (and their makings).
    pub(crate) fn gc_snapshots(&self, keep: &[PathBuf]) {
        for e in std::fs::read_dir(self.snapshots_dir()).into_iter().flatten().flatten() {
            let p = e.path();
            let kept = keep.iter().any(|k| *k == p || k.with_extension("tmp") == p);
            if !kept {
                tracing::info!(snapshot = %p.display(), "removing a snapshot no pool uses");
                let _ = std::fs::remove_dir_all(&p);
            }
        }
    }
}

/// Streams the saved state into the restoring QEMU's socket.
pub(crate) async fn feed(inc: &Incoming, deadline: Instant) -> io::Result<()> {
    let mut sock = loop {
        match tokio::net::UnixStream::connect(&inc.socket).await {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let qmp = qemu::Qmp::connect(&qemu::qmp_socket(&inc.dir), Duration::from_secs(5)).await?;
    let mut f = tokio::fs::File::open(&inc.state).await?;
    tokio::io::copy(&mut f, &mut sock).await?;
    sock.shutdown().await?;
    qmp.cont_after_incoming(deadline.saturating_duration_since(Instant::now())).await
}
