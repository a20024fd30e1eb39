//! Project secrets: sealed at rest, given only to trusted builds, masked in
//! every log byte.
//!
//! - **At rest** a value is sealed with ChaCha20-Poly1305 under the
//!   coordinator's key (`HOME/coordinator/secrets.key`, 32 random bytes,
//!   0600; coordinators sharing one PostgreSQL share the file with
//!   `--secrets-key`). The row's project and name are the associated data,
//!   so a sealed value moved to another row does not open.
//! - **Who gets them** is decided in one place, [`allowed`]: builds of a
//!   watched branch's commits do; a `try` never does (its patch is anyone's
//!   code). The changes work extends this function, not its callers.
//! - **Masking** ([`Masker`]) overwrites every occurrence of a value the
//!   build holds, and of its base64 (standard and URL-safe, at each of the
//!   three alignments a value can have inside a longer encoding) and
//!   percent-encoded forms, byte for byte with `*`: the log keeps its
//!   length, so stored offsets stay the agent's offsets. The executor holds
//!   back a batch's tail while it could be the start of a value, so a value
//!   split across writes or frames is masked too.

use std::path::Path;

use base64::Engine as _;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use flotilla_api::coordinator::ChangeKind;

/// Shortest value taken: a shorter one would mask half of every log.
pub const MIN_VALUE: usize = 4;
/// Longest value taken (a certificate or a key file fits).
pub const MAX_VALUE: usize = 64 << 10;
/// Secrets per project.
pub const MAX_PER_PROJECT: usize = 100;

/// Whether builds of this kind of change get the project's secrets, and if
/// not, why (shown on the build's timeline).
pub fn allowed(kind: ChangeKind) -> Result<(), &'static str> {
    match kind {
        ChangeKind::Branch => Ok(()),
        ChangeKind::Try => Err("a try run never gets secrets (its code is unreviewed)"),
    }
}

/// A secret's name: what the build's environment calls it.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "secret name {name:?}: use 1 to 128 uppercase letters, digits and '_', not starting with a digit \
             (it becomes an environment variable)"
        ))
    }
}

/// A value's size bounds.
pub fn check_value(value: &[u8]) -> Result<(), String> {
    if value.len() < MIN_VALUE {
        return Err(format!("a secret value needs at least {MIN_VALUE} bytes (shorter ones cannot be masked in logs)"));
    }
    if value.len() > MAX_VALUE {
        return Err(format!("a secret value may have at most {MAX_VALUE} bytes"));
    }
    if std::str::from_utf8(value).is_err() || value.contains(&0) {
        return Err("a secret value must be UTF-8 text without NUL bytes (it becomes an environment variable)".into());
    }
    Ok(())
}

/// Why a value could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the secrets key {path}: {why}")]
    Key { path: String, why: String },
    #[error("sealing a secret: {0}")]
    Seal(&'static str),
    #[error(
        "secret {0} does not open with this coordinator's key (was it sealed by a coordinator with another \
         --secrets-key?)"
    )]
    Open(String),
}

