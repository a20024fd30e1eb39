//! Exec stream frames from a hostile peer: decoding must never panic, and
//! must not depend on how the bytes were split into reads.
//!
//! The same input goes to `decode_all` in one piece and to a
//! `FrameDecoder` in pushes whose sizes come from the input itself, so the
//! fuzzer explores read boundaries too. Both must agree exactly, and
//! whatever decodes must re-encode to the input.
#![no_main]

use flotilla_api::frame::{FrameDecoder, decode_all};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = decode_all(data);

    let mut decoder = FrameDecoder::new();
    let mut frames = Vec::new();
    let mut failed = None;
    let mut rest = data;
    let mut i = 0;
    'feed: while !rest.is_empty() {
        let n = (usize::from(data[i % data.len()]) % 64 + 1).min(rest.len());
        i += 1;
        decoder.push(&rest[..n]);
        rest = &rest[n..];
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => {
                    failed = Some(e);
                    break 'feed;
                }
            }
        }
    }
    let pushed = match failed {
        Some(e) => Err(e),
        None => decoder.finish().map(|()| frames),
    };
    assert_eq!(whole, pushed, "decoding depends on how the input was split");

    if let Ok(frames) = whole {
        let mut encoded = Vec::with_capacity(data.len());
        for frame in &frames {
            // The typed views parse untrusted payloads: they must not panic.
            let _ = frame.as_exit();
            let _ = frame.as_error();
            let _ = frame.as_resize();
            encoded.extend_from_slice(&frame.to_bytes());
        }
        assert_eq!(encoded, data, "decoded frames do not re-encode to the input");
    }
});
