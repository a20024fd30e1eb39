//! The typed client of the name table API, used by the CLI, publishers
//! that reach a remote table, the bench and tests. It reuses the agent
//! crate's HTTP plumbing, so errors arrive as the same [`ClientError`]
//! with the server's envelope inside.
//!
//! Reads are open; writes (mount, unmount) carry the table's bearer token
//! when the client has one ([`NamesClient::with_token`]). Reads never send
//! it, so a client that only resolves cannot leak it.

use std::time::Duration;

use flotilla_agent::http::{ClientError, Endpoint, HttpClient};
use flotilla_api::names::{
    GlobPage, MountEntry, MountRequest, MountResponse, Resolution, UnmountRequest, UnmountResponse,
};
use http::Method;

/// A client of one name table server.
#[derive(Debug, Clone)]
pub struct NamesClient {
    /// Reads.
    http: HttpClient,
    /// Writes: `http` with the token, if any.
    writes: HttpClient,
}

impl NamesClient {
    pub fn new(http: HttpClient) -> NamesClient {
        NamesClient { writes: http.clone(), http }
    }

    /// Sends `token` as `Authorization: Bearer` on writes (`None`: none).
    pub fn with_token(mut self, token: Option<String>) -> NamesClient {
        self.writes = self.http.clone().with_token(token);
        self
    }

    /// A client of `url` (`http://host:port`).
    /// A client of the table at `url`: `http://host:port`, or
    /// `https://host:port#sha256=FINGERPRINT` for one served over TLS
    /// (`names serve --tls` prints it), whose certificate is pinned.
    pub fn connect(url: &str) -> Result<NamesClient, ClientError> {
        let (addr, pin) = flotilla_agent::http::split_pin(url);
        let ep = Endpoint::parse(addr).map_err(ClientError::Decode)?;
        let mut http = HttpClient::new(ep);
        if let Some(pin) = pin {
            http = http.with_cert_sha256(pin).map_err(|e| ClientError::Decode(format!("{url}: {e}")))?;
        }
        Ok(NamesClient::new(http))
    }

    /// The HTTP client of reads (no token).
    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    /// The HTTP client of writes (with the token, if any).
    pub fn http_writes(&self) -> &HttpClient {
        &self.writes
    }

    /// Mounts (or refreshes) `server` at `name` for `ttl`.
    pub async fn mount(&self, name: &str, server: &str, ttl: Duration) -> Result<MountResponse, ClientError> {
        let req = MountRequest { name: name.into(), server: server.into(), ttl_s: ttl.as_secs_f64() };
        self.writes.json(Method::PUT, "/v1/mounts", Some(&req)).await
    }

    /// Unmounts the pair; `false` if it was not mounted.
    pub async fn unmount(&self, name: &str, server: &str) -> Result<bool, ClientError> {
        let req = UnmountRequest { name: name.into(), server: server.into() };
        let resp: UnmountResponse = self.writes.json(Method::DELETE, "/v1/mounts", Some(&req)).await?;
        Ok(resp.removed)
    }

    pub async fn resolve(&self, name: &str) -> Result<Resolution, ClientError> {
        self.http.json(Method::GET, &format!("/v1/resolve/{}", path_escape(name)), None::<&()>).await
    }

    /// One page of matches.
    pub async fn glob_page(
        &self,
        pattern: &str,
        page_token: Option<&str>,
        limit: Option<usize>,
    ) -> Result<GlobPage, ClientError> {
        let mut path = format!("/v1/glob/{}", path_escape(pattern));
        let mut sep = '?';
        if let Some(t) = page_token {
            path.push_str(&format!("{sep}page_token={}", query_escape(t)));
            sep = '&';
        }
        if let Some(l) = limit {
            path.push_str(&format!("{sep}limit={l}"));
        }
        self.http.json(Method::GET, &path, None::<&()>).await
    }

    /// Every match, following pages.
    pub async fn glob(&self, pattern: &str) -> Result<Vec<MountEntry>, ClientError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self.glob_page(pattern, token.as_deref(), None).await?;
            out.extend(page.entries);
            match page.next_page_token {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
    }

    /// `Ok` when the server and its store answer.
    pub async fn health(&self) -> Result<(), ClientError> {
        let resp = self.http.send_ok(self.get("/healthz")?).await?;
        flotilla_agent::http::read_body(resp).await.map(|_| ())
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let resp = self.http.send_ok(self.get("/metrics")?).await?;
        let body = flotilla_agent::http::read_body(resp).await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    fn get(&self, path: &str) -> Result<http::Request<http_body_util::Empty<bytes::Bytes>>, ClientError> {
        self.http
            .request(Method::GET, path)
            .body(http_body_util::Empty::new())
            .map_err(|e| ClientError::Decode(format!("building GET {path}: {e}")))
    }
}

/// Percent-encodes what cannot stand in a path as it is, keeping `/` and
/// every character a valid name or pattern uses: a bad name then reaches
/// the server (and comes back as `invalid_argument`) instead of failing to
/// become a request.
fn path_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.trim_matches('/').bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~:@+=,*/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encodes everything but unreserved characters: names may hold
/// `+` and `=`, which a query string would otherwise mangle.
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_escaped() {
        assert_eq!(query_escape("apps/a+b=c"), "apps%2Fa%2Bb%3Dc");
        assert_eq!(query_escape("n-1_x.y~"), "n-1_x.y~");
        assert_eq!(path_escape("/a b/n*/.../x:1@h+=,/"), "a%20b/n*/.../x:1@h+=,");
        assert_eq!(path_escape("a?b#c%"), "a%3Fb%23c%25");
    }
}
