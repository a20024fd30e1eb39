//! Exec stream framing, the Docker attach convention extended.
//!
//! A frame is an 8-byte header and a payload:
//!
//! ```text
//! [kind u8][0 0 0][len u32 big-endian][payload: len bytes]
//! ```
//!
//! Exec responses, detached-process output and interactive sessions all use
//! it, so one decoder serves every stream. `Exit` is always the last frame of
//! a finished stream and carries an [`ExitStatus`] as JSON; `Error` carries
//! an [`ApiError`](crate::ApiError) as JSON and also ends the stream.
//! `Heartbeat` frames are sent when a stream is idle and carry nothing.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::limits::MAX_FRAME_PAYLOAD;

/// Length of a frame header.
pub const HEADER_LEN: usize = 8;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Input for the process (client to server, sessions and stdin).
    Stdin = 0,
    Stdout = 1,
    Stderr = 2,
    /// The process ended; payload is an [`ExitStatus`] as JSON.
    Exit = 3,
    /// The stream failed; payload is an `ApiError` as JSON.
    Error = 4,
    /// Nothing happened; the peer is alive. Empty payload.
    Heartbeat = 5,
    /// Terminal size change (sessions): `cols u16 BE, rows u16 BE`.
    Resize = 6,
}

impl FrameKind {
    pub fn from_u8(b: u8) -> Option<FrameKind> {
        Some(match b {
            0 => FrameKind::Stdin,
            1 => FrameKind::Stdout,
            2 => FrameKind::Stderr,
            3 => FrameKind::Exit,
            4 => FrameKind::Error,
            5 => FrameKind::Heartbeat,
            6 => FrameKind::Resize,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Bytes,
}

/// Why a byte stream is not a valid frame stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame header has non-zero padding")]
    BadPadding,
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
}

impl Frame {
    pub fn new(kind: FrameKind, payload: impl Into<Bytes>) -> Frame {
        Frame { kind, payload: payload.into() }
    }

    pub fn heartbeat() -> Frame {
        Frame::new(FrameKind::Heartbeat, Bytes::new())
    }

    pub fn exit(status: &ExitStatus) -> Frame {
        Frame::new(FrameKind::Exit, serde_json::to_vec(status).expect("ExitStatus serialises"))
    }

    pub fn error(err: &crate::ApiError) -> Frame {
        Frame::new(FrameKind::Error, serde_json::to_vec(err).expect("ApiError serialises"))
    }

    pub fn resize(cols: u16, rows: u16) -> Frame {
        let mut b = BytesMut::with_capacity(4);
        b.put_u16(cols);
        b.put_u16(rows);
        Frame::new(FrameKind::Resize, b.freeze())
    }

    /// Parses a `Resize` payload into `(cols, rows)`.
    pub fn as_resize(&self) -> Option<(u16, u16)> {
        if self.kind != FrameKind::Resize || self.payload.len() != 4 {
            return None;
        }
        let mut p = &self.payload[..];
        Some((p.get_u16(), p.get_u16()))
    }

    /// Parses an `Exit` payload.
    pub fn as_exit(&self) -> Option<ExitStatus> {
        (self.kind == FrameKind::Exit).then(|| serde_json::from_slice(&self.payload).ok())?
    }

    /// Parses an `Error` payload; a garbled one still yields an error.
    pub fn as_error(&self) -> Option<crate::ApiError> {
        (self.kind == FrameKind::Error).then(|| {
            serde_json::from_slice(&self.payload)
                .unwrap_or_else(|_| crate::ApiError::internal(String::from_utf8_lossy(&self.payload).into_owned()))
        })
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        assert!(self.payload.len() <= MAX_FRAME_PAYLOAD, "frame payload over the limit");
        out.reserve(HEADER_LEN + self.payload.len());
        out.put_u8(self.kind as u8);
        out.put_slice(&[0, 0, 0]);
        out.put_u32(self.payload.len() as u32);
        out.put_slice(&self.payload);
    }

    /// The encoded frame as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(HEADER_LEN + self.payload.len());
        self.encode(&mut b);
        b.freeze()
    }

    /// Encodes `data` as as many frames of `kind` as the size limit needs.
    pub fn encode_chunked(kind: FrameKind, data: &[u8], out: &mut BytesMut) {
        for chunk in data.chunks(MAX_FRAME_PAYLOAD) {
            Frame::new(kind, Bytes::copy_from_slice(chunk)).encode(out);
        }
    }
}

/// Incremental decoder: push bytes as they arrive, pull whole frames out.
/// It never buffers more than one frame plus one read.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Returns the next whole frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind = FrameKind::from_u8(self.buf[0]).ok_or(FrameError::UnknownKind(self.buf[0]))?;
        if self.buf[1..4] != [0, 0, 0] {
            return Err(FrameError::BadPadding);
        }
        let len = u32::from_be_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]]) as usize;
        if len > MAX_FRAME_PAYLOAD {
            return Err(FrameError::TooLarge { len, max: MAX_FRAME_PAYLOAD });
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        let payload = self.buf.split_to(len).freeze();
        Ok(Some(Frame { kind, payload }))
    }

    /// Call at end of stream: errors if a partial frame is left over.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() { Ok(()) } else { Err(FrameError::Truncated { buffered: self.buf.len() }) }
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// Decodes a complete byte slice into frames (tests, fuzzing, small bodies).
pub fn decode_all(data: &[u8]) -> Result<Vec<Frame>, FrameError> {
    let mut d = FrameDecoder::new();
    d.push(data);
    let mut out = Vec::new();
    while let Some(f) = d.next_frame()? {
        out.push(f);
    }
    d.finish()?;
    Ok(out)
}

