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
//!    is fuzzed without needing a valid Produce around it.
//!
//! Record batches are decoded twice: as given (CRC check included) and with every batch's
//! CRC-32C recomputed first. A mutated batch almost never keeps a valid CRC, so without the
//! second pass the fuzzer stops at the CRC check and never reaches decompression or record
//! parsing (a client, of course, computes a valid CRC for whatever bytes it sends).
//!
//! Oracles: any panic or abort is a bug (the proxy must turn malformed input into an error),
//! and so is an input that raises the process's peak RSS by more than
//! `SHARDGATE_FUZZ_MAX_RSS_GROWTH_MB` (default 256). The second one is needed because
//! `GuardedAlloc` serves allocations of 1 GiB and more with `mmap`, which libFuzzer's
//! `-malloc_limit_mb` hooks never see; and its `-rss_limit_mb` thread samples only once a
//! second, so a short burst of committed memory can come and go unnoticed.
#![no_main]

use std::pin::Pin;
use std::sync::OnceLock;
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

/// Rewrites the CRC-32C of every complete v2 batch header in `data` (same walk as
/// `decode_batches`: 8-byte base offset, 4-byte length, 4-byte leader epoch, magic, CRC over
/// everything after the CRC field). Returns `None` if nothing changed.
fn with_valid_crcs(data: &[u8]) -> Option<Bytes> {
    let mut out = data.to_vec();
    let mut pos = 0;
    let mut changed = false;
    while out.len() - pos >= 61 {
        let len = i32::from_be_bytes(out[pos + 8..pos + 12].try_into().unwrap());
        if len < 49 || len as usize > out.len() - pos - 12 {
            break;
        }
        let end = pos + 12 + len as usize;
        let crc = crc32c::crc32c(&out[pos + 21..end]).to_be_bytes();
        if out[pos + 17..pos + 21] != crc {
            out[pos + 17..pos + 21].copy_from_slice(&crc);
            changed = true;
        }
        pos = end;
    }
    changed.then(|| Bytes::from(out))
}

fn records(data: Bytes) {
    let fixed = with_valid_crcs(&data);
    let _ = decode_batches(data);
    if let Some(fixed) = fixed {
        let _ = decode_batches(fixed);
    }
}

fn peak_rss_kib() -> i64 {
    // SAFETY: getrusage only writes the struct it is given.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u.ru_maxrss
    }
}

fn max_rss_growth_kib() -> i64 {
    static LIMIT: OnceLock<i64> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("SHARDGATE_FUZZ_MAX_RSS_GROWTH_MB")
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(256)
            * 1024
    })
}

fn handle(req: &RequestFrame) {
    let mut body = req.body.clone();
    let Ok(decoded) = RequestKind::decode(req.api_key, &mut body, req.api_version) else {
        return;
    };
    if let RequestKind::Produce(p) = decoded {
        for topic in &p.topic_data {
            for part in &topic.partition_data {
                if let Some(r) = &part.records {
                    records(r.clone());
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let rss_before = peak_rss_kib();
    let mut reader = FrameReader::new(Chunked { data, step: 0 }, MAX_FRAME);
    futures::executor::block_on(async {
        // The proxy closes the connection after a refused frame; reading on covers more.
        while let Ok(Some(frame)) = reader.next().await {
            if let Some(req) = admit(frame) {
                handle(&req);
            }
        }
    });
    records(Bytes::copy_from_slice(data));
    let grown = peak_rss_kib() - rss_before;
    if grown > max_rss_growth_kib() {
        panic!(
            "decoding this {}-byte input raised peak RSS by {} MiB",
            data.len(),
            grown / 1024
        );
    }
});
