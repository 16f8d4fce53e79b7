//! Placement that reassigns (3 brokers): shardgate moves replicas of pool partitions between
//! brokers with AlterPartitionReassignments when leadership moves cannot spread the active
//! shards' load, under a replication throttle it sets and removes, and cleans up after a
//! topic deleted mid-move. Each test runs its own instance (embedded store) with its own
//! `[placement]` settings, on ports 29140-29149 / 29240-29249.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

fn api(admin: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let text = body.map(|b| b.to_string());
    let (code, out) =
        shardgate::admin::http_request(&format!("http://{admin}"), method, path, text.as_deref())
            .unwrap();
    (
        code,
        serde_json::from_str(&out).unwrap_or(Value::String(out)),
    )
}

/// `kafka-configs --describe` of one entity: its `*throttled*` settings as `key=value`.
fn throttles(entity_type: &str, name: &str) -> Vec<String> {
    let out = run_ok(
        Command::new(bin("kafka-configs")).args([
            "--bootstrap-server",
            &kafka(),
            "--entity-type",
            entity_type,
            "--entity-name",
            name,
            "--describe",
        ]),
        Duration::from_secs(60),
    );
    out.split(|c: char| c.is_whitespace() || c == '{' || c == '}')
        .filter(|w| w.contains("throttled") && w.contains('='))
        .map(|w| w.trim_end_matches(',').to_string())
        .collect()
}

/// Whether Kafka's reassignment tool lists a reassignment of `topic`.
fn reassigning(topic: &str) -> bool {
    run_ok(
        Command::new(bin("kafka-reassign-partitions")).args([
            "--bootstrap-server",
            &kafka(),
            "--list",
        ]),
        Duration::from_secs(60),
    )
    .contains(topic)
}

/// Waits until the placement view of `topic` on `admin` shows no move under way.
fn until_nothing_moves(admin: &str, topic: &str, what: &str, limit: Duration) {
    eventually(what, limit, || {
        let (_, view) = api(
            admin,
            "GET",
            &format!("/api/v1/topics/{topic}/placement"),
            None,
        );
        view["moving"].as_array().is_some_and(|m| m.is_empty())
    });
}

/// No reassignment of `topic` runs, and no throttle is set on any broker or on the topic.
fn assert_nothing_left(topic: &str) {
    assert!(!reassigning(topic), "no reassignment left");
    for b in 1..=3 {
        let left = throttles("brokers", &b.to_string());
        assert!(left.is_empty(), "broker {b}: {left:?}");
    }
    let left = throttles("topics", topic);
    assert!(left.is_empty(), "{left:?}");
}

fn set_min_insync_1(topic: &str) {
    run_ok(
        Command::new(bin("kafka-configs")).args([
            "--bootstrap-server",
            &kafka(),
            "--entity-type",
            "topics",
            "--entity-name",
            topic,
            "--alter",
            "--add-config",
            "min.insync.replicas=1",
        ]),
        Duration::from_secs(60),
    );
}

