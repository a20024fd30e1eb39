//! A throwaway PostgreSQL server for tests: `initdb` into a temporary
//! directory, `pg_ctl start` on a free loopback port (and a Unix socket in
//! that directory), stopped and removed when the guard drops, a failing
//! test included.
//!
//! Tuned for speed, not durability (`fsync=off`, no synchronous commit):
//! the data dies with the test anyway.
//!
//! PostgreSQL refuses to run as root; as root the server's commands run as
//! the `postgres` system user (the Debian package creates it), who owns the
//! directory.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// How long `pg_ctl` waits for the server to accept connections (it polls
/// on its own). Start takes ~0.2 s here; the margin is for a loaded CI.
const START_TIMEOUT_S: u32 = 60;

/// Start attempts: another process may take the port between our probe
/// and the server's bind.
const START_ATTEMPTS: usize = 5;

/// The cluster's superuser (trust authentication: no password).
const SUPERUSER: &str = "postgres";

/// A running throwaway PostgreSQL server.
pub struct Postgres {
    bin: PathBuf,
    /// Holds `data/`, the socket and `log`; removed on drop.
    dir: tempfile::TempDir,
    port: u16,
    /// The address it listens on (loopback unless [`Postgres::start_on`]).
    host: String,
    /// Set when we are root: the uid/gid the server runs as.
    run_as: Option<(u32, u32)>,
    /// The CA that issued the server's certificate, when it speaks TLS.
    tls_ca: Option<PathBuf>,
}

impl Postgres {
    /// Starts a fresh server; panics saying why (with the server's log) if
    /// it cannot.
    pub fn start() -> Postgres {
        Postgres::start_on("127.0.0.1")
    }

    /// Starts a fresh server listening on `host` (an address of this
    /// machine, e.g. a bridge that network namespaces reach), accepting
    /// any client there (trust: the cluster is a test's).
    pub fn start_on(host: &str) -> Postgres {
        Postgres::start_with(host, None)
    }

    /// [`Postgres::start_on`], taking TCP connections over TLS only
    /// (`hostssl` in `pg_hba.conf`), with a certificate `pki` issues for
    /// `host`: clients check it with [`Postgres::url_verified`].
    pub fn start_tls_on(host: &str, pki: &crate::pki::Pki) -> Postgres {
        Postgres::start_with(host, Some(pki))
    }