/// The coordinator's sealing key.
pub struct SecretBox {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

impl SecretBox {
    /// The key in `path` (32 bytes), made there (0600) when absent.
    pub fn load_or_create(path: &Path) -> Result<SecretBox, SecretError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let err = |why: String| SecretError::Key { path: path.display().to_string(), why };
        let rng = SystemRandom::new();
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut b = vec![0u8; 32];
                rng.fill(&mut b).map_err(|_| err("no randomness for a new key".into()))?;
                let tmp = path.with_extension("tmp");
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(|e| err(e.to_string()))?;
                f.write_all(&b).and_then(|()| f.sync_all()).map_err(|e| err(e.to_string()))?;
                // A key another coordinator made meanwhile wins.
                match std::fs::hard_link(&tmp, path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(err(e.to_string())),
                }
                let _ = std::fs::remove_file(&tmp);
                std::fs::read(path).map_err(|e| err(e.to_string()))?
            }
            Err(e) => return Err(err(e.to_string())),
        };
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .map_err(|_| err(format!("holds {} bytes, not a 32-byte key", bytes.len())))?;
        Ok(SecretBox { key: LessSafeKey::new(key), rng })
    }

    /// `nonce || ciphertext || tag`, bound to `project` and `name`.
    pub fn seal(&self, project: &str, name: &str, value: &[u8]) -> Result<Vec<u8>, SecretError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SecretError::Seal("no randomness for a nonce"))?;
        let mut out = value.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad(project, name)), &mut out)
            .map_err(|_| SecretError::Seal("the value is too long"))?;
        Ok([nonce.to_vec(), out].concat())
    }

    /// The value [`SecretBox::seal`] sealed for `project` and `name`.
    pub fn open(&self, project: &str, name: &str, sealed: &[u8]) -> Result<String, SecretError> {
        let fail = || SecretError::Open(name.to_string());
        if sealed.len() < NONCE_LEN {
            return Err(fail());
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| fail())?;
        let mut buf = rest.to_vec();
        let plain = self.key.open_in_place(nonce, Aad::from(aad(project, name)), &mut buf).map_err(|_| fail())?;
        String::from_utf8(plain.to_vec()).map_err(|_| fail())
    }
}

fn aad(project: &str, name: &str) -> Vec<u8> {
    [project.as_bytes(), b"\0", name.as_bytes()].concat()
}

/// Overwrites secret values (and their encodings) in log bytes.
#[derive(Debug, Clone, Default)]
pub struct Masker {
    needles: Vec<Vec<u8>>,
}

impl Masker {
    /// A masker for these values.
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Masker {
        let mut needles: Vec<Vec<u8>> = Vec::new();
        for v in values {
            let mut forms = vec![v.to_string()];
            // A multi-line value (a key file) is masked line by line too.
            forms.extend(v.lines().map(str::trim).filter(|l| l.len() >= MIN_VALUE).map(str::to_string));
            for f in forms {
                needles.push(f.clone().into_bytes());
                needles.push(percent_encode(&f, true).into_bytes());
                needles.push(percent_encode(&f, false).into_bytes());
                for engine in [&base64::engine::general_purpose::STANDARD, &base64::engine::general_purpose::URL_SAFE] {
                    needles.extend(base64_cores(engine, f.as_bytes()));
                }
            }
        }
        needles.retain(|n| n.len() >= MIN_VALUE);
        needles.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        needles.dedup();
        Masker { needles }
    }

    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// Overwrites every occurrence in `data` with `*`, in place.
    pub fn mask(&self, data: &mut [u8]) {
        for n in &self.needles {
            let mut i = 0;
            while let Some(at) = find(&data[i..], n) {
                let start = i + at;
                data[start..start + n.len()].fill(b'*');
                i = start + n.len();
            }
        }
    }

    /// How many bytes at the end of `data` could be the start of a value
    /// still to come: what must wait for the next bytes before it is stored.
    pub fn hold_back(&self, data: &[u8]) -> usize {
        let mut hold = 0;
        for n in &self.needles {
            let longest = (n.len() - 1).min(data.len());
            for k in (hold + 1..=longest).rev() {
                if data[data.len() - k..] == n[..k] {
                    hold = k;
                    break;
                }
            }
        }
        hold
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `value` as a URL's query or path would carry it (RFC 3986 unreserved
/// bytes as they are, the rest `%XX` in upper- or lower-case hex: both are
/// seen in the wild).
fn percent_encode(value: &str, upper: bool) -> String {
    let mut s = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            s.push(b as char);
        } else {
            s.push_str(&if upper { format!("%{b:02X}") } else { format!("%{b:02x}") });
        }
    }
    s
}

