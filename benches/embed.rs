//! Embedding throughput on one thread: the `hashing` embedder on short JSON-ish records
//! (40-100 bytes), and the `minilm` embedder on short sentences when its files are found
//! (`SHARDGATE_MINILM_DIR`, else `$SHARDGATE_CACHE/models/minilm`, as `integration/testbed
//! install` leaves them).
//!
//!   cargo bench --bench embed [-- <seconds per measurement, default 3>]

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use shardgate::prefetch::embed::{Embedder, Hashing, MiniLm, minilm_files_in};

/// Deterministic pseudo-random records, so runs compare (xorshift; no rand dependency).
fn records(n: usize) -> Vec<String> {
    const KINDS: [&str; 8] = [
        "order_created",
        "order_shipped",
        "payment_failed",
        "payment_settled",
        "user_signed_up",
        "login_failed",
        "cart_abandoned",
        "refund_requested",
    ];
    const CITIES: [&str; 6] = ["Berlin", "Lisbon", "Osaka", "Lima", "Nairobi", "Toronto"];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|_| {
            let r = next();
            let kind = KINDS[(r % 8) as usize];
            let city = CITIES[((r >> 8) % 6) as usize];
            match (r >> 16) % 3 {
                0 => format!(r#"{{"type":"{kind}","user":"u{}"}}"#, r >> 40),
                1 => format!(
                    r#"{{"type":"{kind}","user":"u{}","city":"{city}","total":{}.{:02}}}"#,
                    r >> 44,
                    (r >> 20) % 500,
                    (r >> 30) % 100
                ),
                _ => format!(
                    r#"{{"type":"{kind}","id":"{:016x}","note":"{city} store, retry {}"}}"#,
                    r,
                    (r >> 24) % 5
                ),
            }
        })
        .collect()
}

fn sentences() -> Vec<&'static str> {
    vec![
        "The cat sits on the mat",
        "A cat is sitting on a mat",
        "Stock markets fell sharply today",
        "The order was shipped from the Berlin warehouse",
        "Payment failed because the card has expired",
        "A new user signed up for the free plan",
        "The parcel will be delivered tomorrow morning",
        "Login failed three times from an unknown device",
    ]
}

/// Runs `f` (which handles `per_call` items) for about `secs`; returns items per second.
fn rate(secs: f64, per_call: usize, mut f: impl FnMut(usize)) -> f64 {
    let deadline = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut calls = 0usize;
    while start.elapsed() < deadline {
        f(calls);
        calls += 1;
    }
    (calls * per_call) as f64 / start.elapsed().as_secs_f64()
}

fn minilm_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("SHARDGATE_MINILM_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("SHARDGATE_CACHE").map(|c| PathBuf::from(c).join("models/minilm"))
        })
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/shardgate/models/minilm"))
        })?;
    dir.join("model.onnx").is_file().then_some(dir)
}

fn main() {
    let secs: f64 = std::env::args()
        .skip(1)
        .find(|a| a != "--bench")
        .map(|a| a.parse().expect("seconds is a number"))
        .unwrap_or(3.0);
    let recs = records(100_000);
    let bytes: usize = recs.iter().map(String::len).sum();
    println!(
        "records: {} short JSON-ish records, {}..{} bytes, mean {:.0}",
        recs.len(),
        recs.iter().map(String::len).min().unwrap(),
        recs.iter().map(String::len).max().unwrap(),
        bytes as f64 / recs.len() as f64
    );

    for dims in [256, 384] {
        let h = Hashing::new(dims).unwrap();
        let mut out = vec![0.0f32; dims];
        // Warm-up, then the allocation-free path the pool's hashing case can use...
        rate(0.3, 1, |i| h.embed_into(&recs[i % recs.len()], &mut out));
        let into = rate(secs, 1, |i| {
            h.embed_into(black_box(&recs[i % recs.len()]), &mut out);
            black_box(&out);
        });
        // ...and the trait's batch call (one Vec per record), as the pool calls it.
        let batch: Vec<Vec<&str>> = recs
            .chunks(32)
            .map(|c| c.iter().map(String::as_str).collect())
            .collect();
        let via_trait = rate(secs, 32, |i| {
            black_box(h.embed(black_box(&batch[i % batch.len()])).unwrap());
        });
        println!(
            "hashing dims={dims}: {:.2} M records/s (embed_into), {:.2} M records/s (Embedder::embed, batches of 32); {:.2}% of a core per 10k records/s",
            into / 1e6,
            via_trait / 1e6,
            1e4 / via_trait * 100.0
        );
    }

    let Some(dir) = minilm_dir() else {
        println!("minilm: skipped (no model files; run integration/testbed install)");
        return;
    };
    let m = match MiniLm::load(&minilm_files_in(&dir), 1) {
        Ok(m) => m,
        Err(e) => {
            println!("minilm: cannot load from {}: {e}", dir.display());
            std::process::exit(1);
        }
    };
    let s = sentences();
    rate(1.0, 1, |i| {
        m.embed(&[s[i % s.len()]]).unwrap();
    });
    let one = rate(secs, 1, |i| {
        black_box(m.embed(&[s[i % s.len()]]).unwrap());
    });
    let batch: Vec<&str> = (0..32).map(|i| s[i % s.len()]).collect();
    let batched = rate(secs, 32, |_| {
        black_box(m.embed(&batch).unwrap());
    });
    let short: Vec<&str> = recs[..32].iter().map(String::as_str).collect();
    let records_rate = rate(secs, 32, |_| {
        black_box(m.embed(&short).unwrap());
    });
    println!(
        "minilm (1 ONNX Runtime thread): {one:.0} sentences/s one at a time, {batched:.0} sentences/s in batches of 32, {records_rate:.0} JSON-ish records/s in batches of 32"
    );
}
