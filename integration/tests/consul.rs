//! Two shardgate instances forming one virtual cluster on a real Consul: maps written with
//! check-and-set and followed by both, the leader killed mid-run, Consul stopped for 30 s
//! mid-run, the killed instance restarted. Producers and a consumer group run throughout:
//! nothing acknowledged is lost and no key's order breaks.
//!
//! Ports (besides the testbed's): instance n listens on 127.0.0.1:2919n for clients and
//! 127.0.0.1:2929n for admin HTTP.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

fn consul_addr() -> String {
    var("CONSUL_HTTP_ADDR", "http://127.0.0.1:28500")
}

fn client_addr(n: i32) -> String {
    format!("127.0.0.1:{}", 29190 + n)
}

fn admin_addr(n: i32) -> String {
    format!("http://127.0.0.1:{}", 29290 + n)
}

fn start(n: i32, cluster: &str) -> Shardgate {
    let bootstrap: Vec<String> = kafka().split(',').map(|b| format!("\"{b}\"")).collect();
    let config = format!(
        r#"
[listener]
bind = "{client}"
node_id = {n}

[[instances]]
node_id = 1
advertised = "{a1}"

[[instances]]
node_id = 2
advertised = "{a2}"

[upstream]
bootstrap = [{bootstrap}]

[admin]
bind = "{admin}"

[store]
kind = "consul"
consul_addr = "{consul}"
cluster = "{cluster}"
"#,
        client = client_addr(n),
        a1 = client_addr(1),
        a2 = client_addr(2),
        bootstrap = bootstrap.join(", "),
        admin = admin_addr(n).trim_start_matches("http://"),
        consul = consul_addr(),
    );
    start_shardgate(
        &cache().join("run"),
        &format!("consul-test-{n}"),
        &config,
        &admin_addr(n),
    )
}

fn call(n: i32, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    match shardgate::admin::http_request(&admin_addr(n), method, path, body.as_deref()) {
        Ok((code, text)) => (
            code,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ),
        Err(e) => (0, Value::String(e.to_string())),
    }
}

fn is_leader(n: i32) -> bool {
    shardgate::admin::http_request(&admin_addr(n), "GET", "/metrics", None)
        .map(|(_, body)| {
            body.lines()
                .any(|l| l.starts_with("shardgate_controller_leader 1"))
        })
        .unwrap_or(false)
}

fn epoch(n: i32, topic: &str) -> Option<u64> {
    let (code, map) = call(n, "GET", &format!("/api/v1/topics/{topic}/shards"), None);
    (code == 200).then(|| map["epoch"].as_u64()).flatten()
}

