//! Pulls images from OCI registries (the Docker Registry v2 / OCI
//! distribution API) into the image store.
//!
//! # Protocol, step by step
//!
//! 1. `authenticating`: `GET /v2/` tells how the registry wants to be
//!    spoken to. No challenge: anonymous. A `Basic` challenge: the
//!    credentials go along with every request. A `Bearer` challenge: the
//!    credentials (or none) are exchanged at the named realm for a token
//!    scoped `repository:<repo>:pull`. `oci-client` carries out this
//!    exchange; a refusal — here or at the next request — is reported as a
//!    failure of this step.
//! 2. `resolving`: the manifest is fetched by tag or digest, its sha256
//!    computed here (and checked against the reference's digest). An index
//!    (OCI index, Docker manifest list) is descended into its `linux/<this
//!    machine's arch>` entry, fetched by digest.
//! 3. `pulling_layer` (`i/n digest size`): each layer is streamed into the
//!    staging directory as `blobs/sha256/<hex>` of an OCI layout, hashed as
//!    it arrives and cut off at the size its descriptor declares. A layer
//!    whose bytes do not hash to its digest fails the pull, naming it.
//! 4. `applying`, `committing`: [`crate::images::Images::apply_pulled_blocking`]
//!    reads that layout through the same code as a local OCI layout import
//!    (each layer verified again as it is applied, whiteouts, the
//!    hostile-tar extractor) and commits it. The image's digest is the
//!    platform manifest's, as for a local layout.
//!
//! Everything is written under one [`Staging`] guard: any failure, panic or
//! cancellation removes it.
//!
//! # Credentials
//!
//! A pull's username and password live in the request and the client for
//! the duration of the pull only. They are never stored, logged, put in an
//! operation step or error, or published as an event.
//!
//! # TLS
//!
//! HTTPS through rustls with the `ring` provider (the node's TLS stack), the
//! system's trust store (`rustls-platform-verifier`), and no other roots.
//! `plain_http` speaks HTTP to the one registry named, for a test or
//! loopback registry.

use std::time::Duration;

use flotilla_api::{ApiError, ErrorCode, PullImageRequest};
use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
    OciDescriptor,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::images::{Progress, Staging, digest_hex, go_arch, parse_reference};

/// A registry that does not accept a connection by then is reported
/// unreachable rather than left hanging.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A read that stalls this long fails the pull (a slow but moving download
/// is fine: the timeout is per read, not per layer).
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// The largest manifest accepted: real ones are a few KiB; anything bigger
/// is not an image manifest.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// How deep indexes may nest (an index naming an index naming a manifest).
const MAX_INDEX_DEPTH: usize = 3;

const USER_AGENT: &str = concat!("flotilla/", env!("CARGO_PKG_VERSION"));

/// The manifest types a pull asks for.
const ACCEPT: &[&str] =
    &[OCI_IMAGE_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE, IMAGE_MANIFEST_LIST_MEDIA_TYPE];

/// Parses `host[:port]/repository[:tag]` or `…@sha256:<hex>`.
pub fn parse_source(source: &str) -> Result<Reference, ApiError> {
    let bad = |why: String| {
        ApiError::invalid(format!(
            "bad registry reference {source:?}: {why} (write HOST[:PORT]/REPOSITORY:TAG or …@sha256:HEX, \
             e.g. registry.example.com/team/app:1)"
        ))
    };
    if source.contains("://") {
        return Err(bad("no scheme: pass --plain-http for a registry without TLS".into()));
    }
    let r: Reference = source.parse().map_err(|e: oci_client::ParseError| bad(e.to_string()))?;
    if let Some(d) = r.digest()
        && digest_hex(d).is_none()
    {
        return Err(bad(format!("unsupported digest {d:?} (only sha256)")));
    }
    Ok(r)
}

/// The `name:tag` a pull is stored as when none is given: the repository's
/// last path part and the tag (or the digest's first 12 hex digits).
pub fn default_reference(r: &Reference) -> String {
    let name = r.repository().rsplit('/').next().unwrap_or(r.repository());
    let tag = match (r.tag(), r.digest().and_then(digest_hex)) {
        (Some(t), _) => t.to_string(),
        (None, Some(hex)) => hex[..12].to_string(),
        (None, None) => "latest".to_string(),
    };
    format!("{name}:{tag}")
}

/// Checks a pull request; returns the remote reference and the local
/// `name:tag`.
pub fn check(req: &PullImageRequest) -> Result<(Reference, String), ApiError> {
    let remote = parse_source(&req.source)?;
    if req.password.is_some() && req.username.is_none() {
        return Err(ApiError::invalid("a registry password needs a username"));
    }
    let local = req.reference.clone().unwrap_or_else(|| default_reference(&remote));
    parse_reference(&local).map_err(|e| {
        if req.reference.is_none() {
            ApiError::invalid(format!("{} (name it with --as NAME:TAG)", e.message))
        } else {
            e
        }
    })?;
    Ok((remote, local))
}

