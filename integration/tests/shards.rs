//! Elastic shards end to end: a managed topic created through the admin API, produced to
//! continuously by three real clients (librdkafka through the rdkafka crate, the Java console
//! producer with its default idempotence, kafka-python), while shards split and merge — forced
//! through the admin API and decided by the autoscaler under a load step — and consumed by
//! groups of different clients. Asserts that no acknowledged record is lost, that within each
//! group a key's sequence never goes backwards (re-deliveries are counted separately), and that
//! no split or merge causes a consumer rebalance.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

/// Per key, the sequence numbers in the order a group received them.
#[derive(Default)]
struct Order {
    seen: HashMap<String, (i64, BTreeSet<i64>)>,
    violations: Vec<String>,
    redeliveries: usize,
}

impl Order {
    fn record(&mut self, value: &str) {
        let Some((key, seq)) = value.rsplit_once(':') else {
            self.violations.push(format!("malformed value {value}"));
            return;
        };
        let seq: i64 = seq.parse().unwrap();
        let (max, all) = self
            .seen
            .entry(key.to_string())
            .or_insert((-1, BTreeSet::new()));
        if !all.insert(seq) {
            self.redeliveries += 1;
        } else if seq < *max {
            self.violations.push(format!("{key}: {seq} after {max}"));
        }
        *max = (*max).max(seq);
    }

    fn values(&self) -> BTreeSet<String> {
        self.seen
            .iter()
            .flat_map(|(k, (_, s))| s.iter().map(move |q| format!("{k}:{q}")))
            .collect()
    }
}

