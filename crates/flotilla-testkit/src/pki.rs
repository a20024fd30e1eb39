//! A throwaway certificate authority for tests, made with the `openssl`
//! command line as an operator would: a CA, and certificates it issues to
//! servers (with the addresses they are reached by) and to clients.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A CA in a temporary directory (removed on drop).
pub struct Pki {
    dir: tempfile::TempDir,
}

/// A certificate and its key, issued by a [`Pki`].
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    /// A new CA (P-256, two days); panics with openssl's words if it cannot.
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new().prefix("flotilla-pki-").tempdir().expect("tempdir for the CA");
        let pki = Pki { dir };
        pki.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=flotilla test CA",
        ]);
        pki
    }

    /// The CA's certificate (PEM): what clients and servers trust.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A server certificate for `names` (IP addresses or DNS names, the
    /// first also its CN), in files `NAME.pem`/`NAME.key`.
    pub fn server(&self, file: &str, names: &[&str]) -> Issued {
        let san: Vec<String> = names
            .iter()
            .map(|n| if n.parse::<std::net::IpAddr>().is_ok() { format!("IP:{n}") } else { format!("DNS:{n}") })
            .collect();
        let ext = format!("subjectAltName={}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n", san.join(","));
        self.issue(file, names.first().copied().unwrap_or(file), &ext)
    }

    /// A client certificate with common name `cn` (PostgreSQL's `cert`
    /// authentication maps it to the user), in files `FILE.pem`/`FILE.key`.
    pub fn client(&self, file: &str, cn: &str) -> Issued {
        self.issue(file, cn, "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n")
    }

    fn issue(&self, file: &str, cn: &str, ext: &str) -> Issued {
        let (key, csr, pem, extfile) =
            (format!("{file}.key"), format!("{file}.csr"), format!("{file}.pem"), format!("{file}.ext"));
        std::fs::write(self.dir.path().join(&extfile), ext).expect("writing the extensions file");
        let subj = format!("/CN={cn}");
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &subj,
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &extfile,
        ]);
        Issued { cert: self.dir.path().join(pem), key: self.dir.path().join(key) }
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("running openssl (is it installed?): {e}"));
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Default for Pki {
    fn default() -> Pki {
        Pki::new()
    }
}