/// What [`fetch`] left in the staging directory.
#[derive(Debug)]
pub struct Fetched {
    /// The remote reference, normalised (`host/repository:tag`).
    pub source: String,
    /// `sha256:` of the platform manifest.
    pub digest: String,
    pub layers: usize,
    /// Compressed bytes downloaded.
    pub bytes: u64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: i64,
    #[serde(default)]
    urls: Option<Vec<String>>,
    #[serde(default)]
    platform: Option<Platform>,
}

/// An image manifest or an index, told apart by which list it has.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RemoteManifest {
    #[serde(default)]
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// A failure of one step: its code, message and `details.step`.
fn fail(code: ErrorCode, step: &str, message: String) -> ApiError {
    ApiError::new(code, message).with_details(serde_json::json!({ "step": step }))
}

/// Maps the client's errors: one place decides code and wording.
fn registry_err(e: OciDistributionError, step: &str, what: &str, ctx: &Ctx) -> ApiError {
    let registry = &ctx.registry;
    let refused = |detail: String| {
        let message = if ctx.with_credentials {
            format!("authenticating to {registry}: the registry refused the credentials given ({detail})")
        } else {
            format!(
                "authenticating to {registry}: the registry wants credentials ({detail}); \
                 pass --username and --password-stdin"
            )
        };
        fail(ErrorCode::Unauthorized, "authenticating", message)
    };
    let chain = flotilla_agent::http::error_chain(&e);
    match e {
        OciDistributionError::UnauthorizedError { .. } => refused("HTTP 401".into()),
        OciDistributionError::AuthenticationFailure(reason) => {
            refused(format!("the token service said: {}", reason.chars().take(200).collect::<String>()))
        }
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            let text: Vec<String> = envelope.errors.iter().map(|e| format!("{:?}: {}", e.code, e.message)).collect();
            let text = text.join("; ");
            if codes.iter().any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied)) {
                refused(text)
            } else if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound
                )
            }) {
                fail(ErrorCode::NotFound, step, format!("{what}: not found ({text})"))
            } else {
                fail(ErrorCode::Internal, step, format!("{what}: {registry} answered with an error ({text})"))
            }
        }
        OciDistributionError::ServerError { code: 401 | 403, .. } => refused(chain),
        OciDistributionError::ServerError { code: 404, .. } | OciDistributionError::ImageManifestNotFoundError(_) => {
            fail(ErrorCode::NotFound, step, format!("{what}: not found on {registry} ({chain})"))
        }
        OciDistributionError::DigestError(_)
        | OciDistributionError::ManifestParsingError(_)
        | OciDistributionError::VersionedParsingError(_)
        | OciDistributionError::UnsupportedMediaTypeError(_)
        | OciDistributionError::UnsupportedSchemaVersionError(_)
        | OciDistributionError::SpecViolationError(_) => {
            fail(ErrorCode::UnprocessableTar, step, format!("{what}: {registry} sent something unusable: {chain}"))
        }
        OciDistributionError::RequestError(ref r) if r.is_timeout() => {
            fail(ErrorCode::Timeout, step, format!("{what}: {registry} did not answer in time: {chain}"))
        }
        OciDistributionError::RequestError(_) => {
            let hint = if ctx.plain_http { "" } else { " (if this registry speaks plain HTTP, pass --plain-http)" };
            fail(ErrorCode::Internal, step, format!("{what}: could not talk to {registry}: {chain}{hint}"))
        }
        _ => fail(ErrorCode::Internal, step, format!("{what}: {chain}")),
    }
}

/// What error messages need to know about a pull (nothing secret).
struct Ctx {
    registry: String,
    with_credentials: bool,
    plain_http: bool,
}

fn client(registry: &str, plain_http: bool) -> Result<Client, ApiError> {
    // reqwest (under oci-client) uses the process's default rustls provider;
    // make it ring, as for the node's own TLS. Losing the race to another
    // installer of the same provider is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = ClientConfig {
        protocol: if plain_http {
            ClientProtocol::HttpsExcept(vec![registry.to_string()])
        } else {
            ClientProtocol::Https
        },
        connect_timeout: Some(CONNECT_TIMEOUT),
        read_timeout: Some(READ_TIMEOUT),
        user_agent: USER_AGENT,
        // Indexes are resolved here, with our platform rule.
        platform_resolver: None,
        ..Default::default()
    };
    Client::try_from(config)
        .map_err(|e| ApiError::internal(format!("making a registry client: {}", flotilla_agent::http::error_chain(&e))))
}