fn first_active(n: i32, topic: &str) -> u64 {
    let (_, map) = call(n, "GET", &format!("/api/v1/topics/{topic}/shards"), None);
    map["shards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["state"] == "active")
        .unwrap()["id"]
        .as_u64()
        .unwrap()
}

fn testbed(args: &[&str]) {
    run_ok(
        Command::new(repo().join("integration/testbed")).args(args),
        Duration::from_secs(120),
    );
}

/// Consul stopped by a test, started again when dropped — also when the test panics, so the
/// tests after it still find Consul.
struct ConsulDown;

impl ConsulDown {
    fn stop() -> Self {
        testbed(&["stop-consul"]);
        ConsulDown
    }
}

impl Drop for ConsulDown {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("integration/testbed"))
            .arg("start-consul")
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the testbed with Consul: integration/run-tests"]
async fn two_instances_survive_leader_death_and_a_consul_outage_without_losing_order() {
    let cluster = unique("it");
    let mut a = Some(start(1, &cluster));
    let b = start(2, &cluster);
    eventually("a leader is elected", Duration::from_secs(30), || {
        is_leader(1) || is_leader(2)
    });
    let topic = unique("consul");
    let (code, created) = call(
        2,
        "POST",
        "/api/v1/topics",
        Some(
            json!({"name": topic, "initial_shards": 2, "pool": 16, "replication_factor": rf(), "autoscale": {"enabled": false}}),
        ),
    );
    assert_eq!(
        code, 201,
        "create through instance 2 (forwarded to the leader if needed): {created}"
    );
    eventually(
        "both instances have the map",
        Duration::from_secs(20),
        || epoch(1, &topic) == Some(0) && epoch(2, &topic) == Some(0),
    );

    // Producer and consumer through both instances.
    let bootstrap = format!("{},{}", client_addr(1), client_addr(2));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let producer = {
        let (stop, acked, topic, bootstrap) = (
            stop.clone(),
            acked.clone(),
            topic.clone(),
            bootstrap.clone(),
        );
        tokio::spawn(async move {
            let p: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("acks", "all")
                .set("enable.idempotence", "true")
                .set("linger.ms", "5")
                .create()
                .unwrap();
            let mut seq = vec![0u64; 200];
            let mut i = 0;
            let mut pending = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let k = i % 200;
                let value = format!("c-{k}:{}", seq[k]);
                seq[k] += 1;
                i += 1;
                // Enqueued in sequence order; only the wait for the ack is spawned.
                let key = format!("c-{k}");
                let Ok(delivery) =
                    p.send_result(FutureRecord::to(&topic).key(&key).payload(&value))
                else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    seq[k] -= 1;
                    i -= 1;
                    continue;
                };
                let acked = acked.clone();
                pending.push(tokio::spawn(async move {
                    if let Ok(Ok(_)) = delivery.await {
                        acked.lock().unwrap().insert(value);
                    }
                }));
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
            for h in pending {
                let _ = h.await;
            }
        })
    };
    let seen: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let consumer_done = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (topic, seen, done) = (topic.clone(), seen.clone(), consumer_done.clone());
        std::thread::spawn(move || {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", format!("{topic}-g"))
                .set("client.id", format!("{topic}-g"))
                .set("auto.offset.reset", "earliest")
                .set("enable.auto.commit", "false")
                .create()
                .unwrap();
            c.subscribe(&[&topic]).unwrap();
            while !done.load(Ordering::SeqCst) {
                if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                    seen.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(m.payload().unwrap()).into_owned());
                    let _ = c.commit_message(&m, CommitMode::Async);
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;

    // A split asked of either instance lands once, and both follow it.
    let id = first_active(2, &topic);
    let (code, body) = call(
        2,
        "POST",
        &format!("/api/v1/topics/{topic}/shards/{id}/split"),
        Some(json!({})),
    );
    assert_eq!(code, 200, "{body}");
    let e = body["epoch"].as_u64().unwrap();
    eventually(
        "both instances follow the split",
        Duration::from_secs(10),
        || epoch(1, &topic) >= Some(e) && epoch(2, &topic) >= Some(e),
    );

    // Kill the leader; the other instance takes over (session TTL 10 s) and can split.
    eventually("a leader is elected", Duration::from_secs(20), || {
        is_leader(1) || is_leader(2)
    });
    let leader = if is_leader(1) { 1 } else { 2 };
    let survivor = 3 - leader;
    let mut b = Some(b);
    if leader == 1 {
        drop(a.take());
    } else {
        drop(b.take());
    }
    eventually(
        "the survivor becomes leader",
        Duration::from_secs(40),
        || is_leader(survivor),
    );
    let id = first_active(survivor, &topic);
    let (code, body) = call(
        survivor,
        "POST",
        &format!("/api/v1/topics/{topic}/shards/{id}/split"),
        Some(json!({})),
    );
    assert_eq!(code, 200, "split after failover: {body}");
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Consul down for 30 s: routing goes on with the last map, map changes are refused.
    let epoch_before = epoch(survivor, &topic).unwrap();
    let consul_down = ConsulDown::stop();
    let acked_before = acked.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let id = first_active(survivor, &topic);
    let (code, body) = call(
        survivor,
        "POST",
        &format!("/api/v1/topics/{topic}/shards/{id}/split"),
        Some(json!({})),
    );
    assert!(
        code >= 500,
        "a split with the store down must fail, got {code}: {body}"
    );
    assert_eq!(
        epoch(survivor, &topic),
        Some(epoch_before),
        "a refused split changed the map"
    );
    tokio::time::sleep(Duration::from_secs(25)).await;
    let acked_during = acked.lock().unwrap().len();
    assert!(
        acked_during > acked_before + 1000,
        "producing stalled while Consul was down ({acked_before} -> {acked_during})"
    );
    drop(consul_down);
    // The controller resumes: the map is republished and a split goes through again.
    let mut resumed = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let id = first_active(survivor, &topic);
        if call(
            survivor,
            "POST",
            &format!("/api/v1/topics/{topic}/shards/{id}/split"),
            Some(json!({})),
        )
        .0 == 200
        {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        resumed,
        "the controller did not resume after Consul came back"
    );

    // The killed instance comes back and reloads the map from Consul.
    let restarted = start(leader, &cluster);
    eventually(
        "the restarted instance has the current map",
        Duration::from_secs(30),
        || epoch(leader, &topic) == epoch(survivor, &topic),
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::SeqCst);
    producer.await.unwrap();
    let want = acked.lock().unwrap().clone();
    eventually(
        "the group consumed every acknowledged record",
        Duration::from_secs(120),
        || {
            let s: BTreeSet<String> = seen.lock().unwrap().iter().cloned().collect();
            want.is_subset(&s)
        },
    );
    consumer_done.store(true, Ordering::SeqCst);
    consumer.join().unwrap();

    // Per-key order: a new sequence number never arrives after a larger one.
    let mut max: HashMap<String, i64> = HashMap::new();
    let mut firsts: BTreeSet<String> = BTreeSet::new();
    let mut violations = Vec::new();
    let mut redeliveries = 0;
    for v in seen.lock().unwrap().iter() {
        let (k, s) = v.rsplit_once(':').unwrap();
        let s: i64 = s.parse().unwrap();
        if !firsts.insert(v.clone()) {
            redeliveries += 1;
            continue;
        }
        let m = max.entry(k.to_string()).or_insert(-1);
        if s < *m {
            violations.push(format!("{k}: {s} after {m}"));
        }
        *m = (*m).max(s);
    }
    eprintln!(
        "acked {}, consumed {} ({redeliveries} re-deliveries)",
        want.len(),
        firsts.len()
    );
    assert!(
        violations.is_empty(),
        "order violations: {:?}",
        &violations[..violations.len().min(10)]
    );
    drop(restarted);
    drop(a);
    drop(b);
}
