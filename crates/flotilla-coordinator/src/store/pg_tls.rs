//! TLS to PostgreSQL, asked for as libpq asks for it: `sslmode`,
//! `sslrootcert`, `sslcert` and `sslkey` in the database address (URL query
//! or keyword form). tokio-postgres parses only `disable|prefer|require`, so
//! these parameters are taken out of the address here and turned into a
//! rustls client:
//!
//! | `sslmode` | TLS | certificate checked |
//! |---|---|---|
//! | `disable`, `allow` | no | — |
//! | `prefer` (libpq's default, and ours) | if the server offers it | no |
//! | `require` | yes | chain, only when `sslrootcert` is given (as libpq) |
//! | `verify-ca` | yes | chain to `sslrootcert` |
//! | `verify-full` | yes | chain, and the host name or IP address |
//!
//! `sslrootcert` is a PEM file of the CAs to trust, or `system` (the
//! system's bundle, also the default when a mode needs roots and none is
//! given). `sslcert`/`sslkey` are a client certificate and its key, for a
//! server that authenticates clients with `cert` in `pg_hba.conf`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// What `sslmode` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(v: &str) -> Result<SslMode, String> {
        Ok(match v {
            "disable" | "allow" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode={other:?}: give disable, allow, prefer, require, verify-ca or verify-full"
                ));
            }
        })
    }
}

/// The TLS half of a database address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TlsParams {
    pub mode: SslMode,
    /// `None`: the system's bundle.
    pub root: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

const KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Takes libpq's TLS parameters out of `url`: the address left for
/// tokio-postgres, and what they asked for.
pub(super) fn split(url: &str) -> Result<(String, TlsParams), String> {
    let mut taken: Vec<(String, String)> = Vec::new();
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_string(),
            Some((base, query)) => {
                let pairs: Vec<(String, String)> =
                    serde_urlencoded::from_str(query).map_err(|e| format!("the address's query: {e}"))?;
                let (ours, theirs): (Vec<_>, Vec<_>) = pairs.into_iter().partition(|(k, _)| KEYS.contains(&k.as_str()));
                taken = ours;
                if theirs.is_empty() {
                    base.to_string()
                } else {
                    let q = serde_urlencoded::to_string(&theirs).map_err(|e| format!("the address's query: {e}"))?;
                    format!("{base}?{q}")
                }
            }
        }
    } else {
        // The keyword form: `key=value` words (values without spaces).
        let mut kept = Vec::new();
        for word in url.split_whitespace() {
            match word.split_once('=') {
                Some((k, v)) if KEYS.contains(&k) => taken.push((k.into(), v.trim_matches('\'').into())),
                _ => kept.push(word),
            }
        }
        kept.join(" ")
    };
    let mut p = TlsParams { mode: SslMode::Prefer, root: None, cert: None, key: None };
    for (k, v) in taken {
        match k.as_str() {
            "sslmode" => p.mode = SslMode::parse(&v)?,
            "sslrootcert" if v == "system" => p.root = None,
            "sslrootcert" => p.root = Some(v.into()),
            "sslcert" => p.cert = Some(v.into()),
            _ => p.key = Some(v.into()),
        }
    }
    if p.cert.is_some() != p.key.is_some() {
        return Err("sslcert and sslkey go together".into());
    }
    Ok((rest, p))
}

/// How a server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Nothing,
    Chain,
    ChainAndName,
}

impl TlsParams {
    fn check(&self) -> Check {
        match self.mode {
            SslMode::Disable | SslMode::Prefer => Check::Nothing,
            SslMode::Require if self.root.is_some() => Check::Chain,
            SslMode::Require => Check::Nothing,
            SslMode::VerifyCa => Check::Chain,
            SslMode::VerifyFull => Check::ChainAndName,
        }
    }

    /// The rustls client these parameters ask for.
    pub(super) fn client_config(&self) -> Result<rustls::ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let algorithms = provider.signature_verification_algorithms;
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let check = self.check();
        let webpki = match check {
            Check::Nothing => None,
            Check::Chain | Check::ChainAndName => {
                let roots = self.roots()?;
                Some(
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| format!("the trusted CAs: {e}"))?,
                )
            }
        };
        let builder = match (check, webpki) {
            (Check::ChainAndName, Some(v)) => builder.with_webpki_verifier(v),
            (_, webpki) => {
                builder.dangerous().with_custom_certificate_verifier(Arc::new(Lenient { webpki, algorithms }))
            }
        };
        let mut config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert)?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("sslkey {}: {e}", key.display()))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| format!("sslcert {}: {e}", cert.display()))?
            }
            _ => builder.with_no_client_auth(),
        };
        // PostgreSQL 17 refuses any other protocol a client names.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(config)
    }

    fn roots(&self) -> Result<rustls::RootCertStore, String> {
        let file = match &self.root {
            Some(f) => f.clone(),
            None => flotilla_agent::http::system_ca_bundle()
                .ok_or("no system CA bundle for sslmode's check: give sslrootcert=FILE")?,
        };
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(read_certs(&file)?);
        if added == 0 {
            return Err(format!("sslrootcert {}: no usable certificate", file.display()));
        }
        Ok(roots)
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|c| c.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

/// `prefer`/`require` without roots (nothing checked, as libpq) and
/// `verify-ca` (the chain, not the name).
#[derive(Debug)]
struct Lenient {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else { return Ok(ServerCertVerified::assertion()) };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_come_out_of_both_address_forms() {
        let (rest, p) =
            split("postgres://u:p@db:5432/x?application_name=a&sslmode=verify-full&sslrootcert=/etc/ca.pem").unwrap();
        assert_eq!(rest, "postgres://u:p@db:5432/x?application_name=a");
        assert_eq!(p.mode, SslMode::VerifyFull);
        assert_eq!(p.root.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(p.check(), Check::ChainAndName);

        let (rest, p) = split("postgresql://db/x?sslmode=require").unwrap();
        assert_eq!(rest, "postgresql://db/x");
        assert_eq!(p.check(), Check::Nothing);

        let (rest, p) = split("host=db port=5 sslmode=verify-ca sslrootcert='/c.pem' user=u").unwrap();
        assert_eq!(rest, "host=db port=5 user=u");
        assert_eq!((p.mode, p.check()), (SslMode::VerifyCa, Check::Chain));

        let (rest, p) = split("postgres://db/x").unwrap();
        assert_eq!((rest.as_str(), p.mode), ("postgres://db/x", SslMode::Prefer));
        let (_, p) = split("postgres://db/x?sslmode=require&sslrootcert=/c.pem").unwrap();
        assert_eq!(p.check(), Check::Chain, "require with a root checks the chain, as libpq");
    }

    #[test]
    fn bad_tls_parameters_are_refused_by_name() {
        assert!(split("postgres://db/x?sslmode=verify").unwrap_err().contains("verify-full"));
        assert!(split("postgres://db/x?sslcert=/c.pem").unwrap_err().contains("sslkey"));
        let (_, p) = split("postgres://db/x?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem").unwrap();
        assert!(p.client_config().unwrap_err().contains("/nonexistent/ca.pem"));
    }
}
