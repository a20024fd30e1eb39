//! A node replacing its own binary: `POST /v1/node/update`,
//! `POST /v1/node/revert`, and what a candidate binary answers while it is
//! tried in test mode (the protocol is walked through in
//! `flotilla_node::selfupdate`).

use serde::{Deserialize, Serialize};

use crate::types::{Step, field_error};
use crate::{ApiError, Timestamp};

/// Longest `binary` a request may name (a path or a URL).
pub const MAX_BINARY_REF_LEN: usize = 4096;

/// `POST /v1/node/update`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeUpdateRequest {
    /// The new `flotilla` binary: an absolute path on the node's host, or an
    /// `http://` or `https://` URL the node downloads.
    #[schema(min_length = 1, max_length = 4096)]
    pub binary: String,
    /// Its SHA-256 (64 hex digits, an optional `sha256:` prefix): checked
    /// before the binary is ever run; a mismatch is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^(sha256:)?[0-9a-fA-F]{64}$")]
    pub sha256: Option<String>,
}

impl NodeUpdateRequest {
    /// Checks the fields, naming the one at fault.
    pub fn validate(&self) -> Result<(), ApiError> {
        let b = self.binary.as_str();
        if b.is_empty() || b.len() > MAX_BINARY_REF_LEN {
            return Err(field_error("binary", format!("must be 1 to {MAX_BINARY_REF_LEN} bytes long")));
        }
        if !(b.starts_with('/') || b.starts_with("http://") || b.starts_with("https://")) {
            return Err(field_error("binary", format!("must be an absolute path or an http(s) URL, not {b:?}")));
        }
        if let Some(h) = &self.sha256 {
            parse_sha256(h).map_err(|e| field_error("sha256", e))?;
        }
        // A binary from the network runs as root: it comes over TLS and
        // is checked against a digest the operator gave, or not at all.
        if b.starts_with("http://") {
            return Err(field_error("binary", format!("{b:?}: a binary is downloaded over https only")));
        }
        if b.starts_with("https://") && self.sha256.is_none() {
            return Err(field_error("sha256", "give the SHA-256 of a binary downloaded from a URL (--sha256)"));
        }
        Ok(())
    }
}

/// A SHA-256 as 64 lowercase hex digits, from hex in any case with an
/// optional `sha256:` prefix.
pub fn parse_sha256(text: &str) -> Result<String, String> {
    let hex = text.strip_prefix("sha256:").unwrap_or(text);
    if hex.len() != 64 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("must be 64 hex digits (a SHA-256), not {text:?}"));
    }
    Ok(hex.to_ascii_lowercase())
}

/// One version of the node's binary, kept as `HOME/versions/<id>/flotilla`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeVersion {
    /// The version directory's name: the first 12 hex digits of `sha256`
    /// (or any name an operator gave a directory by hand).
    pub id: String,
    /// The binary's SHA-256, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Which request started a hand-over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpdateKind {
    Update,
    Revert,
}

impl UpdateKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateKind::Update => "update",
            UpdateKind::Revert => "revert",
        }
    }
}

/// The answer to update and revert: the new version passed its test, the
/// `current` link points at it, and the node is handing over (it stops
/// accepting, finishes what is in flight and re-executes itself).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeUpdate {
    /// Names this hand-over in `HOME/update.log` and in its outcome.
    pub id: String,
    pub kind: UpdateKind,
    pub from: NodeVersion,
    pub to: NodeVersion,
    /// The node's pid, which the new version keeps (it re-executes).
    pub pid: u32,
    /// The new version must have checked itself and committed by then, or
    /// the previous version comes back by itself.
    pub deadline: Timestamp,
    /// What was done, in order (`staged`, `verified`, `test_started`,
    /// `test_answered`, `self_test_passed`, `pending_written`, `switched`,
    /// `watchdog_started`).
    pub steps: Vec<Step>,
}

/// How a hand-over ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpdateResult {
    /// The new version checked itself after the switch and stays.
    Committed,
    /// The new version failed (its check, or it exited or hung before
    /// committing): `current` was swapped back and the previous version runs.
    Reverted,
}

/// The outcome of the last hand-over (`HOME/update.last`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UpdateOutcome {
    /// The hand-over's id ([`NodeUpdate::id`]).
    pub id: String,
    pub kind: UpdateKind,
    pub from: String,
    pub to: String,
    pub result: UpdateResult,
    /// Why it was reverted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: Timestamp,
}

/// What a node in test mode answers at `GET /v1/node`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TestModeInfo {
    /// The binary's release version.
    pub version: String,
    pub pid: u32,
    /// Always true: this process serves nothing but its own checks.
    pub test_mode: bool,
}

/// A node's check of itself: what a candidate answers in test mode at
/// `GET /v1/node/self-test`, and what a new version runs after the switch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SelfTest {
    /// Whether every check passed.
    pub passed: bool,
    pub checks: Vec<SelfCheck>,
}

/// One check of a [`SelfTest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SelfCheck {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

impl SelfTest {
    pub fn new(checks: Vec<SelfCheck>) -> SelfTest {
        SelfTest { passed: checks.iter().all(|c| c.ok), checks }
    }

    /// The failed checks as one line, for errors.
    pub fn failures(&self) -> String {
        let failed: Vec<String> =
            self.checks.iter().filter(|c| !c.ok).map(|c| format!("{}: {}", c.name, c.detail)).collect();
        failed.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_where_they_are_parsed() {
        let ok = NodeUpdateRequest { binary: "/usr/local/bin/flotilla".into(), sha256: Some("A".repeat(64)) };
        assert!(ok.validate().is_ok());
        let rel = NodeUpdateRequest { binary: "flotilla".into(), sha256: None };
        assert_eq!(rel.validate().unwrap_err().details.unwrap()["field"], "binary");
        let bad = NodeUpdateRequest { binary: "https://example.com/flotilla".into(), sha256: Some("abc".into()) };
        assert_eq!(bad.validate().unwrap_err().details.unwrap()["field"], "sha256");
        // From the network: https, with its digest.
        let digest = Some("a".repeat(64));
        let plain = NodeUpdateRequest { binary: "http://example.com/flotilla".into(), sha256: digest.clone() };
        assert_eq!(plain.validate().unwrap_err().details.unwrap()["field"], "binary");
        let unchecked = NodeUpdateRequest { binary: "https://example.com/flotilla".into(), sha256: None };
        assert_eq!(unchecked.validate().unwrap_err().details.unwrap()["field"], "sha256");
        assert!(NodeUpdateRequest { binary: "https://example.com/flotilla".into(), sha256: digest }.validate().is_ok());
        let err = serde_json::from_str::<NodeUpdateRequest>(r#"{"binary":"/x","sha":"1"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn digests_are_normalised() {
        let h = "AB".repeat(32);
        assert_eq!(parse_sha256(&format!("sha256:{h}")).unwrap(), "ab".repeat(32));
        assert!(parse_sha256("sha256:").is_err());
    }
}

/// `GET /v1/node/update`: the hand-over under way (its id), if any, and
/// how the last one ended; what a client polls after an update or revert.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeUpdateStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<UpdateOutcome>,
}