/// Downloads `remote`'s manifest for this platform and its layers into
/// `staging` as an OCI layout. Async; the caller then applies the layout
/// on a blocking thread with [`crate::images::Images::apply_pulled_blocking`].
pub async fn fetch(
    req: &PullImageRequest,
    remote: &Reference,
    staging: &Staging,
    progress: &dyn Progress,
) -> Result<Fetched, ApiError> {
    let registry = remote.resolve_registry().to_string();
    let ctx = Ctx { registry: registry.clone(), with_credentials: req.username.is_some(), plain_http: req.plain_http };
    let auth = match (&req.username, &req.password) {
        (Some(u), p) => RegistryAuth::Basic(u.clone(), p.clone().unwrap_or_default()),
        (None, _) => RegistryAuth::Anonymous,
    };
    let client = client(&registry, req.plain_http)?;

    progress.step(
        "authenticating",
        Some(format!("{registry} {}", if ctx.with_credentials { "with credentials" } else { "anonymously" })),
    );
    client
        .auth(remote, &auth, RegistryOperation::Pull)
        .await
        .map_err(|e| registry_err(e, "authenticating", &format!("authenticating to {registry}"), &ctx))?;

    progress.step("resolving", Some(remote.whole()));
    let mut at = remote.clone();
    let mut depth = 0;
    let (manifest, raw, digest, media_type) = loop {
        let what = format!("fetching the manifest of {at}");
        let (raw, _) = client
            .pull_manifest_raw(&at, &auth, ACCEPT)
            .await
            .map_err(|e| registry_err(e, "resolving", &what, &ctx))?;
        if raw.len() > MAX_MANIFEST_BYTES {
            return Err(fail(
                ErrorCode::UnprocessableTar,
                "resolving",
                format!("{what}: {} bytes; refusing a manifest that large", raw.len()),
            ));
        }
        let digest = format!("sha256:{}", hex(&Sha256::digest(&raw)));
        if let Some(want) = at.digest()
            && want != digest
        {
            return Err(fail(
                ErrorCode::UnprocessableTar,
                "resolving",
                format!("{what}: it does not match its digest: expected {want}, read {digest}"),
            ));
        }
        let m: RemoteManifest = serde_json::from_slice(&raw).map_err(|e| {
            fail(ErrorCode::UnprocessableTar, "resolving", format!("{what}: not a manifest I can read: {e}"))
        })?;
        if m.schema_version != 2 {
            return Err(fail(
                ErrorCode::UnprocessableTar,
                "resolving",
                format!("{what}: schema version {} is not supported (only 2)", m.schema_version),
            ));
        }
        if m.manifests.is_empty() {
            let media_type = m.media_type.clone().unwrap_or_else(|| OCI_IMAGE_MEDIA_TYPE.to_string());
            break (m, raw, digest, media_type);
        }
        depth += 1;
        let arch = go_arch();
        let pick = m
            .manifests
            .iter()
            .find(|d| d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == arch))
            .ok_or_else(|| {
                let have: Vec<String> = m
                    .manifests
                    .iter()
                    .filter_map(|d| d.platform.as_ref().map(|p| format!("{}/{}", p.os, p.architecture)))
                    .collect();
                fail(
                    ErrorCode::NotFound,
                    "resolving",
                    format!("{at} has no linux/{arch} image (it has: {})", have.join(", ")),
                )
            })?;
        if depth > MAX_INDEX_DEPTH || digest_hex(&pick.digest).is_none() {
            return Err(fail(
                ErrorCode::UnprocessableTar,
                "resolving",
                format!("{what}: an index nested too deep or naming digest {:?}", pick.digest),
            ));
        }
        at = remote.clone_with_digest(pick.digest.clone());
    };
    for l in &manifest.layers {
        if !l.media_type.contains("tar") {
            return Err(fail(
                ErrorCode::UnprocessableTar,
                "resolving",
                format!("{remote} is not a container image: layer {} has media type {:?}", l.digest, l.media_type),
            ));
        }
    }

    // The layout the local import reads: oci-layout, index.json naming the
    // one manifest, and the blobs.
    let layout = staging.layout();
    let blobs = layout.join("blobs/sha256");
    tokio::fs::create_dir_all(&blobs).await.map_err(io("creating the download directory"))?;
    let manifest_hex = digest_hex(&digest).expect("computed here");
    tokio::fs::write(blobs.join(manifest_hex), &raw).await.map_err(io("writing the manifest"))?;
    tokio::fs::write(layout.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .await
        .map_err(io("writing the layout"))?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{ "mediaType": media_type, "digest": digest, "size": raw.len() }],
    });
    tokio::fs::write(layout.join("index.json"), index.to_string()).await.map_err(io("writing the layout"))?;

    let n = manifest.layers.len();
    let mut total = 0;
    for (i, l) in manifest.layers.iter().enumerate() {
        let label = format!("{}/{n} {}", i + 1, l.digest);
        let size = u64::try_from(l.size).map_err(|_| {
            fail(ErrorCode::UnprocessableTar, "pulling_layer", format!("layer {label}: negative size {}", l.size))
        })?;
        progress.step("pulling_layer", Some(format!("{label} {}", flotilla_api::units::format_size(size))));
        total += download(&client, &at, l, size, &blobs, &label, &ctx).await?;
    }
    Ok(Fetched { source: remote.whole(), digest, layers: n, bytes: total })
}