/// How a process ended, carried by the `Exit` frame.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExitStatus {
    /// Exit code if the process exited normally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// Signal number if the process was killed by a signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// True if the agent killed the process because its timeout passed.
    #[serde(default)]
    pub timed_out: bool,
    /// Wall time from spawn to exit.
    pub duration_ms: u64,
    /// Resource usage of the process and its reaped descendants.
    #[serde(default)]
    pub rusage: Rusage,
}

impl ExitStatus {
    /// The status a shell would report: the code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }

    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// CPU time and peak memory, from `wait4`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rusage {
    pub user_ms: u64,
    pub system_ms: u64,
    pub max_rss_kb: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_kind() {
        let frames = vec![
            Frame::new(FrameKind::Stdout, &b"hello"[..]),
            Frame::new(FrameKind::Stderr, &b""[..]),
            Frame::heartbeat(),
            Frame::resize(80, 24),
            Frame::new(FrameKind::Stdin, &b"x"[..]),
            Frame::error(&crate::ApiError::internal("boom")),
            Frame::exit(&ExitStatus { code: Some(3), duration_ms: 5, ..Default::default() }),
        ];
        let mut buf = BytesMut::new();
        for f in &frames {
            f.encode(&mut buf);
        }
        assert_eq!(decode_all(&buf).unwrap(), frames);
        assert_eq!(frames[3].as_resize(), Some((80, 24)));
        assert_eq!(frames[6].as_exit().unwrap().shell_code(), 3);
        assert_eq!(frames[5].as_error().unwrap().message, "boom");
    }

    #[test]
    fn header_is_the_docker_layout() {
        let b = Frame::new(FrameKind::Stderr, &b"ab"[..]).to_bytes();
        assert_eq!(&b[..], &[2, 0, 0, 0, 0, 0, 0, 2, b'a', b'b']);
    }

    #[test]
    fn decodes_across_arbitrary_splits() {
        let mut buf = BytesMut::new();
        for i in 0..50u8 {
            Frame::new(FrameKind::Stdout, vec![i; i as usize * 7]).encode(&mut buf);
        }
        for split in [1usize, 2, 3, 7, 8, 9, 64, 1000] {
            let mut d = FrameDecoder::new();
            let mut got = Vec::new();
            for chunk in buf.chunks(split) {
                d.push(chunk);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            d.finish().unwrap();
            assert_eq!(got.len(), 50, "split {split}");
            assert!(got.iter().enumerate().all(|(i, f)| f.payload.len() == i * 7));
        }
    }

    #[test]
    fn rejects_bad_headers_without_allocating() {
        assert_eq!(decode_all(&[9, 0, 0, 0, 0, 0, 0, 0]), Err(FrameError::UnknownKind(9)));
        assert_eq!(decode_all(&[1, 1, 0, 0, 0, 0, 0, 0]), Err(FrameError::BadPadding));
        assert!(matches!(decode_all(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]), Err(FrameError::TooLarge { .. })));
        assert_eq!(decode_all(&[1, 0, 0, 0, 0, 0, 0, 5, 1]), Err(FrameError::Truncated { buffered: 9 }));
    }

    #[test]
    fn chunked_encoding_respects_the_limit() {
        let data = vec![7u8; MAX_FRAME_PAYLOAD * 2 + 10];
        let mut buf = BytesMut::new();
        Frame::encode_chunked(FrameKind::Stdout, &data, &mut buf);
        let frames = decode_all(&buf).unwrap();
        assert_eq!(frames.len(), 3);
        assert_eq!(frames.iter().map(|f| f.payload.len()).sum::<usize>(), data.len());
    }

    /// Deterministic pseudo-random garbage never panics the decoder; the
    /// cargo-fuzz target in `fuzz/` explores the same property further.
    #[test]
    fn random_input_never_panics() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..2000 {
            let mut data = Vec::new();
            for _ in 0..(x % 64) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Bias towards small kinds and lengths so some frames parse.
                data.push(if x.is_multiple_of(3) { (x >> 8) as u8 % 7 } else { (x >> 16) as u8 % 4 });
            }
            let _ = decode_all(&data);
        }
    }
}
