//! Elastic-shard measurements against the running testbed (run by `bench/run`):
//!
//! - keys moved by a split and by a merge of a managed topic, measured by producing the same
//!   keys before and after and reading where they landed, next to the keys moved when one
//!   partition is added to a plain topic under Kafka's murmur2 partitioner (expected N/(N+1));
//! - split and merge execution time (admin API call, seal protocol included);
//! - reaction time: from a 10x load step on a one-shard topic with default thresholds to the
//!   completed split.
//!
//!   cargo bench --bench scaling -- <proxy> <kafka> <admin-url>

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::{Value, json};

const KEYS: usize = 20_000;

fn post(admin: &str, path: &str, body: Value) -> (u16, Value, Duration) {
    let t = Instant::now();
    let (code, text) = shardgate::admin::http_request(admin, "POST", path, Some(&body.to_string()))
        .expect("admin API");
    (
        code,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        t.elapsed(),
    )
}

fn get(admin: &str, path: &str) -> Value {
    let (_, text) = shardgate::admin::http_request(admin, "GET", path, None).expect("admin API");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

fn active(map: &Value) -> Vec<Value> {
    let mut v: Vec<Value> = map["shards"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == "active")
        .cloned()
        .collect();
    v.sort_by_key(|s| s["start"].as_str().unwrap().parse::<u128>().unwrap());
    v
}

async fn produce(bootstrap: &str, topic: &str, round: u32, extra: &[(&str, &str)]) {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("linger.ms", "5");
    for (k, v) in extra {
        cfg.set(*k, *v);
    }
    let p: FutureProducer = cfg.create().unwrap();
    let mut pending = Vec::with_capacity(KEYS);
    for k in 0..KEYS {
        let key = format!("key-{k}");
        let value = format!("{round}");
        loop {
            match p.send_result(FutureRecord::to(topic).key(&key).payload(&value)) {
                Ok(d) => {
                    pending.push(d);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
    for d in pending {
        d.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

/// Partition of each key's record of `round`, read directly from Kafka.
fn placement(kafka: &str, topic: &str, round: u32) -> HashMap<String, i32> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set(
            "group.id",
            format!("bench-{topic}-{round}-{}", std::process::id()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    let mut out = HashMap::new();
    let mut idle = Instant::now();
    while out.len() < KEYS && idle.elapsed() < Duration::from_secs(10) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            idle = Instant::now();
            if m.payload() == Some(round.to_string().as_bytes()) {
                out.insert(
                    String::from_utf8_lossy(m.key().unwrap()).into_owned(),
                    m.partition(),
                );
            }
        }
    }
    assert_eq!(
        out.len(),
        KEYS,
        "not every key of round {round} was read back"
    );
    out
}

fn moved(a: &HashMap<String, i32>, b: &HashMap<String, i32>) -> f64 {
    a.iter().filter(|(k, p)| b.get(*k) != Some(p)).count() as f64 / a.len() as f64
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let (proxy, kafka, admin) = (&args[0], &args[1], &args[2]);
    let rf = kafka.split(',').count().min(3) as i32;
    let tag = std::process::id();

    // Keys moved by a split and a merge (managed topic, 4 shards on a pool of 32).
    let topic = format!("bench-moves-{tag}");
    let (code, m, _) = post(
        admin,
        "/api/v1/topics",
        json!({"name": topic, "initial_shards": 4, "pool": 32, "replication_factor": rf, "autoscale": {"enabled": false}}),
    );
    assert_eq!(code, 201, "{m}");
    produce(proxy, &topic, 0, &[]).await;
    let p0 = placement(kafka, &topic, 0);
    let map = get(admin, &format!("/api/v1/topics/{topic}/shards"));
    let id = active(&map)[1]["id"].as_u64().unwrap();
    let (code, _, split_took) = post(
        admin,
        &format!("/api/v1/topics/{topic}/shards/{id}/split"),
        json!({}),
    );
    assert_eq!(code, 200);
    produce(proxy, &topic, 1, &[]).await;
    let p1 = placement(kafka, &topic, 1);
    let map = get(admin, &format!("/api/v1/topics/{topic}/shards"));
    let shards = active(&map);
    let (a, b) = (
        shards[2]["id"].as_u64().unwrap(),
        shards[3]["id"].as_u64().unwrap(),
    );
    let (code, body, merge_took) = post(
        admin,
        &format!("/api/v1/topics/{topic}/merge"),
        json!({"shards": [a, b]}),
    );
    assert_eq!(code, 200, "{body}");
    produce(proxy, &topic, 2, &[]).await;
    let p2 = placement(kafka, &topic, 2);
    println!("moved split: {:.4} (4 -> 5 shards)", moved(&p0, &p1));
    println!("moved merge: {:.4} (5 -> 4 shards)", moved(&p1, &p2));

    // Plain Kafka: murmur2 % N with one partition added (4 -> 5), produced directly.
    let plain = format!("bench-plain-{tag}");
    let admin_client: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()
        .unwrap();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    admin_client
        .create_topics(
            &[NewTopic::new(&plain, 4, TopicReplication::Fixed(rf))],
            &opts,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let murmur = [("partitioner", "murmur2_random")];
    produce(kafka, &plain, 0, &murmur).await;
    let q0 = placement(kafka, &plain, 0);
    admin_client
        .create_partitions(&[NewPartitions::new(&plain, 5)], &opts)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    produce(kafka, &plain, 1, &murmur).await;
    let q1 = placement(kafka, &plain, 1);
    println!(
        "moved add-partition: {:.4} (4 -> 5 partitions, murmur2)",
        moved(&q0, &q1)
    );

    // Split and merge execution time: five of each on a fresh topic, median.
    let t2 = format!("bench-ops-{tag}");
    let (code, _, _) = post(
        admin,
        "/api/v1/topics",
        json!({"name": t2, "initial_shards": 2, "pool": 16, "replication_factor": rf, "autoscale": {"enabled": false}}),
    );
    assert_eq!(code, 201);
    let (mut splits, mut merges) = (vec![split_took], vec![merge_took]);
    for _ in 0..5 {
        let shards = active(&get(admin, &format!("/api/v1/topics/{t2}/shards")));
        let id = shards[0]["id"].as_u64().unwrap();
        let (code, _, took) = post(
            admin,
            &format!("/api/v1/topics/{t2}/shards/{id}/split"),
            json!({}),
        );
        assert_eq!(code, 200);
        splits.push(took);
        let shards = active(&get(admin, &format!("/api/v1/topics/{t2}/shards")));
        let (a, b) = (
            shards[0]["id"].as_u64().unwrap(),
            shards[1]["id"].as_u64().unwrap(),
        );
        let (code, _, took) = post(
            admin,
            &format!("/api/v1/topics/{t2}/merge"),
            json!({"shards": [a, b]}),
        );
        assert_eq!(code, 200);
        merges.push(took);
    }
    println!(
        "split ms: median {:.1} max {:.1}",
        median(splits.clone()).as_secs_f64() * 1e3,
        splits.iter().max().unwrap().as_secs_f64() * 1e3
    );
    println!(
        "merge ms: median {:.1} max {:.1}",
        median(merges.clone()).as_secs_f64() * 1e3,
        merges.iter().max().unwrap().as_secs_f64() * 1e3
    );

    // Reaction time: one shard, default thresholds (5000 records/s), 1000/s baseline for 10 s,
    // then a 10x step to 10000/s until the autoscaler has split it.
    let t3 = format!("bench-react-{tag}");
    let (code, _, _) = post(
        admin,
        "/api/v1/topics",
        json!({"name": t3, "initial_shards": 1, "pool": 8, "replication_factor": rf}),
    );
    assert_eq!(code, 201);
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", proxy)
        .set("acks", "1")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let started = Instant::now();
    let mut step_at = None;
    let mut due = 0.0f64;
    let mut last = Instant::now();
    let mut i = 0u64;
    let reacted = loop {
        let t = started.elapsed();
        let rate = if t < Duration::from_secs(10) {
            1000.0
        } else {
            10_000.0
        };
        if rate > 1000.0 && step_at.is_none() {
            step_at = Some(Instant::now());
        }
        due += rate * last.elapsed().as_secs_f64();
        last = Instant::now();
        while due >= 1.0 {
            due -= 1.0;
            i += 1;
            let key = format!("k{}", i % 5000);
            let _ = p.send_result(FutureRecord::to(&t3).key(&key).payload("x"));
        }
        p.poll(Duration::ZERO);
        if let Some(s) = step_at {
            let map = get(admin, &format!("/api/v1/topics/{t3}/shards"));
            if active(&map).len() > 1 {
                break Some(s.elapsed());
            }
            if s.elapsed() > Duration::from_secs(60) {
                break None;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    match reacted {
        Some(d) => println!(
            "reaction s: {:.1} (10x step 1000 -> 10000 records/s, split threshold 5000/s)",
            d.as_secs_f64()
        ),
        None => println!("reaction s: none within 60 s"),
    }
}