struct CountRebalances(Arc<AtomicUsize>);
impl rdkafka::client::ClientContext for CountRebalances {}
impl ConsumerContext for CountRebalances {
    fn post_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = r {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the testbed: integration/run-tests"]
async fn per_key_order_holds_across_splits_and_merges_with_three_producers_and_two_groups() {
    let topic = unique("orders");
    let (code, created) = admin_post(
        "/api/v1/topics",
        &json!({
            "name": topic, "route_by": ["key"], "initial_shards": 2, "pool": 24,
            "replication_factor": rf(),
            "autoscale": {
                "split_records_per_sec": 300.0, "sustain_secs": 3, "sample_interval_ms": 1000,
                "split_cooldown_secs": 3, "merge_cooldown_secs": 4, "cold_secs": 4,
                "merge_fraction": 0.25, "max_shards": 12, "gate_retention_secs": 600
            }
        }),
    );
    assert_eq!(code, 201, "{created}");

    // Group A: rdkafka, in this process, counting rebalances.
    let stop = Arc::new(AtomicBool::new(false));
    let rebalances = Arc::new(AtomicUsize::new(0));
    let order_a = Arc::new(Mutex::new(Order::default()));
    let consumer_a = {
        let (topic, stop, rebalances, order) = (
            topic.clone(),
            stop.clone(),
            rebalances.clone(),
            order_a.clone(),
        );
        std::thread::spawn(move || {
            let c: BaseConsumer<CountRebalances> = ClientConfig::new()
                .set("bootstrap.servers", proxy())
                .set("group.id", format!("{topic}-a"))
                .set("client.id", format!("{topic}-a"))
                .set("auto.offset.reset", "earliest")
                .set("enable.auto.commit", "true")
                .set("auto.commit.interval.ms", "500")
                .create_with_context(CountRebalances(rebalances))
                .unwrap();
            c.subscribe(&[&topic]).unwrap();
            let mut idle_since = Instant::now();
            loop {
                match c.poll(Duration::from_millis(200)) {
                    Some(Ok(m)) => {
                        idle_since = Instant::now();
                        // Offsets are stored when poll returns a record and committed every
                        // 500 ms (auto-commit), as a typical application does.
                        order
                            .lock()
                            .unwrap()
                            .record(&String::from_utf8_lossy(m.payload().unwrap()));
                    }
                    Some(Err(e)) => panic!("consumer A error: {e}"),
                    None => {
                        if stop.load(Ordering::SeqCst)
                            && idle_since.elapsed() > Duration::from_secs(8)
                        {
                            break;
                        }
                    }
                }
            }
            let _ = c.commit_consumer_state(CommitMode::Sync);
        })
    };
    // Group B: kafka-python, stops after 15 s without records once producers are done.
    let consumer_b = Command::new(python())
        .arg(repo().join("integration/clients/py/kclient.py"))
        .args([
            "--lib",
            "kafka-python",
            "consume",
            "--brokers",
            &proxy(),
            "--topic",
            &topic,
            "--group",
            &format!("{topic}-b"),
            "--count",
            "100000000",
            "--timeout",
            "300",
            "--idle",
            "15",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Producers: rdkafka (keys r-0..r-399, with a load step), Java (j-0..j-299), kafka-python
    // (p-0..p-299). Each key has one producer, so its sequence is that producer's order.
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let rd = {
        let (topic, acked) = (topic.clone(), acked.clone());
        tokio::spawn(async move {
            let p: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", proxy())
                .set("acks", "all")
                .set("enable.idempotence", "true")
                .set("linger.ms", "5")
                .create()
                .unwrap();
            let started = Instant::now();
            let mut seq = vec![0i64; 400];
            let mut i = 0usize;
            let mut pending = Vec::new();
            // Paced in 10 ms ticks (tokio timers have millisecond resolution): 200 records/s,
            // a load step to 1500 records/s from 6 s to 24 s, then 200/s again.
            let mut due = 0.0f64;
            let mut last = Instant::now();
            while started.elapsed() < Duration::from_secs(40) {
                let t = started.elapsed().as_secs_f64();
                let rate = if (6.0..24.0).contains(&t) {
                    1500.0
                } else {
                    200.0
                };
                due += rate * last.elapsed().as_secs_f64();
                last = Instant::now();
                while due >= 1.0 {
                    due -= 1.0;
                    let k = i % 400;
                    let value = format!("r-{k}:{}", seq[k]);
                    seq[k] += 1;
                    i += 1;
                    // Enqueue now, in sequence order (spawned sends could be polled out of
                    // order and fake a violation); only the wait for the ack is spawned.
                    let key = format!("r-{k}");
                    let delivery = loop {
                        match p.send_result(FutureRecord::to(&topic).key(&key).payload(&value)) {
                            Ok(d) => break d,
                            Err((e, _)) => {
                                assert!(
                                    matches!(
                                        e,
                                        rdkafka::error::KafkaError::MessageProduction(
                                            rdkafka::types::RDKafkaErrorCode::QueueFull
                                        )
                                    ),
                                    "{e}"
                                );
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        }
                    };
                    let a2 = acked.clone();
                    pending.push(tokio::spawn(async move {
                        if let Ok(Ok(_)) = delivery.await {
                            a2.lock().unwrap().insert(value);
                        }
                    }));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            for h in pending {
                let _ = h.await;
            }
        })
    };
    let java = {
        let topic = topic.clone();
        std::thread::spawn(move || {
            // ~150 records/s for ~40 s through a paced generator on stdin.
            let generator = "import sys,time\nfor i in range(6000):\n    k=f'j-{i%300}'\n    print(f'{k}|{k}:{i//300}', flush=True)\n    time.sleep(1/150)\n";
            let out = run(
                Command::new("sh").arg("-c").arg(format!(
                    "python3 -c \"$GEN\" | {} --bootstrap-server {} --topic {topic} --property parse.key=true --property 'key.separator=|' --producer-property acks=all",
                    bin("kafka-console-producer").display(),
                    proxy()
                )).env("GEN", generator),
                Duration::from_secs(180),
            );
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
    };
    let py_prod = {
        let topic = topic.clone();
        std::thread::spawn(move || {
            let out = run_ok(
                Command::new(python())
                    .arg(repo().join("integration/clients/py/kclient.py"))
                    .args([
                        "--lib",
                        "kafka-python",
                        "produce",
                        "--brokers",
                        &proxy(),
                        "--topic",
                        &topic,
                        "--count",
                        "6000",
                        "--keys",
                        "300",
                        "--key-prefix",
                        "p-",
                        "--rate",
                        "150",
                    ]),
                Duration::from_secs(180),
            );
            serde_json::from_str::<Value>(out.trim()).unwrap()
        })
    };

    // Forced changes through the API while everything runs: 4 splits and 3 merges.
    let mut forced = 0;
    let mut api_errors = Vec::new();
    for (step, split) in [true, true, false, true, false, true, false]
        .into_iter()
        .enumerate()
    {
        tokio::time::sleep(Duration::from_secs(if step == 0 { 3 } else { 4 })).await;
        let (_, map) = admin_get(&format!("/api/v1/topics/{topic}/shards"));
        let shards = active(&map);
        let (code, body) = if split || shards.len() < 2 {
            let id = shards[0]["id"].as_u64().unwrap();
            admin_post(
                &format!("/api/v1/topics/{topic}/shards/{id}/split"),
                &json!({}),
            )
        } else {
            let (a, b) = (
                shards[0]["id"].as_u64().unwrap(),
                shards[1]["id"].as_u64().unwrap(),
            );
            admin_post(
                &format!("/api/v1/topics/{topic}/merge"),
                &json!({"shards": [a, b]}),
            )
        };
        if code == 200 {
            forced += 1;
        } else {
            api_errors.push(format!("step {step}: {code} {body}"));
        }
    }
    rd.await.unwrap();
    let (java_ok, java_err) = java.join().unwrap();
    let py_out = py_prod.join().unwrap();
    // After the load step the autoscaler merges cold neighbours: give it its cold window.
    tokio::time::sleep(Duration::from_secs(12)).await;
    stop.store(true, Ordering::SeqCst);
    consumer_a.join().unwrap();
    let out_b = consumer_b.wait_with_output().unwrap();

    // What was acknowledged.
    assert!(java_ok, "java console producer failed: {java_err}");
    for bad in ["ERROR", "OutOfOrderSequence", "DuplicateSequence"] {
        assert!(
            !java_err.contains(bad),
            "java producer logged {bad}: {java_err}"
        );
    }
    assert_eq!(py_out["acked"], 6000, "kafka-python: {py_out}");
    let mut want = acked.lock().unwrap().clone();
    want.extend((0..6000).map(|i| format!("j-{}:{}", i % 300, i / 300)));
    want.extend((0..6000).map(|i| format!("p-{}:{}", i % 300, i / 300)));

    // Group A (rdkafka).
    let a = order_a.lock().unwrap();
    assert!(
        a.violations.is_empty(),
        "group A order violations: {:?}",
        &a.violations[..a.violations.len().min(10)]
    );
    let missing: Vec<_> = want.difference(&a.values()).take(10).cloned().collect();
    assert!(
        missing.is_empty(),
        "group A lost {} records, e.g. {missing:?} (rebalances {})",
        want.difference(&a.values()).count(),
        rebalances.load(Ordering::SeqCst)
    );
    assert_eq!(
        rebalances.load(Ordering::SeqCst),
        1,
        "a split or merge caused a rebalance of group A"
    );
    eprintln!(
        "group A: {} records, {} re-deliveries",
        a.values().len(),
        a.redeliveries
    );

    // Group B (kafka-python).
    let b_json: Value = serde_json::from_slice(&out_b.stdout).unwrap_or_else(|e| {
        panic!(
            "group B output ({e}): {}",
            String::from_utf8_lossy(&out_b.stderr)
        )
    });
    let mut b = Order::default();
    for r in b_json["records"].as_array().unwrap() {
        b.record(r[1].as_str().unwrap());
    }
    assert!(
        b.violations.is_empty(),
        "group B order violations: {:?}",
        &b.violations[..b.violations.len().min(10)]
    );
    let missing: Vec<_> = want.difference(&b.values()).take(10).cloned().collect();
    assert!(
        missing.is_empty(),
        "group B lost {} records, e.g. {missing:?}",
        want.difference(&b.values()).count()
    );
    eprintln!(
        "group B: {} records, {} re-deliveries",
        b.values().len(),
        b.redeliveries
    );
    // What the scaling did (checked last: order and loss are the point).
    let (_, map) = admin_get(&format!("/api/v1/topics/{topic}/shards"));
    let splits = metric(
        "shardgate_shard_splits_total",
        &[&format!("topic=\"{topic}\"")],
    );
    let merges = metric(
        "shardgate_shard_merges_total",
        &[&format!("topic=\"{topic}\"")],
    );
    let auto_splits = metric(
        "shardgate_shard_splits_total",
        &[&format!("topic=\"{topic}\""), "reason=\"records_rate\""],
    ) + metric(
        "shardgate_shard_splits_total",
        &[&format!("topic=\"{topic}\""), "reason=\"hot_key\""],
    );
    eprintln!(
        "splits {splits} (autoscaler {auto_splits}), merges {merges}, forced ok {forced}, api errors {api_errors:?}, epoch {}, active {}",
        map["epoch"],
        active(&map).len()
    );
    assert!(splits >= 5.0, "only {splits} splits");
    assert!(merges >= 3.0, "only {merges} merges");
    assert!(auto_splits >= 1.0, "the autoscaler never split");
}

/// Partition of the latest record of every key, read directly from Kafka.
fn key_partitions(topic: &str) -> HashMap<String, i32> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", unique("keys"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    let mut out = HashMap::new();
    let mut idle = Instant::now();
    while idle.elapsed() < Duration::from_secs(5) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            idle = Instant::now();
            out.insert(
                String::from_utf8_lossy(m.key().unwrap()).into_owned(),
                m.partition(),
            );
        }
    }
    out
}

async fn produce_keys(topic: &str, keys: usize, round: usize) {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", proxy())
        .set("acks", "all")
        .create()
        .unwrap();
    let sends = (0..keys).map(|k| {
        let p = p.clone();
        let key = format!("key-{k}");
        let value = format!("{key}:{round}");
        async move {
            p.send(
                FutureRecord::to(topic).key(&key).payload(&value),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        }
    });
    futures::future::join_all(sends).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the testbed: integration/run-tests"]
async fn restarted_instance_reloads_its_maps_and_routes_every_key_where_it_was() {
    let topic = unique("restart");
    let (code, body) = admin_post(
        "/api/v1/topics",
        &json!({"name": topic, "initial_shards": 3, "pool": 8, "replication_factor": rf(), "autoscale": {"enabled": false}}),
    );
    assert_eq!(code, 201, "{body}");
    let (code, body) = admin_post(
        &format!("/api/v1/topics/{topic}/shards/1/split"),
        &json!({}),
    );
    assert_eq!(code, 200, "{body}");
    produce_keys(&topic, 300, 0).await;
    let before = key_partitions(&topic);
    assert_eq!(before.len(), 300);
    let (_, map_before) = admin_get(&format!("/api/v1/topics/{topic}/shards"));

    run_ok(
        Command::new(repo().join("integration/testbed")).arg("restart-proxy"),
        Duration::from_secs(60),
    );
    eventually("restarted shardgate ready", Duration::from_secs(30), || {
        http_get("/readyz").0 == 200
    });
    let (_, map_after) = admin_get(&format!("/api/v1/topics/{topic}/shards"));
    assert_eq!(map_after, map_before, "the map was not reloaded as stored");

    produce_keys(&topic, 300, 1).await;
    let after = key_partitions(&topic);
    let moved: Vec<_> = before
        .iter()
        .filter(|(k, p)| after.get(*k) != Some(p))
        .take(5)
        .collect();
    assert!(
        moved.is_empty(),
        "keys changed partition across a restart: {moved:?}"
    );
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn bad_admin_input_gets_a_clear_error_and_changes_nothing() {
    let topic = unique("badadmin");
    let (code, _) = admin_post(
        "/api/v1/topics",
        &json!({"name": topic, "initial_shards": 3, "pool": 6, "replication_factor": rf(), "autoscale": {"enabled": false}}),
    );
    assert_eq!(code, 201);
    let (_, before) = admin_get(&format!("/api/v1/topics/{topic}/shards"));
    let first = &active(&before)[0];
    let cases: Vec<(String, String, u16, &str)> = vec![
        (
            "/api/v1/topics/no-such-topic/shards/0/split".into(),
            "{}".into(),
            404,
            "not managed",
        ),
        (
            format!("/api/v1/topics/{topic}/merge"),
            r#"{"shards": [0, 2]}"#.into(),
            400,
            "not adjacent",
        ),
        (
            format!("/api/v1/topics/{topic}/shards/0/split"),
            json!({"at": first["start"]}).to_string(),
            400,
            "not strictly inside",
        ),
        (
            format!("/api/v1/topics/{topic}/shards/0/split"),
            json!({"at": first["end"]}).to_string(),
            400,
            "not strictly inside",
        ),
        (
            format!("/api/v1/topics/{topic}/shards/0/split"),
            r#"{"at": "abc"}"#.into(),
            400,
            "decimal",
        ),
        (
            format!("/api/v1/topics/{topic}/shards/99/split"),
            "{}".into(),
            400,
            "does not exist",
        ),
        (
            format!("/api/v1/topics/{topic}/merge"),
            "{not json".into(),
            400,
            "bad merge body",
        ),
        (
            "/api/v1/topics".into(),
            r#"{"name": "x y"}"#.into(),
            400,
            "not a valid Kafka topic name",
        ),
        (
            "/api/v1/topics".into(),
            json!({"name": topic}).to_string(),
            409,
            "already managed",
        ),
        (
            "/api/v1/topics".into(),
            r#"{"name": "ok", "route_by": ["value"]}"#.into(),
            400,
            "unknown routing field",
        ),
    ];
    for (path, body, want, says) in cases {
        let (code, text) =
            shardgate::admin::http_request(&admin(), "POST", &path, Some(&body)).unwrap();
        assert_eq!(code, want, "{path} {body}: {text}");
        assert!(
            text.contains(says),
            "{path} {body}: {text} should say {says:?}"
        );
    }
    let (_, after) = admin_get(&format!("/api/v1/topics/{topic}/shards"));
    assert_eq!(after, before, "a refused request changed the map");
}

/// The autoscaler's other two triggers: stored bytes/s (a few large records, far below the
/// records threshold) and a consumer group whose lag keeps growing (a slow consumer at a rate
/// below both rate thresholds). Each topic must split for its own reason.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the testbed: integration/run-tests"]
async fn autoscaler_splits_on_bytes_rate_and_on_growing_consumer_lag() {
    let bytes_topic = unique("auto-bytes");
    let lag_topic = unique("auto-lag");
    for (topic, bytes, lag) in [(&bytes_topic, 200_000.0, 0), (&lag_topic, 1e12, 300)] {
        let (code, body) = admin_post(
            "/api/v1/topics",
            &json!({
                "name": topic, "route_by": ["key"], "initial_shards": 1, "pool": 4,
                "replication_factor": rf(),
                "autoscale": {
                    "split_records_per_sec": 1e9, "split_bytes_per_sec": bytes,
                    "split_lag_records": lag, "sustain_secs": 3, "sample_interval_ms": 1000,
                    "split_cooldown_secs": 3, "cold_secs": 600, "max_shards": 2
                }
            }),
        );
        assert_eq!(code, 201, "{body}");
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", proxy())
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // ~1 MB/s in 20 KB records (50 records/s) and 200 small records/s.
    let load = {
        let (producer, stop, bytes_topic, lag_topic) = (
            producer.clone(),
            stop.clone(),
            bytes_topic.clone(),
            lag_topic.clone(),
        );
        tokio::spawn(async move {
            let big = "x".repeat(20_000);
            let small = "v".to_string();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("k-{}", i % 500);
                let mut sends = Vec::new();
                if i.is_multiple_of(4) {
                    sends.push(producer.send(
                        FutureRecord::to(&bytes_topic).key(&key).payload(&big),
                        Duration::from_secs(30),
                    ));
                }
                sends.push(producer.send(
                    FutureRecord::to(&lag_topic).key(&key).payload(&small),
                    Duration::from_secs(30),
                ));
                for r in futures::future::join_all(sends).await {
                    r.map_err(|(e, _)| e).unwrap();
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // A live group that consumes ~20 records/s and commits what it read.
    let slow = {
        let (stop, lag_topic) = (stop.clone(), lag_topic.clone());
        std::thread::spawn(move || {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", proxy())
                .set("group.id", unique("g-slow"))
                .set("auto.offset.reset", "earliest")
                .set("auto.commit.interval.ms", "500")
                .create()
                .unwrap();
            c.subscribe(&[&lag_topic]).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let _ = c.poll(Duration::from_millis(50));
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let split_for = |topic: &str, reason: &str| {
        metric(
            "shardgate_shard_splits_total",
            &[
                &format!("topic=\"{topic}\""),
                &format!("reason=\"{reason}\""),
            ],
        )
    };
    let started = Instant::now();
    let outcome = tokio::task::spawn_blocking({
        let (bytes_topic, lag_topic) = (bytes_topic.clone(), lag_topic.clone());
        move || {
            let limit = Duration::from_secs(90);
            while started.elapsed() < limit {
                if split_for(&bytes_topic, "bytes_rate") >= 1.0
                    && split_for(&lag_topic, "consumer_lag") >= 1.0
                {
                    return Ok(started.elapsed());
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(format!(
                "bytes split: {}, lag split: {}; bytes/s gauge {}, lag gauge {}",
                split_for(&bytes_topic, "bytes_rate"),
                split_for(&lag_topic, "consumer_lag"),
                metric(
                    "shardgate_shard_bytes_per_second",
                    &[&format!("topic=\"{bytes_topic}\"")]
                ),
                metric(
                    "shardgate_shard_consumer_lag",
                    &[&format!("topic=\"{lag_topic}\"")]
                ),
            ))
        }
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    slow.join().unwrap();
    let took = outcome.unwrap_or_else(|e| panic!("autoscaler did not split as expected: {e}"));
    // Neither topic split for a reason it was not loaded with.
    assert_eq!(split_for(&bytes_topic, "records_rate"), 0.0);
    assert_eq!(split_for(&lag_topic, "records_rate"), 0.0);
    assert_eq!(split_for(&lag_topic, "bytes_rate"), 0.0);
    for topic in [&bytes_topic, &lag_topic] {
        let (_, map) = admin_get(&format!("/api/v1/topics/{topic}/shards"));
        assert_eq!(active(&map).len(), 2, "{topic}: {map}");
    }
    eprintln!("both splits within {:.1} s", took.as_secs_f64());
}

/// A split with every pool partition in use adds partitions (up to `max_pool`) instead of
/// failing, and a consumer subscribed before the growth is nudged to see the new partition
/// long before its 5-minute metadata refresh.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the testbed: integration/run-tests"]
async fn an_exhausted_pool_grows_and_consumers_follow() {
    let topic = unique("grow");
    let (code, body) = admin_post(
        "/api/v1/topics",
        &json!({"name": topic, "initial_shards": 1, "pool": 2, "max_pool": 4,
                "replication_factor": rf(), "autoscale": {"enabled": false}}),
    );
    assert_eq!(code, 201, "{body}");
    let consumer = BackgroundConsumer::start(&topic, "g-grow", &[]);
    produce_keys(&topic, 200, 0).await;
    consumer.wait_for(200).await;
    // Split twice: the second split finds both pool partitions active.
    for _ in 0..2 {
        let (_, map) = admin_get(&format!("/api/v1/topics/{topic}/shards"));
        let widest = active(&map)
            .into_iter()
            .max_by_key(|s| {
                s["end"].as_str().unwrap().parse::<u128>().unwrap()
                    - s["start"].as_str().unwrap().parse::<u128>().unwrap()
            })
            .unwrap();
        let (code, body) = admin_post(
            &format!("/api/v1/topics/{topic}/shards/{}/split", widest["id"]),
            &json!({}),
        );
        assert_eq!(code, 200, "{body}");
    }
    let (_, map) = admin_get(&format!("/api/v1/topics/{topic}/shards"));
    assert_eq!(map["pool"], 3, "{map}");
    assert_eq!(active(&map).len(), 3, "{map}");
    assert!(
        active(&map).iter().any(|s| s["partition"] == 2),
        "no shard on the added partition: {map}"
    );
    assert_eq!(
        metric(
            "shardgate_pool_grown_total",
            &[&format!("topic=\"{topic}\"")]
        ),
        1.0
    );
    produce_keys(&topic, 200, 1).await;
    let started = Instant::now();
    consumer.wait_for(400).await;
    eprintln!(
        "all records of the grown pool consumed {:.1} s after producing",
        started.elapsed().as_secs_f64()
    );
    consumer.stop();
    assert!(
        metric(
            "shardgate_pool_nudges_total",
            &[&format!("topic=\"{topic}\"")]
        ) >= 1.0
    );
    // Round 1 wrote to the added partition (read from Kafka directly).
    let direct: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let (_, high) = direct
        .fetch_watermarks(&topic, 2, Duration::from_secs(10))
        .unwrap();
    assert!(high > 0, "nothing on the added partition 2");
}

/// A group that never commits is not held at a gate forever: after `gate_fallback_secs` its
/// fetch positions count, and each key's records still arrive in order.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the testbed: integration/run-tests"]
async fn a_group_that_never_commits_passes_gates_after_the_fallback() {
    let topic = unique("nocommit");
    let (code, body) = admin_post(
        "/api/v1/topics",
        &json!({"name": topic, "initial_shards": 1, "pool": 4, "replication_factor": rf(),
                "autoscale": {"enabled": false, "gate_fallback_secs": 3}}),
    );
    assert_eq!(code, 201, "{body}");
    let consumer =
        BackgroundConsumer::start(&topic, "g-nocommit", &[("enable.auto.commit", "false")]);
    produce_keys(&topic, 200, 0).await;
    consumer.wait_for(200).await;
    let (code, body) = admin_post(
        &format!("/api/v1/topics/{topic}/shards/0/split"),
        &json!({}),
    );
    assert_eq!(code, 200, "{body}");
    produce_keys(&topic, 200, 1).await;
    let started = Instant::now();
    consumer.wait_for(400).await;
    let order = consumer.stop();
    eprintln!(
        "round 1 consumed {:.1} s after producing",
        started.elapsed().as_secs_f64()
    );
    // Per key: round 0 before round 1, each once.
    let mut last: HashMap<String, usize> = HashMap::new();
    for v in &order {
        let (key, round) = v.split_once(':').unwrap();
        let round: usize = round.parse().unwrap();
        let prev = last.insert(key.to_string(), round);
        assert_eq!(
            prev.map_or(0, |p| p + 1),
            round,
            "{key}: round {round} after {prev:?}"
        );
    }
    assert!(
        metric(
            "shardgate_gate_fallback_opens_total",
            &[&format!("topic=\"{topic}\"")]
        ) >= 1.0
    );
}

/// Active shards piled onto one broker (forced here with Kafka's own reassignment and
/// election tools) are spread again by the leader: replica order changed and a preferred
/// election per move.
#[test]
#[ignore = "needs the 3-broker testbed: integration/run-tests"]
fn active_shards_piled_on_one_broker_are_spread_by_leader_moves() {
    assert_eq!(brokers(), 3, "this test needs the 3-broker testbed");
    let topic = unique("spread");
    let (code, body) = admin_post(
        "/api/v1/topics",
        &json!({"name": topic, "initial_shards": 3, "pool": 6, "replication_factor": 3,
                "autoscale": {"split_records_per_sec": 1e9, "balance_interval_secs": 2}}),
    );
    assert_eq!(code, 201, "{body}");
    let leaders = || partition_leaders(&topic, 3);
    let moves_before = metric(
        "shardgate_leader_moves_total",
        &[&format!("topic=\"{topic}\"")],
    );
    // Broker 1 first in the replicas of partitions 0-2 (the active shards), then elect.
    let dir = std::env::temp_dir();
    let plan = dir.join(format!("{topic}-reassign.json"));
    let elect = dir.join(format!("{topic}-elect.json"));
    std::fs::write(
        &plan,
        json!({"version": 1, "partitions": (0..3).map(|p| json!({"topic": topic, "partition": p, "replicas": [1, 2, 3]})).collect::<Vec<_>>()}).to_string(),
    )
    .unwrap();
    std::fs::write(
        &elect,
        json!({"partitions": (0..3).map(|p| json!({"topic": topic, "partition": p})).collect::<Vec<_>>()}).to_string(),
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
    run_ok(
        Command::new(bin("kafka-leader-election")).args([
            "--bootstrap-server",
            &kafka(),
            "--election-type",
            "PREFERRED",
            "--path-to-json-file",
            elect.to_str().unwrap(),
        ]),
        Duration::from_secs(60),
    );
    eprintln!(
        "leaders of the active partitions after forcing: {:?}",
        leaders()
    );
    let started = Instant::now();
    eventually(
        "active shards on three brokers",
        Duration::from_secs(60),
        || {
            let mut l = leaders();
            l.sort();
            l.dedup();
            l.len() == 3
        },
    );
    let moves = metric(
        "shardgate_leader_moves_total",
        &[&format!("topic=\"{topic}\"")],
    ) - moves_before;
    assert!(moves >= 2.0, "{moves} leader moves");
    eprintln!(
        "spread again after {:.1} s with {moves} moves: {:?}",
        started.elapsed().as_secs_f64(),
        leaders()
    );
}

/// A group consumer on its own thread collecting payloads in arrival order.
struct BackgroundConsumer {
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl BackgroundConsumer {
    fn start(topic: &str, group_prefix: &str, extra: &[(&str, &str)]) -> Self {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", proxy())
            .set("group.id", unique(group_prefix))
            .set("auto.offset.reset", "earliest");
        for (k, v) in extra {
            cfg.set(*k, *v);
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop, topic) = (seen.clone(), stop.clone(), topic.to_string());
            std::thread::spawn(move || {
                let c: BaseConsumer = cfg.create().unwrap();
                c.subscribe(&[&topic]).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                        seen.lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(m.payload().unwrap()).into_owned());
                    }
                }
            })
        };
        Self { seen, stop, thread }
    }

    /// Waits (up to 60 s) until `n` distinct payloads arrived.
    async fn wait_for(&self, n: usize) {
        let seen = self.seen.clone();
        tokio::task::spawn_blocking(move || {
            eventually(
                &format!("{n} records consumed"),
                Duration::from_secs(60),
                || seen.lock().unwrap().iter().collect::<BTreeSet<_>>().len() >= n,
            )
        })
        .await
        .unwrap();
    }

    fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        self.seen.lock().unwrap().clone()
    }
}

/// Managed produce decodes and re-encodes every batch: with every codec, keys, values,
/// CreateTime timestamps and headers (duplicates and null values, in order) come out exactly
/// as produced, and the upstream batches keep the producer's codec (Kafka's log dump).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the testbed: integration/run-tests"]
async fn managed_topics_keep_codec_keys_timestamps_and_headers() {
    use rdkafka::message::{Header, Headers, OwnedHeaders};
    let topic = unique("codecs");
    let (code, body) = admin_post(
        "/api/v1/topics",
        &json!({"name": topic, "initial_shards": 3, "pool": 4, "replication_factor": rf(),
                "autoscale": {"enabled": false}}),
    );
    assert_eq!(code, 201, "{body}");
    let codecs = ["none", "gzip", "snappy", "lz4", "zstd"];
    let per_codec = 200;
    for codec in codecs {
        let p: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", proxy())
            .set("compression.type", codec)
            .set("linger.ms", "20")
            .create()
            .unwrap();
        let sends = (0..per_codec).map(|i| {
            let p = p.clone();
            let (key, value) = (format!("{codec}-k{i}"), format!("{codec}-v{i}"));
            let topic = topic.clone();
            async move {
                let headers = OwnedHeaders::new()
                    .insert(Header {
                        key: "h",
                        value: Some("1"),
                    })
                    .insert(Header {
                        key: "h",
                        value: Some("2"),
                    })
                    .insert(Header::<&str> {
                        key: "n",
                        value: None,
                    });
                p.send(
                    FutureRecord::to(&topic)
                        .key(&key)
                        .payload(&value)
                        .timestamp(1_700_000_000_000 + i as i64)
                        .headers(headers),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
            }
        });
        futures::future::join_all(sends).await;
    }
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", proxy())
        .set("group.id", unique("g-codecs"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    c.subscribe(&[&topic]).unwrap();
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut errors = BTreeSet::new();
    let mut by_partition: BTreeMap<i32, (usize, i64)> = BTreeMap::new();
    while seen.len() < codecs.len() * per_codec && Instant::now() < deadline {
        let m = match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                errors.insert(e.to_string());
                continue;
            }
            None => continue,
        };
        let e = by_partition.entry(m.partition()).or_default();
        (e.0, e.1) = (e.0 + 1, m.offset());
        let key = String::from_utf8_lossy(m.key().unwrap()).into_owned();
        let value = String::from_utf8_lossy(m.payload().unwrap()).into_owned();
        let (codec, i) = key.split_once("-k").unwrap();
        assert_eq!(value, format!("{codec}-v{i}"));
        let i: i64 = i.parse().unwrap();
        assert_eq!(
            m.timestamp(),
            rdkafka::Timestamp::CreateTime(1_700_000_000_000 + i),
            "{key}"
        );
        let headers: Vec<(String, Option<String>)> = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            h.value.map(|v| String::from_utf8_lossy(v).into_owned()),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(
            headers,
            vec![
                ("h".to_string(), Some("1".to_string())),
                ("h".to_string(), Some("2".to_string())),
                ("n".to_string(), None)
            ],
            "{key}"
        );
        seen.insert(key);
    }
    if seen.len() < codecs.len() * per_codec {
        // Where the consumer stopped, against what each partition holds.
        let ends: Vec<(i32, i64, i64)> = (0..4)
            .map(|p| {
                let (lo, hi) = c
                    .fetch_watermarks(&topic, p, Duration::from_secs(10))
                    .unwrap_or((-1, -1));
                (p, lo, hi)
            })
            .collect();
        let position = c
            .position()
            .map(|tpl| format!("{tpl:?}"))
            .unwrap_or_default();
        panic!(
            "records missing: {} of {}; per partition (count, last offset) {by_partition:?}; \
             watermarks {ends:?}; position {position}; consumer errors {errors:?}",
            seen.len(),
            codecs.len() * per_codec
        );
    }

    // Upstream, every codec appears in the batches shardgate wrote.
    let mut found = BTreeSet::new();
    for p in 0..4 {
        let log = cache().join(format!(
            "run/kafka-1/data/{topic}-{p}/00000000000000000000.log"
        ));
        if !log.exists() {
            continue;
        }
        let out = run_ok(
            Command::new(bin("kafka-dump-log")).args(["--files", log.to_str().unwrap()]),
            Duration::from_secs(60),
        );
        for line in out.lines() {
            if let Some(rest) = line.split("compresscodec: ").nth(1) {
                found.insert(rest.split_whitespace().next().unwrap().to_lowercase());
            }
        }
    }
    assert_eq!(
        found,
        codecs
            .iter()
            .map(|c| c.to_string())
            .collect::<BTreeSet<_>>(),
        "codecs of the upstream batches"
    );
}
