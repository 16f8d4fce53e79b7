//! Fuzzes what shardgate does with untrusted client bytes, in the order the proxy does it:
//!
//! 1. `FrameReader` splits the input into length-prefixed frames (fed through a reader that
//!    hands out the bytes in uneven chunks, as a socket does);
//! 2. for each frame, the `admit` checks of `src/proxy/connection.rs`: `peek_prefix`,
//!    `versions::lookup`, `versions::local_range` (and the KIP-511 ApiVersions downgrade
//!    answer for a too-new ApiVersions), then `RequestFrame::parse`;
//! 3. the body decoded as the typed request of its API (`RequestKind::decode`, which is what
//!    every handler's `req.decode_body::<T>()` does for its own `T`);
//! 4. for Produce, every partition's `records` through `records::decode_batches` (the
//!    managed-topic reroute path, `src/proxy/reroute.rs`);
//! 5. the whole input through `records::decode_batches` as well, so the record-batch decoder
//!    (CRC, decompression, varints) is fuzzed without needing a valid Produce around it.
//!
//! Any panic or abort is a bug: the proxy must turn malformed input into an error.
#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, RequestKind};
use libfuzzer_sys::fuzz_target;
use shardgate::protocol::frame::FrameReader;
use shardgate::protocol::records::decode_batches;
use shardgate::protocol::{RequestFrame, peek_prefix, versions};
use tokio::io::{AsyncRead, ReadBuf};

// The allocator the shardgate binary installs (src/main.rs): it turns kafka-protocol's
// `Vec::with_capacity(<wire count>)` of 1 GiB+ into an address-space reservation instead of
// an abort. Without it this target would only rediscover that known abort.
#[global_allocator]
static ALLOC: shardgate::alloc::GuardedAlloc = shardgate::alloc::GuardedAlloc;

/// Frames larger than this are refused by the reader, as `limits.max_frame_bytes` does.
const MAX_FRAME: usize = 1 << 20;

/// Hands out `data` in chunks of varying size, so the reader's partial-read and buffer-growth
/// paths run, not only the everything-at-once one.
struct Chunked<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        const SIZES: [usize; 6] = [1, 3, 4, 17, 4096, 65536];
        let want = SIZES[self.step % SIZES.len()];
        self.step += 1;
        let n = want.min(buf.remaining()).min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = tail;
        Poll::Ready(Ok(()))
    }
}

/// What `connection.rs::admit` does before a request is dispatched; `None` where it would
/// answer or refuse instead.
fn admit(frame: Bytes) -> Option<RequestFrame> {
    let prefix = peek_prefix(&frame).ok()?;
    let supported = versions::lookup(prefix.api_key)?;
    let range = versions::local_range(supported);
    if prefix.api_version < range.min || prefix.api_version > range.max {
        if supported.api == ApiKey::ApiVersions {
            let _ = shardgate::proxy::api_versions::downgrade_answer(prefix.correlation_id);
        }
        return None;
    }
    RequestFrame::parse(supported.api, prefix.api_version, frame).ok()
}

fn handle(req: &RequestFrame) {
    let mut body = req.body.clone();
    let Ok(decoded) = RequestKind::decode(req.api_key, &mut body, req.api_version) else {
        return;
    };
    if let RequestKind::Produce(p) = decoded {
        for topic in &p.topic_data {
            for part in &topic.partition_data {
                if let Some(records) = &part.records {
                    let _ = decode_batches(records.clone());
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut reader = FrameReader::new(Chunked { data, step: 0 }, MAX_FRAME);
    futures::executor::block_on(async {
        while let Ok(Some(frame)) = reader.next().await {
            if let Some(req) = admit(frame) {
                handle(&req);
            }
        }
    });
    let _ = decode_batches(Bytes::copy_from_slice(data));
});