    fn start_with(host: &str, tls: Option<&crate::pki::Pki>) -> Postgres {
        let bin = bindir();
        let run_as = crate::is_root().then(postgres_user);
        let dir = tempfile::Builder::new().prefix("flotilla-pg-").tempdir().expect("tempdir for PostgreSQL");
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown the PostgreSQL directory");
        }
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).expect("chmod the PostgreSQL directory");
        let mut pg = Postgres { bin, dir, port: 0, host: host.to_string(), run_as, tls_ca: None };

        let data = pg.data();
        let initdb = pg.run(
            pg.tool("initdb")
                .args(["-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C", "-U", SUPERUSER, "-D"])
                .arg(&data),
        );
        if !initdb.status.success() {
            panic!("initdb failed ({}):\n{}{}", initdb.status, out(&initdb.stdout), out(&initdb.stderr));
        }

        let hba = data.join("pg_hba.conf");
        if let Some(pki) = tls {
            // TLS only over TCP: the Unix socket stays as initdb made it.
            let issued = pki.server(&format!("pg-{host}"), &[host]);
            let (cert, key) = (data.join("server.crt"), data.join("server.key"));
            fs::copy(&issued.cert, &cert).expect("copying the server certificate");
            fs::copy(&issued.key, &key).expect("copying the server key");
            fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod the server key");
            if let Some((uid, gid)) = run_as {
                for f in [&cert, &key] {
                    std::os::unix::fs::chown(f, Some(uid), Some(gid)).expect("chown the server's TLS files");
                }
            }
            let rules = fs::read_to_string(&hba).expect("reading pg_hba.conf");
            let rules: String = rules.lines().filter(|l| !l.starts_with("host ")).map(|l| format!("{l}\n")).collect();
            fs::write(&hba, rules + "hostssl all all 0.0.0.0/0 trust\nhostssl all all ::/0 trust\n")
                .expect("writing pg_hba.conf");
            let conf = data.join("postgresql.conf");
            let mut text = fs::read_to_string(&conf).expect("reading postgresql.conf");
            text.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
            fs::write(&conf, text).expect("writing postgresql.conf");
            pg.tls_ca = Some(pki.ca());
        } else if host != "127.0.0.1" {
            // initdb's pg_hba.conf trusts loopback only.
            let mut rules = fs::read_to_string(&hba).expect("reading pg_hba.conf");
            rules.push_str("host all all 0.0.0.0/0 trust\n");
            fs::write(&hba, rules).expect("writing pg_hba.conf");
        }
        for _ in 0..START_ATTEMPTS {
            pg.port = free_port(host);
            let start = pg.pg_ctl_start();
            if start.status.success() {
                return pg;
            }
            let log = pg.log();
            if !log.contains("Address already in use") {
                panic!(
                    "pg_ctl start failed ({}):\n{}{}\nserver log:\n{log}",
                    start.status,
                    out(&start.stdout),
                    out(&start.stderr)
                );
            }
            // Port taken: make sure nothing half-started stays, then retry.
            pg.stop();
        }
        panic!("PostgreSQL could not bind a free port in {START_ATTEMPTS} attempts; server log:\n{}", pg.log());
    }

    fn pg_ctl_start(&self) -> Output {
        let opts = format!(
            "-k {} -p {} -h {} -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            self.dir.path().display(),
            self.port,
            self.host
        );
        self.run(
            self.tool("pg_ctl")
                .args(["-w", "-t", &START_TIMEOUT_S.to_string(), "-D"])
                .arg(self.data())
                .args(["-o", &opts, "-l"])
                .arg(self.log_path())
                .arg("start"),
        )
    }

    /// Crashes the server (`pg_ctl stop -m immediate`: every connection
    /// drops, as in a power cut or failover) and leaves it down.
    pub fn crash(&self) {
        self.stop();
    }

    /// Starts the server again on its port after [`Postgres::crash`]
    /// (it recovers from its WAL); panics with its log if it cannot.
    pub fn start_again(&self) {
        let start = self.pg_ctl_start();
        if !start.status.success() {
            panic!(
                "pg_ctl start (again) failed ({}):\n{}{}\nserver log:\n{}",
                start.status,
                out(&start.stdout),
                out(&start.stderr),
                self.log()
            );
        }
    }

    /// Cuts every connection to the server whose `application_name` is
    /// `app` (`pg_terminate_backend`), as a network cut or a proxy restart
    /// would; returns how many it cut.
    pub fn cut_connections(&self, app: &str) -> u64 {
        assert!(app.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'), "application name {app:?}");
        let n = self.psql(
            "postgres",
            &format!("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = '{app}'"),
        );
        n.trim().parse().unwrap_or(0)
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// The URL of database `name` on this server.
    pub fn url_of(&self, name: &str) -> String {
        format!("postgres://{SUPERUSER}@{}:{}/{name}", self.host, self.port)
    }

    /// The URL of database `name` for a client that checks the server's
    /// certificate and name (`sslmode=verify-full`); needs
    /// [`Postgres::start_tls_on`].
    pub fn url_verified(&self, name: &str) -> String {
        let ca = self.tls_ca.as_ref().expect("url_verified needs a server started with start_tls_on");
        format!("{}?sslmode=verify-full&sslrootcert={}", self.url_of(name), ca.display())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates database `name` (letters, digits, `_`) and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "database name {name:?}: use letters, digits and _"
        );
        let o = self.output(Command::new(self.bin.join("createdb")).args([
            "-h",
            &self.host,
            "-p",
            &self.port.to_string(),
            "-U",
            SUPERUSER,
            name,
        ]));
        if !o.status.success() {
            panic!("createdb {name} failed ({}): {}\nserver log:\n{}", o.status, out(&o.stderr), self.log());
        }
        self.url_of(name)
    }

    /// Runs `sql` with `psql` in database `db`; returns its unaligned,
    /// tuples-only output. Panics if psql fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let o = self.output(Command::new(self.bin.join("psql")).args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            &self.host,
            "-p",
            &self.port.to_string(),
            "-U",
            SUPERUSER,
            "-d",
            db,
            "-c",
            sql,
        ]));
        if !o.status.success() {
            panic!("psql -c {sql:?} failed ({}): {}", o.status, out(&o.stderr));
        }
        out(&o.stdout)
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    /// A server tool, as the `postgres` user when we are root.
    fn tool(&self, name: &str) -> Command {
        let path = self.bin.join(name);
        let mut cmd = match self.run_as {
            Some(_) => {
                let mut c = Command::new("runuser");
                c.args(["-u", SUPERUSER, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        };
        // The postgres user may not be able to enter the test's directory.
        cmd.current_dir(self.dir.path());
        cmd
    }

    fn run(&self, cmd: &mut Command) -> Output {
        self.output(cmd)
    }

    fn output(&self, cmd: &mut Command) -> Output {
        cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("running {:?}: {e}", cmd.get_program()))
    }

    /// Stops the server at once (no checkpoint: the data is thrown away).
    fn stop(&self) {
        if self.data().join("postmaster.pid").exists() {
            let _ = self.run(self.tool("pg_ctl").args(["-w", "-m", "immediate", "-D"]).arg(self.data()).arg("stop"));
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        // The TempDir removes the directory after this.
    }
}

fn out(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn free_port(host: &str) -> u16 {
    std::net::TcpListener::bind((host, 0)).and_then(|l| l.local_addr()).expect("a free port").port()
}

/// Where the server's binaries are: `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin`, else `PATH`.
fn bindir() -> PathBuf {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Ok(o) = Command::new("pg_config").arg("--bindir").stderr(Stdio::null()).output() {
        let d = PathBuf::from(out(&o.stdout).trim());
        if o.status.success() && has_server(&d) {
            return d;
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.split('.').next()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| has_server(d))
        .collect();
    versions.sort();
    if let Some((_, d)) = versions.pop() {
        return d;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(d) = std::env::split_paths(&path).find(|d| has_server(d)) {
        return d;
    }
    panic!("PostgreSQL is not installed: apt-get install postgresql (initdb and pg_ctl not found)")
}

/// The `postgres` user's uid and gid, from `/etc/passwd`.
fn postgres_user() -> (u32, u32) {
    let passwd = fs::read_to_string("/etc/passwd").expect("reading /etc/passwd");
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == SUPERUSER)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .unwrap_or_else(|| {
            panic!(
                "running as root, and PostgreSQL refuses root, but there is no `postgres` user to run it as \
                 (apt-get install postgresql creates one)"
            )
        })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn starts_creates_a_database_and_answers() {
        let pg = Postgres::start();
        let url = pg.create_database("flotilla_test");
        assert!(url.ends_with("/flotilla_test"), "{url}");
        assert_eq!(pg.psql("flotilla_test", "select 1").trim(), "1");
        let (dir, port) = (pg.dir.path().to_path_buf(), pg.port());
        let uid = fs::metadata(&dir).unwrap().uid();
        if crate::is_root() {
            assert_ne!(uid, 0, "the server's directory belongs to postgres");
        }
        drop(pg);
        assert!(!dir.exists(), "the directory is removed on drop");
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "the server is stopped on drop");
    }
}