/// The base64 characters of `value` that do not depend on what surrounds
/// it, for each of its three possible alignments inside a longer encoded
/// stream (`echo -n "user:$TOKEN" | base64` puts it at the second).
fn base64_cores(engine: &base64::engine::GeneralPurpose, value: &[u8]) -> Vec<Vec<u8>> {
    (0..3)
        .map(|k| {
            let padded = [vec![0u8; k], value.to_vec()].concat();
            let encoded = engine.encode(&padded);
            // Character j holds bits 6j..6j+6 of the stream: whole when they
            // all come from the value.
            let first = (8 * k).div_ceil(6);
            let end = (8 * (k + value.len())) / 6;
            encoded.as_bytes()[first..end.max(first)].to_vec()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_for_their_row_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let b = SecretBox::load_or_create(&path).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let sealed = b.seal("demo", "TOKEN", b"hunter22").unwrap();
        assert!(!sealed.windows(8).any(|w| w == b"hunter22"), "stored in clear");
        assert_eq!(b.open("demo", "TOKEN", &sealed).unwrap(), "hunter22");
        assert!(b.open("other", "TOKEN", &sealed).is_err(), "moved to another project");
        assert!(b.open("demo", "OTHER", &sealed).is_err(), "moved to another name");
        let again = SecretBox::load_or_create(&path).unwrap();
        assert_eq!(again.open("demo", "TOKEN", &sealed).unwrap(), "hunter22", "the key is kept");
        let other = SecretBox::load_or_create(&dir.path().join("other.key")).unwrap();
        assert!(other.open("demo", "TOKEN", &sealed).is_err());
    }

    #[test]
    fn names_and_values_are_checked() {
        assert!(check_name("PYPI_TOKEN").is_ok());
        for bad in ["", "pypi", "1X", "A-B", "A B"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(check_value(b"abc").is_err());
        assert!(check_value(b"abcd").is_ok());
        assert!(check_value(b"ab\0cd").is_err());
    }

    #[test]
    fn values_and_their_encodings_are_masked_in_place() {
        let m = Masker::new(["s3cr3t/value+x"]);
        let raw = "token=s3cr3t/value+x end";
        let b64 = base64::engine::general_purpose::STANDARD.encode("user:s3cr3t/value+x\n");
        let url = "GET /?t=s3cr3t%2Fvalue%2Bx HTTP/1.1";
        for line in [raw.to_string(), b64.clone(), url.to_string()] {
            let mut data = line.clone().into_bytes();
            m.mask(&mut data);
            assert_eq!(data.len(), line.len(), "masking keeps the length");
            let shown = String::from_utf8(data).unwrap();
            assert!(shown.contains("****"), "{line} → {shown}");
            assert!(!shown.contains("s3cr3t"), "{shown}");
        }
        // Each alignment of the value inside a longer base64 stream.
        for prefix in ["", "a", "ab", "abc"] {
            let enc = base64::engine::general_purpose::STANDARD.encode(format!("{prefix}s3cr3t/value+x!!"));
            let mut data = enc.clone().into_bytes();
            m.mask(&mut data);
            assert_ne!(data, enc.as_bytes(), "base64 after {prefix:?} not masked");
        }
        let mut plain = b"nothing to see".to_vec();
        m.mask(&mut plain);
        assert_eq!(plain, b"nothing to see");
    }

    #[test]
    fn a_tail_that_may_start_a_value_is_held_back() {
        let m = Masker::new(["hunter22"]);
        assert_eq!(m.hold_back(b"password: hunt"), 4);
        assert_eq!(m.hold_back(b"password: h"), 1);
        assert_eq!(m.hold_back(b"no match here"), 0);
        // Split across two writes: held, joined, masked.
        let mut first = b"pw=hunt".to_vec();
        let keep = m.hold_back(&first);
        let tail = first.split_off(first.len() - keep);
        m.mask(&mut first);
        let mut next = [tail, b"er22 ok".to_vec()].concat();
        m.mask(&mut next);
        assert_eq!([first, next].concat(), b"pw=******** ok");
    }
}
