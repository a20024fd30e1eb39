//! Push webhooks from GitHub and Gitea: the signature checked (HMAC-SHA256
//! of the body with the project's secret, compared in constant time), the
//! event named, the push read. A push only wakes the project's poller: the
//! repository stays the truth, so a forged or replayed payload can at most
//! cause a fetch.

use hmac::{Hmac, Mac};
use http::HeaderMap;
use serde::Deserialize;
use sha2::Sha256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forge {
    GitHub,
    Gitea,
}

impl Forge {
    pub fn parse(s: &str) -> Option<Forge> {
        match s {
            "github" => Some(Forge::GitHub),
            "gitea" | "forgejo" => Some(Forge::Gitea),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    #[error("the request carries no signature header ({0})")]
    Unsigned(&'static str),
    #[error("the signature header is not hex")]
    Malformed,
    #[error("the signature does not match the project's webhook secret")]
    Mismatch,
    #[error("the push payload is not valid: {0}")]
    Payload(String),
}

/// Checks the body's signature for `forge`.
pub fn verify(forge: Forge, secret: &[u8], headers: &HeaderMap, body: &[u8]) -> Result<(), WebhookError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let given = match forge {
        Forge::GitHub => {
            header("x-hub-signature-256").ok_or(WebhookError::Unsigned("X-Hub-Signature-256"))?.strip_prefix("sha256=")
        }
        Forge::Gitea => header("x-gitea-signature")
            .or_else(|| header("x-hub-signature-256").and_then(|h| h.strip_prefix("sha256=")))
            .map(Some)
            .ok_or(WebhookError::Unsigned("X-Gitea-Signature"))?,
    };
    let given = given.ok_or(WebhookError::Malformed)?;
    let bytes = unhex(given).ok_or(WebhookError::Malformed)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    mac.verify_slice(&bytes).map_err(|_| WebhookError::Mismatch)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// The event's name (`push`, `ping`, …).
pub fn event(forge: Forge, headers: &HeaderMap) -> Option<String> {
    let name = match forge {
        Forge::GitHub => "x-github-event",
        Forge::Gitea => "x-gitea-event",
    };
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// What a push says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// The branch pushed (`None` for a tag).
    pub branch: Option<String>,
    pub after: String,
    pub before: String,
    pub deleted: bool,
    pub repo_urls: Vec<String>,
    pub repo_name: String,
}

#[derive(Deserialize)]
struct RawPush {
    #[serde(rename = "ref")]
    reference: String,
    #[serde(default)]
    after: String,
    #[serde(default)]
    before: String,
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    repository: Option<RawRepo>,
}

#[derive(Deserialize)]
struct RawRepo {
    #[serde(default)]
    full_name: String,
    #[serde(default)]
    clone_url: Option<String>,
    #[serde(default)]
    ssh_url: Option<String>,
    #[serde(default)]
    html_url: Option<String>,
}

pub fn parse_push(body: &[u8]) -> Result<Push, WebhookError> {
    let raw: RawPush = serde_json::from_slice(body).map_err(|e| WebhookError::Payload(e.to_string()))?;
    let repo = raw.repository;
    Ok(Push {
        branch: raw.reference.strip_prefix("refs/heads/").map(str::to_string),
        after: raw.after,
        before: raw.before,
        deleted: raw.deleted,
        repo_name: repo.as_ref().map(|r| r.full_name.clone()).unwrap_or_default(),
        repo_urls: repo
            .map(|r| [r.clone_url, r.ssh_url, r.html_url].into_iter().flatten().collect())
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    // GitHub's documented example (docs: "Validating webhook deliveries").
    const SECRET: &[u8] = b"It's a Secret to Everybody";
    const SIG: &str = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn github_signatures() {
        let h = headers(&[("x-hub-signature-256", &format!("sha256={SIG}"))]);
        assert_eq!(verify(Forge::GitHub, SECRET, &h, b"Hello, World!"), Ok(()));
        assert_eq!(verify(Forge::GitHub, b"wrong", &h, b"Hello, World!"), Err(WebhookError::Mismatch));
        assert_eq!(verify(Forge::GitHub, SECRET, &h, b"Hello, World?"), Err(WebhookError::Mismatch));
        let none = HeaderMap::new();
        assert!(matches!(verify(Forge::GitHub, SECRET, &none, b"x"), Err(WebhookError::Unsigned(_))));
        let bad = headers(&[("x-hub-signature-256", "sha256=zz")]);
        assert_eq!(verify(Forge::GitHub, SECRET, &bad, b"x"), Err(WebhookError::Malformed));
        let bare = headers(&[("x-hub-signature-256", SIG)]);
        assert_eq!(verify(Forge::GitHub, SECRET, &bare, b"Hello, World!"), Err(WebhookError::Malformed));
    }

    #[test]
    fn gitea_signatures() {
        let h = headers(&[("x-gitea-signature", SIG)]);
        assert_eq!(verify(Forge::Gitea, SECRET, &h, b"Hello, World!"), Ok(()));
        let hub = headers(&[("x-hub-signature-256", &format!("sha256={SIG}"))]);
        assert_eq!(verify(Forge::Gitea, SECRET, &hub, b"Hello, World!"), Ok(()));
        assert_eq!(verify(Forge::Gitea, b"other", &h, b"Hello, World!"), Err(WebhookError::Mismatch));
        assert_eq!(event(Forge::Gitea, &headers(&[("x-gitea-event", "push")])).as_deref(), Some("push"));
        assert_eq!(event(Forge::GitHub, &headers(&[("x-github-event", "ping")])).as_deref(), Some("ping"));
    }

    #[test]
    fn pushes() {
        let github = br#"{"ref":"refs/heads/main","before":"aaa","after":"bbb","created":false,"deleted":false,
            "repository":{"id":1,"full_name":"octo/hello","clone_url":"https://github.com/octo/hello.git",
            "ssh_url":"git@github.com:octo/hello.git","html_url":"https://github.com/octo/hello"},
            "pusher":{"name":"octo"},"commits":[{"id":"bbb","message":"m"}]}"#;
        let p = parse_push(github).unwrap();
        assert_eq!(p.branch.as_deref(), Some("main"));
        assert_eq!((p.before.as_str(), p.after.as_str(), p.deleted), ("aaa", "bbb", false));
        assert_eq!(p.repo_name, "octo/hello");
        assert_eq!(p.repo_urls.len(), 3);
        let gitea = br#"{"ref":"refs/tags/v1","before":"0000","after":"ccc","repository":{"full_name":"me/r",
            "clone_url":"http://gitea.local/me/r.git"}}"#;
        let p = parse_push(gitea).unwrap();
        assert_eq!(p.branch, None);
        assert_eq!(p.repo_urls, ["http://gitea.local/me/r.git"]);
        assert!(matches!(parse_push(b"{}"), Err(WebhookError::Payload(_))));
    }
}
