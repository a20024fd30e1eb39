//! Bearer tokens, as the node's TCP listener and the names server check
//! them: a token must be long enough and travel in a header, generated ones
//! are 256 random bits as hex, and a presented token is compared without
//! leaking, through timing, how much of a guess was right.

use std::io::Read;

use http::{HeaderMap, header};
use sha2::{Digest, Sha256};

/// Shortest token accepted. Generated ones are 64 hex digits; a short
/// token can be guessed over the network.
pub const MIN_TOKEN_LEN: usize = 16;

/// Bytes of randomness in a generated token (256 bits).
const TOKEN_BYTES: usize = 32;

/// Checks that a token can travel in a header and is not trivially short;
/// the error is the reason and never contains the token.
pub fn check_token(token: &str) -> Result<(), &'static str> {
    if token.len() < MIN_TOKEN_LEN {
        return Err("shorter than 16 characters");
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("only printable ASCII without spaces is allowed");
    }
    Ok(())
}

/// A fresh token: 32 random bytes as hex.
pub fn generate_token() -> std::io::Result<String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A bearer token, not this one.
    Wrong,
}

/// The expected token, kept as its SHA-256: both sides are hashed before
/// they are compared, so the comparison always covers 32 bytes whatever
/// the lengths, and it never stops early.
#[derive(Clone)]
pub struct BearerToken {
    expected: [u8; 32],
}

/// Written out so that nothing about the token reaches a log.
impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl BearerToken {
    pub fn new(token: &str) -> BearerToken {
        BearerToken { expected: Sha256::digest(token.as_bytes()).into() }
    }

    /// Whether `headers` carry this token as `Authorization: Bearer`.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), AuthFailure> {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .ok_or(AuthFailure::Missing)?;
        let got: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let diff = got.iter().zip(self.expected.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if std::hint::black_box(diff) == 0 { Ok(()) } else { Err(AuthFailure::Wrong) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    #[test]
    fn tokens_are_checked_and_made() {
        let t = BearerToken::new("0123456789abcdef0123");
        assert_eq!(t.check(&with(None)), Err(AuthFailure::Missing));
        assert_eq!(t.check(&with(Some("Basic abc"))), Err(AuthFailure::Missing));
        assert_eq!(t.check(&with(Some("Bearer 0123456789abcdef012"))), Err(AuthFailure::Wrong));
        assert_eq!(t.check(&with(Some("bearer 0123456789abcdef0123"))), Ok(()));
        assert!(check_token("short").is_err() && check_token("with a space in it!").is_err());
        let g = generate_token().unwrap();
        assert_eq!(g.len(), 64);
        assert!(check_token(&g).is_ok() && g != generate_token().unwrap());
        assert_eq!(format!("{t:?}"), "BearerToken(<redacted>)");
    }
}
