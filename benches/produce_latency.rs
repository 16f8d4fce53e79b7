//! Produce round-trip latency, direct to Kafka vs through shardgate, measured in
//! microseconds (Kafka's perf tool reports whole milliseconds, too coarse for a proxy's
//! added latency). One record in flight at a time, acks=all, linger 0: each sample is one
//! full produce round trip. Run by `bench/run`; usable alone:
//!
//!   cargo bench --bench produce_latency -- <bootstrap> <topic> <records> [label]

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.len() < 3 {
        eprintln!("usage: produce_latency <bootstrap> <topic> <records> [label]");
        std::process::exit(2);
    }
    let (bootstrap, topic) = (&args[0], &args[1]);
    let n: usize = args[2].parse().expect("records is a number");
    let label = args.get(3).cloned().unwrap_or_else(|| bootstrap.clone());
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("linger.ms", "0")
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let payload = vec![b'x'; 1024];
    // Warm-up: connections, metadata, producer id.
    for i in 0..200 {
        send(&producer, topic, i, &payload).await;
    }
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        send(&producer, topic, i, &payload).await;
        samples.push(t.elapsed());
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "latency {label}: n={n} p50_us={:.0} p99_us={:.0} p999_us={:.0} mean_us={:.0}",
        us(pct(0.50)),
        us(pct(0.99)),
        us(pct(0.999)),
        us(samples.iter().sum::<Duration>() / n as u32)
    );
}

async fn send(p: &FutureProducer, topic: &str, i: usize, payload: &[u8]) {
    let key = format!("k{}", i % 64);
    p.send(
        FutureRecord::to(topic).key(&key).payload(payload),
        Duration::from_secs(30),
    )
    .await
    .map_err(|(e, _)| e)
    .expect("produce acknowledged");
}