/// Writes `mib` MiB of 1000-byte records straight to Kafka, into `partition`.
async fn fill(topic: &str, partition: i32, mib: usize) {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("acks", "1")
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .create()
        .unwrap();
    let value = vec![b'x'; 1000];
    let mut pending = Vec::new();
    for _ in 0..mib * 1048 {
        loop {
            match p.send_result(
                FutureRecord::<(), _>::to(topic)
                    .partition(partition)
                    .payload(&value),
            ) {
                Ok(d) => {
                    pending.push(d);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
    for d in pending {
        d.await.unwrap().unwrap();
    }
}

/// Creates a managed RF1 topic through `admin` (which adopts none: it creates it), with
/// min.insync.replicas 1 so acks=all writes work.
fn managed_rf1(admin: &str, topic: &str, pool: i32, shards: u32, autoscale: Value) {
    let (code, body) = api(
        admin,
        "POST",
        "/api/v1/topics",
        Some(
            json!({"name": topic, "initial_shards": shards, "pool": pool,
                    "replication_factor": 1, "autoscale": autoscale}),
        ),
    );
    assert_eq!(code, 201, "{body}");
    set_min_insync_1(topic);
}

/// A managed RF1 topic (pool 4, 2 shards, no autoscaling or placement of its own) whose
/// partition 0 holds `mib` MiB: (topic, the broker holding partition 0, another broker).
async fn filled_rf1(admin: &str, prefix: &str, mib: usize) -> (String, i32, i32) {
    let topic = unique(prefix);
    managed_rf1(
        admin,
        &topic,
        4,
        2,
        json!({"enabled": false, "balance_interval_secs": 0}),
    );
    fill(&topic, 0, mib).await;
    let (from, _) = partition_layout(&topic)[&0].clone();
    let to = (1..=3).find(|b| *b != from).unwrap();
    (topic, from, to)
}

fn instance(name: &str, client: &str, admin: &str, placement: &str) -> Shardgate {
    own_instance(
        name,
        client,
        admin,
        "",
        &format!("[placement]\n{placement}\n"),
    )
}

/// An active partition moved by hand (the API) copies its data under the replication
/// throttle shardgate sets on both brokers and the topic, and removes afterwards; a producer
/// with acks=1 through shardgate loses nothing across the leader change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the 3-broker testbed: integration/run-tests"]
async fn the_throttle_is_set_during_an_active_move_and_removed_afterwards() {
    assert_eq!(brokers(), 3, "this test needs the 3-broker testbed");
    let (client, admin) = ("127.0.0.1:29140", "127.0.0.1:29240");
    let _sg = instance(
        "placement-throttle",
        client,
        admin,
        "throttle_bytes_per_sec = 1048576",
    );
    let mib = 24;
    let (topic, from, to) = filled_rf1(admin, "move-throttle", mib).await;
    let other = (1..=3).find(|b| *b != from && *b != to).unwrap();
    // An acks=1 producer through shardgate throughout (its records to partition 0 go with
    // acks=all while the partition moves).
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let producer = {
        let p: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", client)
            .set("acks", "1")
            .set("linger.ms", "5")
            .create()
            .unwrap();
        let (t, stop, acked) = (topic.clone(), stop.clone(), acked.clone());
        tokio::spawn(async move { produce_keyed_sequences(p, &t, "b", 50, &stop, &acked).await })
    };
    let finished_before = metric_of(
        &format!("http://{admin}"),
        "shardgate_reassignments_finished_total",
        &[&format!("topic=\"{topic}\""), "kind=\"active\""],
    );
    let started = Instant::now();
    let (code, body) = api(
        admin,
        "POST",
        &format!("/api/v1/topics/{topic}/placement/moves"),
        Some(json!({"partition": 0, "to": [to]})),
    );
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["kind"], "active", "{body}");
    assert_eq!(body["throttle"]["rate"], 1048576, "{body}");
    // A second move while one runs: refused (one at a time).
    let (code, body) = api(
        admin,
        "POST",
        &format!("/api/v1/topics/{topic}/placement/moves"),
        Some(json!({"partition": 1, "to": [other]})),
    );
    assert_eq!(code, 409, "{body}");
    let rate = "leader.replication.throttled.rate=1048576".to_string();
    let t = topic.clone();
    tokio::task::spawn_blocking(move || {
        eventually("the throttle in place", Duration::from_secs(10), || {
            throttles("brokers", &from.to_string()).contains(&rate)
                && throttles("brokers", &to.to_string()).contains(&rate)
        });
        assert!(
            throttles("brokers", &other.to_string()).is_empty(),
            "broker {other} is not part of the move"
        );
        let topic_throttles = throttles("topics", &t);
        assert!(
            topic_throttles.contains(&format!("leader.replication.throttled.replicas=0:{from}"))
                && topic_throttles
                    .contains(&format!("follower.replication.throttled.replicas=0:{to}")),
            "{topic_throttles:?}"
        );
        assert!(reassigning(&t), "Kafka lists the reassignment");
    })
    .await
    .unwrap();
    // What an operator sees: `shardgate shards placement TOPIC`.
    let cli = run_ok(
        Command::new(
            std::env::var("SHARDGATE_BIN")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|_| repo().join("target/debug/shardgate")),
        )
        .args([
            "shards",
            "placement",
            &topic,
            "--admin",
            &format!("http://{admin}"),
        ]),
        Duration::from_secs(20),
    );
    let view: Value = serde_json::from_str(&cli).unwrap();
    assert_eq!(view["moving"][0]["partition"], 0, "{view}");
    assert_eq!(view["moving"][0]["to"], json!([to]), "{view}");
    assert_eq!(view["brokers"].as_array().map(Vec::len), Some(3), "{view}");
    let t = topic.clone();
    tokio::task::spawn_blocking(move || {
        until_nothing_moves(
            admin,
            &t,
            "the move done and cleaned up",
            Duration::from_secs(240),
        );
    })
    .await
    .unwrap();
    let took = started.elapsed();
    assert_nothing_left(&topic);
    eventually(
        "partition 0 led by the target",
        Duration::from_secs(30),
        || partition_layout(&topic)[&0] == (to, vec![to]),
    );
    let m = |name: &str, labels: &[&str]| metric_of(&format!("http://{admin}"), name, labels);
    let topic_label = format!("topic=\"{topic}\"");
    assert_eq!(
        m(
            "shardgate_reassignments_finished_total",
            &[&topic_label, "kind=\"active\""]
        ) - finished_before,
        1.0
    );
    let moved = m("shardgate_reassignment_bytes_total", &[&topic_label]);
    assert!(
        moved >= (mib * 1024 * 1024) as f64 * 0.9,
        "{moved} bytes moved"
    );
    // Unthrottled, 24 MiB cross loopback in well under a second; at 1 MiB/s (leader and
    // follower side) it takes several.
    let floor = Duration::from_secs_f64(mib as f64 / 3.0);
    assert!(
        took >= floor,
        "the move took {took:?}, below {floor:?}: the throttle did not hold"
    );
    eprintln!(
        "moved {mib} MiB in {:.1} s at a 1 MiB/s throttle",
        took.as_secs_f64()
    );
    stop.store(true, Ordering::SeqCst);
    producer.await.unwrap();
    let acked: HashSet<String> = acked.lock().unwrap().iter().cloned().collect();
    assert!(!acked.is_empty());
    let found = read_values_direct(&topic, 4, &acked);
    let missing: Vec<_> = acked.difference(&found).take(5).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not in Kafka: {missing:?}"
    );
}

/// A topic deleted while one of its partitions moves: shardgate cancels what is left,
/// removes the broker throttle rates and the move's record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the 3-broker testbed: integration/run-tests"]
async fn deleting_the_topic_during_a_move_leaves_no_reassignment_or_throttle() {
    assert_eq!(brokers(), 3, "this test needs the 3-broker testbed");
    let (client, admin) = ("127.0.0.1:29141", "127.0.0.1:29241");
    let _sg = instance(
        "placement-delete",
        client,
        admin,
        "throttle_bytes_per_sec = 524288",
    );
    let (topic, _, to) = filled_rf1(admin, "move-delete", 30).await;
    let cancelled = || {
        metric_of(
            &format!("http://{admin}"),
            "shardgate_reassignments_cancelled_total",
            &[&format!("topic=\"{topic}\""), "reason=\"topic_deleted\""],
        )
    };
    assert_eq!(cancelled(), 0.0);
    let (code, body) = api(
        admin,
        "POST",
        &format!("/api/v1/topics/{topic}/placement/moves"),
        Some(json!({"partition": 0, "to": [to]})),
    );
    assert_eq!(code, 202, "{body}");
    let t = topic.clone();
    tokio::task::spawn_blocking(move || {
        eventually("the move under way", Duration::from_secs(10), || {
            reassigning(&t) && !throttles("brokers", &to.to_string()).is_empty()
        });
        run_ok(
            Command::new(bin("kafka-topics")).args([
                "--bootstrap-server",
                &kafka(),
                "--delete",
                "--topic",
                &t,
            ]),
            Duration::from_secs(60),
        );
        until_nothing_moves(
            admin,
            &t,
            "the move cancelled and cleaned up",
            Duration::from_secs(60),
        );
    })
    .await
    .unwrap();
    assert!(!reassigning(&topic));
    for b in 1..=3 {
        assert!(
            throttles("brokers", &b.to_string()).is_empty(),
            "broker {b}: {:?}",
            throttles("brokers", &b.to_string())
        );
    }
    assert_eq!(cancelled(), 1.0);
}

/// Acknowledged values with their send time (ms since the epoch) and latency (µs).
type Timed = Arc<Mutex<Vec<(String, u64, u64)>>>;

/// Like `produce_keyed_sequences`, recording for each acknowledged value when it was sent
/// (ms since the epoch) and how long its acknowledgement took (µs).
async fn produce_timed(
    p: FutureProducer,
    topic: &str,
    prefix: &str,
    keys: usize,
    stop: &AtomicBool,
    acked: &Timed,
) {
    let mut seq = vec![0u64; keys];
    let mut i = 0usize;
    let mut pending = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        for _ in 0..5 {
            let k = i % keys;
            let key = format!("{prefix}{k}");
            let value = format!("{key}:{}", seq[k]);
            let sent = Instant::now();
            let at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            if let Ok(d) = p.send_result(FutureRecord::to(topic).key(&key).payload(&value)) {
                seq[k] += 1;
                i += 1;
                let acked = acked.clone();
                pending.push(tokio::spawn(async move {
                    if let Ok(Ok(_)) = d.await {
                        let us = sent.elapsed().as_micros() as u64;
                        acked.lock().unwrap().push((value, at, us));
                    }
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for h in pending {
        let _ = h.await;
    }
}

struct CountRebalances(Arc<AtomicUsize>);
impl rdkafka::client::ClientContext for CountRebalances {}
impl ConsumerContext for CountRebalances {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = r {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The scenario: replication factor 1, a pool of 12 all on broker 1 (forced with
/// Kafka's own reassignment tool), four hot shards. Splits wait for an idle partition to
/// move to an unloaded broker (nothing to copy) and land there; an active partition moves
/// under the throttle when that is not enough. At the end no broker carries more than half
/// the load (shardgate's samples and Kafka's offsets agree), nothing is left moving or
/// throttled, and producers (acks=all and acks=1) and a live group saw no loss and no key
/// going backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the 3-broker testbed: integration/run-tests"]
async fn an_rf1_pool_piled_on_broker_1_is_spread_while_clients_run() {
    assert_eq!(brokers(), 3, "this test needs the 3-broker testbed");
    let (client, admin) = ("127.0.0.1:29142", "127.0.0.1:29242");
    let _sg = instance(
        "placement-spread",
        client,
        admin,
        "imbalance_secs = 6\nthrottle_bytes_per_sec = 1048576\nsplit_wait_secs = 30",
    );
    let topic = unique("spread-rf1");
    managed_rf1(
        admin,
        &topic,
        12,
        4,
        json!({"split_records_per_sec": 150, "split_bytes_per_sec": 1e9, "split_lag_records": 0,
               "sustain_secs": 4, "sample_interval_ms": 1000, "split_cooldown_secs": 4,
               "max_shards": 8, "merge_fraction": 0.05, "cold_secs": 3600,
               "balance_interval_secs": 2}),
    );
    // Everything onto broker 1.
    let plan = std::env::temp_dir().join(format!("{topic}-reassign.json"));
    std::fs::write(
        &plan,
        json!({"version": 1, "partitions": (0..12).map(|p| json!({"topic": topic, "partition": p, "replicas": [1]})).collect::<Vec<_>>()}).to_string(),
    )
    .unwrap();
    run_ok(
        Command::new(bin("kafka-reassign-partitions")).args([
            "--bootstrap-server",
            &kafka(),
            "--reassignment-json-file",
            plan.to_str().unwrap(),
            "--execute",
        ]),
        Duration::from_secs(60),
    );
    let t = topic.clone();
    tokio::task::spawn_blocking(move || {
        eventually("all on broker 1", Duration::from_secs(90), || {
            !reassigning(&t)
                && partition_layout(&t)
                    .values()
                    .all(|(l, r)| *l == 1 && r == &vec![1])
        })
    })
    .await
    .unwrap();
    let m = |name: &str, labels: &[&str]| metric_of(&format!("http://{admin}"), name, labels);
    let topic_label = format!("topic=\"{topic}\"");
    // A live group through shardgate, recording values in arrival order.
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let assigned = Arc::new(AtomicUsize::new(0));
    let stop_consumer = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (seen, assigned, stop, topic) = (
            seen.clone(),
            assigned.clone(),
            stop_consumer.clone(),
            topic.clone(),
        );
        std::thread::spawn(move || {
            let c: BaseConsumer<CountRebalances> = ClientConfig::new()
                .set("bootstrap.servers", client)
                .set("group.id", unique("spread-group"))
                .set("auto.offset.reset", "earliest")
                .create_with_context(CountRebalances(assigned))
                .unwrap();
            c.subscribe(&[&topic]).unwrap();
            while !stop.load(Ordering::Relaxed) {
                if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                    seen.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(m.payload().unwrap()).into_owned());
                }
            }
        })
    };
    // Two producers through shardgate, ~500 records/s each: ~250 a shard, above the 150
    // split threshold.
    let stop = Arc::new(AtomicBool::new(false));
    let mut producers = Vec::new();
    let mut acks_of = Vec::new();
    for (prefix, acks) in [("a", "all"), ("b", "1")] {
        let p: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", client)
            .set("acks", acks)
            .set(
                "enable.idempotence",
                if acks == "all" { "true" } else { "false" },
            )
            .set("linger.ms", "5")
            .create()
            .unwrap();
        let acked = Arc::new(Mutex::new(Vec::new()));
        acks_of.push((prefix, acked.clone()));
        let (t, stop) = (topic.clone(), stop.clone());
        producers.push(tokio::spawn(async move {
            produce_timed(p, &t, prefix, 200, &stop, &acked).await
        }));
    }
    let started = Instant::now();
    // No broker above half the load by shardgate's samples, nothing moving.
    let t = topic.clone();
    let view = tokio::task::spawn_blocking(move || {
        let mut last = Value::Null;
        let deadline = Instant::now() + Duration::from_secs(300);
        while Instant::now() < deadline {
            let (_, v) = api(admin, "GET", &format!("/api/v1/topics/{t}/placement"), None);
            let rate: f64 = v["brokers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|b| b["records_per_sec"].as_f64())
                .sum();
            let spread = v["samples_complete"] == true
                && rate > 500.0
                && v["moving"].as_array().is_some_and(|m| m.is_empty())
                && v["brokers"].as_array().is_some_and(|bs| {
                    bs.len() == 3
                        && bs
                            .iter()
                            .all(|b| b["share"].as_f64().unwrap_or(1.0) <= 0.45)
                });
            last = v;
            if spread {
                return last;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        panic!("load not spread in 300 s: {last}");
    })
    .await
    .unwrap();
    let took = started.elapsed();
    eprintln!("spread after {:.1} s: {view}", took.as_secs_f64());
    // Kafka's own view: records per broker over 20 s, by the leaders Kafka reports.
    let t = topic.clone();
    let shares = tokio::task::spawn_blocking(move || {
        let before: Vec<i64> = (0..12).map(|p| watermarks_direct(&t, p).1).collect();
        std::thread::sleep(Duration::from_secs(20));
        let lay = partition_layout(&t);
        let mut per: BTreeMap<i32, i64> = BTreeMap::new();
        for p in 0..12 {
            *per.entry(lay[&p].0).or_default() += watermarks_direct(&t, p).1 - before[p as usize];
        }
        let total: i64 = per.values().sum();
        per.into_iter()
            .map(|(b, n)| (b, n as f64 / total.max(1) as f64))
            .collect::<BTreeMap<i32, f64>>()
    })
    .await
    .unwrap();
    eprintln!("records per broker over 20 s (Kafka's offsets): {shares:?}");
    assert!(shares.values().all(|s| *s <= 0.5), "{shares:?}");
    assert!(!reassigning(&topic));
    for b in 1..=3 {
        assert!(
            throttles("brokers", &b.to_string()).is_empty(),
            "broker {b}"
        );
    }
    assert!(throttles("topics", &topic).is_empty());
    let idle = m(
        "shardgate_reassignments_finished_total",
        &[&topic_label, "kind=\"idle\""],
    );
    let active = m(
        "shardgate_reassignments_finished_total",
        &[&topic_label, "kind=\"active\""],
    );
    let cancelled = m("shardgate_reassignments_cancelled_total", &[&topic_label]);
    eprintln!(
        "moves: {idle} idle, {active} active, {cancelled} cancelled; bytes {}",
        m("shardgate_reassignment_bytes_total", &[&topic_label])
    );
    assert!(idle >= 1.0, "splits landed on partitions moved idle");
    assert_eq!(cancelled, 0.0);
    // Stop writing; every acknowledged value arrives, each key in order.
    stop.store(true, Ordering::SeqCst);
    for p in producers {
        p.await.unwrap();
    }
    // Produce latency before, during and after the moves (by their start and end times).
    let (_, view) = api(
        admin,
        "GET",
        &format!("/api/v1/topics/{topic}/placement"),
        None,
    );
    let spans: Vec<(u64, u64)> = view["recent"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let start = r["started_at_ms"].as_u64()?;
            Some((start, start + (r["seconds"].as_f64()? * 1000.0) as u64))
        })
        .collect();
    let first = spans.iter().map(|s| s.0).min().unwrap_or(u64::MAX);
    let last = spans.iter().map(|s| s.1).max().unwrap_or(0);
    for (prefix, acked) in &acks_of {
        let all = acked.lock().unwrap().clone();
        let phase = |keep: &dyn Fn(u64) -> bool| {
            let mut l: Vec<u64> = all.iter().filter(|a| keep(a.1)).map(|a| a.2).collect();
            l.sort_unstable();
            let q = |f: f64| {
                l.get(((l.len() as f64 * f) as usize).min(l.len().saturating_sub(1)))
                    .copied()
                    .unwrap_or(0) as f64
                    / 1000.0
            };
            format!("n {} p50 {:.1} ms p99 {:.1} ms", l.len(), q(0.5), q(0.99))
        };
        eprintln!(
            "placement figures: producer {prefix} (acks {}): before the first move {}; during the moves {}; after {}",
            if *prefix == "a" { "all" } else { "1" },
            phase(&|t| t < first),
            phase(&|t| t >= first && t <= last),
            phase(&|t| t > last),
        );
    }
    eprintln!(
        "placement figures: balanced {:.1} s after load began; moves {idle} idle, {active} active; {} bytes moved; spans {spans:?}",
        took.as_secs_f64(),
        m("shardgate_reassignment_bytes_total", &[&topic_label])
    );
    let want: HashSet<String> = acks_of
        .iter()
        .flat_map(|(_, a)| {
            a.lock()
                .unwrap()
                .iter()
                .map(|x| x.0.clone())
                .collect::<Vec<_>>()
        })
        .collect();
    let s = seen.clone();
    let w = want.clone();
    tokio::task::spawn_blocking(move || {
        eventually(
            "every acknowledged record consumed",
            Duration::from_secs(120),
            || {
                let got: HashSet<String> = s.lock().unwrap().iter().cloned().collect();
                w.is_subset(&got)
            },
        )
    })
    .await
    .unwrap();
    stop_consumer.store(true, Ordering::SeqCst);
    consumer.join().unwrap();
    let order = seen.lock().unwrap().clone();
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut backwards = 0;
    for v in &order {
        let (key, seq) = v.rsplit_once(':').unwrap();
        let seq: u64 = seq.parse().unwrap();
        if let Some(prev) = last.insert(key.to_string(), seq)
            && seq < prev
        {
            backwards += 1;
            eprintln!("{key}: {seq} after {prev}");
        }
    }
    for (prefix, acked) in &acks_of {
        eprintln!(
            "producer {prefix}: {} acknowledged",
            acked.lock().unwrap().len()
        );
    }
    eprintln!("{} records consumed", order.len());
    assert_eq!(backwards, 0, "keys went backwards");
    assert_eq!(
        assigned.load(Ordering::SeqCst),
        1,
        "no rebalance after the first assignment"
    );
}

/// Two instances on Consul; the leader instance is killed (SIGKILL) while a throttled move
/// it started runs: the next leader finds the move in the shard map, adopts it and finishes
/// it (or cancels it past its timeout), leaving no reassignment, throttle or record behind,
/// and partition 0 keeps every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the 3-broker testbed with Consul: integration/run-tests"]
async fn a_new_leader_finishes_a_move_its_killed_predecessor_left() {
    leader_lost_mid_move(false, 29143).await;
}

/// The same with the leader frozen (SIGSTOP) past its session instead: the next leader
/// adopts the move; the old one, thawed, finds it lost leadership and leaves the move alone
/// (another instance owns it now), so it finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the 3-broker testbed with Consul: integration/run-tests"]
async fn a_leader_frozen_past_its_session_leaves_its_move_to_the_next_leader() {
    leader_lost_mid_move(true, 29145).await;
}

/// Two Consul instances on client ports `port`, `port + 1` (admin `port + 100`, ...); the
/// leader loses leadership while a move runs, killed or (`freeze`) frozen until the other
/// one adopted the move, then thawed.
async fn leader_lost_mid_move(freeze: bool, port: u16) {
    assert_eq!(brokers(), 3, "this test needs the 3-broker testbed");
    let consul = var("CONSUL_HTTP_ADDR", "http://127.0.0.1:28500");
    let cluster = unique("placement");
    let c = [
        format!("127.0.0.1:{port}"),
        format!("127.0.0.1:{}", port + 1),
    ];
    let a = [
        format!("127.0.0.1:{}", port + 100),
        format!("127.0.0.1:{}", port + 101),
    ];
    let clients: [&'static str; 2] = [c[0].clone().leak(), c[1].clone().leak()];
    let admins: [&'static str; 2] = [a[0].clone().leak(), a[1].clone().leak()];
    let bootstrap: Vec<String> = kafka().split(',').map(|b| format!("\"{b}\"")).collect();
    let mut instances: Vec<Option<Shardgate>> = (0..2)
        .map(|i| {
            let config = format!(
                "[listener]\nbind = \"{client}\"\nnode_id = {n}\n\n[[instances]]\nnode_id = 1\nadvertised = \"{c1}\"\n\n[[instances]]\nnode_id = 2\nadvertised = \"{c2}\"\n\n[upstream]\nbootstrap = [{boot}]\n\n[admin]\nbind = \"{admin}\"\n\n[store]\nkind = \"consul\"\nconsul_addr = \"{consul}\"\ncluster = \"{cluster}\"\n\n[placement]\nthrottle_bytes_per_sec = 524288\n",
                client = clients[i],
                n = i + 1,
                c1 = clients[0],
                c2 = clients[1],
                boot = bootstrap.join(", "),
                admin = admins[i],
            );
            Some(start_shardgate(
                &cache().join("run"),
                &format!("placement-consul-{port}-{}", i + 1),
                &config,
                &format!("http://{}", admins[i]),
            ))
        })
        .collect();
    let leads = move |i: usize| {
        metric_of(
            &format!("http://{}", admins[i]),
            "shardgate_controller_leader",
            &[],
        ) == 1.0
    };
    tokio::task::spawn_blocking(move || {
        eventually("a leader instance", Duration::from_secs(60), || {
            leads(0) || leads(1)
        })
    })
    .await
    .unwrap();
    let leader = if leads(0) { 0 } else { 1 };
    let survivor = 1 - leader;
    let mib = 30;
    let (topic, _, to) = filled_rf1(admins[survivor], "move-adopt", mib).await;
    let (_, records) = watermarks_direct(&topic, 0);
    // Asked of the survivor: forwarded to the leader, which starts it.
    let (code, body) = api(
        admins[survivor],
        "POST",
        &format!("/api/v1/topics/{topic}/placement/moves"),
        Some(json!({"partition": 0, "to": [to]})),
    );
    assert_eq!(code, 202, "{body}");
    let t = topic.clone();
    tokio::task::spawn_blocking(move || {
        eventually("the move under way", Duration::from_secs(15), || {
            reassigning(&t) && !throttles("brokers", &to.to_string()).is_empty()
        })
    })
    .await
    .unwrap();
    let adopted = move || {
        metric_of(
            &format!("http://{}", admins[survivor]),
            "shardgate_reassignments_adopted_total",
            &[],
        )
    };
    let frozen = freeze.then(|| Frozen::stop(instances[leader].as_ref().unwrap().pid()));
    if !freeze {
        instances[leader].take(); // SIGKILL
    }
    let killed = Instant::now();
    let t = topic.clone();
    let adm = admins[survivor];
    tokio::task::spawn_blocking(move || {
        eventually("the survivor leads", Duration::from_secs(60), || {
            leads(survivor)
        });
        eprintln!(
            "survivor leads {:.1} s after the fault",
            killed.elapsed().as_secs_f64()
        );
        eventually(
            "the survivor adopts the move",
            Duration::from_secs(10),
            || adopted() == 1.0,
        );
        // Thawed now: it finds it lost leadership and must not cancel the adopted move.
        drop(frozen);
        until_nothing_moves(
            adm,
            &t,
            "the move ended and cleaned up",
            Duration::from_secs(240),
        );
    })
    .await
    .unwrap();
    assert_nothing_left(&topic);
    let m = |name: &str| {
        metric_of(
            &format!("http://{}", admins[survivor]),
            name,
            &[&format!("topic=\"{topic}\"")],
        )
    };
    let (finished, cancelled) = (
        m("shardgate_reassignments_finished_total"),
        m("shardgate_reassignments_cancelled_total"),
    );
    eprintln!(
        "after the fault: {finished} finished, {cancelled} cancelled by the survivor, {:.1} s",
        killed.elapsed().as_secs_f64()
    );
    assert_eq!(finished + cancelled, 1.0);
    if freeze {
        // The thawed instance cancelled nothing: the move finished where it was going.
        let lost = metric_of(
            &format!("http://{}", admins[leader]),
            "shardgate_reassignments_cancelled_total",
            &["reason=\"lost_leadership\""],
        );
        assert_eq!(lost, 0.0, "the old leader cancelled an adopted move");
        assert_eq!(finished, 1.0);
        assert_eq!(partition_layout(&topic)[&0].1, vec![to]);
    }
    let replicas = partition_layout(&topic)[&0].1.clone();
    assert_eq!(replicas.len(), 1, "{replicas:?}");
    assert_eq!(
        watermarks_direct(&topic, 0).1,
        records,
        "partition 0 kept its records"
    );
}