/// Streams one layer into `blobs/<hex>`, hashing it; returns its size.
async fn download(
    client: &Client,
    image: &Reference,
    layer: &Descriptor,
    size: u64,
    blobs: &std::path::Path,
    label: &str,
    ctx: &Ctx,
) -> Result<u64, ApiError> {
    let step = "pulling_layer";
    let hex = digest_hex(&layer.digest).ok_or_else(|| {
        fail(ErrorCode::UnprocessableTar, step, format!("layer {label}: unsupported digest (only sha256)"))
    })?;
    let desc = OciDescriptor {
        media_type: layer.media_type.clone(),
        digest: layer.digest.clone(),
        size: layer.size,
        urls: layer.urls.clone(),
        ..Default::default()
    };
    let what = format!("downloading layer {label}");
    let mut stream = client.pull_blob_stream(image, &desc).await.map_err(|e| registry_err(e, step, &what, ctx))?;
    let path = blobs.join(hex);
    let file = tokio::fs::File::create(&path).await.map_err(io(format!("creating {}", path.display())))?;
    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let mut hash = Sha256::new();
    let mut got = 0u64;
    // The client's stream checks the digest too and ends with an error on a
    // mismatch, after the last byte: our own hash tells which it was.
    let mut broke = None;
    while let Some(chunk) = stream.stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                broke = Some(e);
                break;
            }
        };
        got += chunk.len() as u64;
        if got > size {
            return Err(fail(
                ErrorCode::UnprocessableTar,
                step,
                format!("{what}: the registry sent more than the {size} bytes its manifest declares"),
            ));
        }
        hash.update(&chunk);
        out.write_all(&chunk).await.map_err(io(format!("writing {}", path.display())))?;
    }
    out.flush().await.map_err(io(format!("writing {}", path.display())))?;
    if got < size {
        let why = broke.map(|e| format!(": {e}")).unwrap_or_default();
        return Err(fail(
            ErrorCode::Internal,
            step,
            format!("{what}: the download broke off after {got} of {size} bytes{why}"),
        ));
    }
    let read = format!("sha256:{}", hex_of(hash));
    if read != layer.digest {
        return Err(fail(
            ErrorCode::UnprocessableTar,
            step,
            format!("layer {label} does not match its digest: expected {}, read {read}", layer.digest),
        )
        .with_details(serde_json::json!({ "step": step, "layer": layer.digest })));
    }
    if let Some(e) = broke {
        return Err(fail(ErrorCode::Internal, step, format!("{what}: {e}")));
    }
    Ok(got)
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ApiError {
    move |e| ApiError::internal(format!("{what}: {e}"))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hex_of(h: Sha256) -> String {
    hex(&h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_and_default_names() {
        let r = parse_source("127.0.0.1:5000/team/app:1").unwrap();
        assert_eq!((r.registry(), r.repository(), r.tag()), ("127.0.0.1:5000", "team/app", Some("1")));
        assert_eq!(default_reference(&r), "app:1");
        let r = parse_source("debian").unwrap();
        assert_eq!(r.whole(), "docker.io/library/debian:latest");
        assert_eq!(default_reference(&r), "debian:latest");
        let d = format!("sha256:{}", "ab".repeat(32));
        let r = parse_source(&format!("reg.example:443/x/y@{d}")).unwrap();
        assert_eq!(default_reference(&r), "y:abababababab");
        for bad in ["http://reg/x:1", "Reg/UPPER:1", "reg/x@sha256:short", ""] {
            assert!(parse_source(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn requests_are_checked_and_never_print_secrets() {
        let req = PullImageRequest {
            source: "127.0.0.1:5000/team/app:1".into(),
            username: Some("alice".into()),
            password: Some("hunter2".into()),
            ..Default::default()
        };
        assert_eq!(check(&req).unwrap().1, "app:1");
        let shown = format!("{req:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("alice"), "{shown}");
        let no_user = PullImageRequest { username: None, ..req.clone() };
        assert!(check(&no_user).is_err());
        let bad_local = PullImageRequest { reference: Some("Bad:1".into()), ..req };
        assert_eq!(check(&bad_local).unwrap_err().code, ErrorCode::InvalidArgument);
    }
}
