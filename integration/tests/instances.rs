//! Two shardgate instances behind one Consul, the workload of issue 8: a managed topic with
//! replication factor 3, live acks=1 producers and a live consumer group that both bootstrap
//! from both instances (so a group's coordinator and its partitions' leaders usually sit on
//! different instances), 6 splits and 4 merges forced through the admin API over ~40 s.
//!
//! Checks: every acknowledged record is delivered to the group within 15 s of the last produce,
//! and no key goes backwards. Before asserting, it reports what it measured (delivered and not
//! delivered, where the undelivered records sit relative to the gates, the group's coordinator
//! and the partitions' virtual leaders, the gate metrics of both instances), because the point
//! of this test is also to show *why* records are held.
//!
//! Instances: with `integration/testbed up --instances 2` (SHARDGATE_ADMIN2 set by
//! `testbed env`) the test uses the testbed's two instances. Otherwise it starts two of its own
//! on the testbed's Consul (`up --consul`, as `integration/run-tests` does): clients on
//! 127.0.0.1:29193/29194, admin on 127.0.0.1:29293/29294, logs in
//! $SHARDGATE_CACHE/run/instances-test-{1,2}.log.
//!
//! Knobs (env): INSTANCES_RATE records/s per producer (default 2000), INSTANCES_PRODUCERS
//! (default 2), INSTANCES_LATE_SECS how long to keep consuming after the 15 s deadline to see
//! whether held records come later (default 45).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{Value, json};

const KEYS_PER_PRODUCER: usize = 300;
const DELIVERY_DEADLINE: Duration = Duration::from_secs(15);

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The two instances under test: client addresses and admin base URLs.
struct Instances {
    clients: Vec<String>,
    admins: Vec<String>,
    /// Started by this test (dropped at the end); empty when the testbed's are used.
    own: Vec<Shardgate>,
}

impl Instances {
    fn bootstrap(&self) -> String {
        self.clients.join(",")
    }

    fn call(&self, i: usize, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string());
        match shardgate::admin::http_request(&self.admins[i], method, path, body.as_deref()) {
            Ok((code, text)) => (
                code,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            ),
            Err(e) => (0, Value::String(e.to_string())),
        }
    }

    fn map(&self, i: usize, topic: &str) -> Option<Value> {
        let (code, map) = self.call(i, "GET", &format!("/api/v1/topics/{topic}/shards"), None);
        (code == 200).then_some(map)
    }

    /// Process id of instance `i` (0-based): ours, or from the testbed's pid files.
    fn pid(&self, i: usize) -> i32 {
        match self.own.get(i) {
            Some(sg) => sg.pid(),
            None if i == 0 => Frozen::pid_of("shardgate.pid"),
            None => Frozen::pid_of(&format!("shardgate-{}.pid", i + 1)),
        }
    }

    /// The instance holding the controller leadership (0-based).
    fn leader(&self) -> Option<usize> {
        (0..2).find(|i| {
            self.metrics(*i)
                .lines()
                .any(|l| l.starts_with("shardgate_controller_leader 1"))
        })
    }

    fn metrics(&self, i: usize) -> String {
        shardgate::admin::http_request(&self.admins[i], "GET", "/metrics", None)
            .map(|(_, b)| b)
            .unwrap_or_default()
    }
}

fn consul_addr() -> String {
    var("CONSUL_HTTP_ADDR", "http://127.0.0.1:28500")
}

/// The testbed's two instances, or two started here on the testbed's Consul.
fn instances() -> Instances {
    if let Ok(admin2) = std::env::var("SHARDGATE_ADMIN2") {
        let clients: Vec<String> = proxy().split(',').map(str::to_string).collect();
        assert_eq!(
            clients.len(),
            2,
            "SHARDGATE_ADMIN2 is set but SHARDGATE_BOOTSTRAP does not list two instances"
        );
        return Instances {
            clients,
            admins: vec![admin(), admin2],
            own: vec![],
        };
    }
    let cluster = unique("inst");
    let client = |n: i32| format!("127.0.0.1:{}", 29192 + n);
    let admin_url = |n: i32| format!("http://127.0.0.1:{}", 29292 + n);
    let bootstrap: Vec<String> = kafka().split(',').map(|b| format!("\"{b}\"")).collect();
    let mut own = Vec::new();
    for n in 1..=2 {
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
            client = client(n),
            a1 = client(1),
            a2 = client(2),
            bootstrap = bootstrap.join(", "),
            admin = admin_url(n).trim_start_matches("http://"),
            consul = consul_addr(),
        );
        own.push(start_shardgate(
            &cache().join("run"),
            &format!("instances-test-{n}"),
            &config,
            &admin_url(n),
        ));
    }
    Instances {
        clients: vec![client(1), client(2)],
        admins: vec![admin_url(1), admin_url(2)],
        own,
    }
}

fn width(s: &Value) -> u128 {
    s["end"].as_str().unwrap().parse::<u128>().unwrap()
        - s["start"].as_str().unwrap().parse::<u128>().unwrap()
}

/// Per key, the sequence numbers in the order the group received them.
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

    fn contains(&self, value: &str) -> bool {
        let (key, seq) = value.rsplit_once(':').unwrap();
        self.seen
            .get(key)
            .is_some_and(|(_, s)| s.contains(&seq.parse().unwrap()))
    }
}

/// Sum over series of `name` whose labels contain all of `labels`.
fn metric_in(body: &str, name: &str, labels: &[&str]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let series = l.split_whitespace().next().unwrap_or("");
            series.split('{').next().unwrap_or("") == name
                && labels.iter().all(|lab| series.contains(lab))
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// Quantile `q` of a Prometheus histogram summed over `bodies` (upper bucket bound).
fn histogram_quantile(bodies: &[String], name: &str, topic: &str, q: f64) -> Option<f64> {
    let mut buckets: BTreeMap<u64, f64> = BTreeMap::new(); // le (as f64 bits order) -> count
    let mut les: BTreeMap<u64, f64> = BTreeMap::new();
    for body in bodies {
        for l in body.lines().filter(|l| !l.starts_with('#')) {
            let series = l.split_whitespace().next().unwrap_or("");
            if series.split('{').next() != Some(&format!("{name}_bucket"))
                || !series.contains(&format!("topic=\"{topic}\""))
            {
                continue;
            }
            let Some(le) = series
                .split("le=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
            else {
                continue;
            };
            let le: f64 = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::INFINITY)
            };
            let count: f64 = l
                .split_whitespace()
                .last()
                .and_then(|c| c.parse().ok())
                .unwrap_or(0.0);
            // Order buckets by le: map the float to a sortable key.
            let key = (le * 1e6).min(u64::MAX as f64) as u64;
            *buckets.entry(key).or_default() += count;
            les.insert(key, le);
        }
    }
    let total = *buckets.values().last()?;
    if total == 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, c)| **c >= q * total)
        .map(|(k, _)| les[k])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the testbed with Consul: integration/run-tests (or testbed up --instances 2)"]
async fn two_instances_deliver_every_record_in_key_order_across_splits_and_merges() {
    let inst = instances();
    let started = Instant::now();
    let cluster_leader = |inst: &Instances| {
        (0..2).find(|i| {
            inst.metrics(*i)
                .lines()
                .any(|l| l.starts_with("shardgate_controller_leader 1"))
        })
    };
    eventually("a controller leader", Duration::from_secs(30), || {
        cluster_leader(&inst).is_some()
    });
    let topic = unique("inst");
    let (code, created) = inst.call(
        1,
        "POST",
        "/api/v1/topics",
        Some(json!({"name": topic, "initial_shards": 2, "pool": 16,
                    "replication_factor": 3, "autoscale": {"enabled": false}})),
    );
    assert_eq!(code, 201, "create through instance 2: {created}");
    eventually(
        "both instances have the map",
        Duration::from_secs(20),
        || inst.map(0, &topic).is_some() && inst.map(1, &topic).is_some(),
    );

    let rate = env_num("INSTANCES_RATE", 2000);
    let producers = env_num("INSTANCES_PRODUCERS", 2) as usize;
    let late = Duration::from_secs(env_num("INSTANCES_LATE_SECS", 45));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let failed = Arc::new(AtomicUsize::new(0));
    let last_produce = Arc::new(Mutex::new(Instant::now()));

    // Consumers first (two members of one group, each bootstrapping from both instances, in
    // opposite orders), so they are assigned before the first record arrives.
    let group = format!("{topic}-g");
    let order = Arc::new(Mutex::new(Order::default()));
    let consumers_done = Arc::new(AtomicBool::new(false));
    let mut consumer_threads = Vec::new();
    for m in 0..2 {
        let mut clients = inst.clients.clone();
        if m == 1 {
            clients.reverse();
        }
        let (topic, group, order, done) = (
            topic.clone(),
            group.clone(),
            order.clone(),
            consumers_done.clone(),
        );
        consumer_threads.push(std::thread::spawn(move || {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", clients.join(","))
                .set("group.id", &group)
                .set("client.id", format!("{group}-m{m}"))
                .set("auto.offset.reset", "earliest")
                // At-least-once: offsets are stored after the record is recorded and
                // committed every second.
                .set("enable.auto.commit", "true")
                .set("enable.auto.offset.store", "false")
                .set("auto.commit.interval.ms", "1000")
                .create()
                .unwrap();
            c.subscribe(&[&topic]).unwrap();
            while !done.load(Ordering::SeqCst) {
                if let Some(Ok(msg)) = c.poll(Duration::from_millis(100)) {
                    let v = String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
                    order.lock().unwrap().record(&v);
                    let _ = c.store_offset_from_message(&msg);
                }
            }
            let _ = c.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
        }));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;

    let mut producer_tasks = Vec::new();
    for pi in 0..producers {
        let mut clients = inst.clients.clone();
        if pi % 2 == 1 {
            clients.reverse();
        }
        let (stop, acked, failed, last_produce, topic) = (
            stop.clone(),
            acked.clone(),
            failed.clone(),
            last_produce.clone(),
            topic.clone(),
        );
        producer_tasks.push(tokio::spawn(async move {
            let p: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", clients.join(","))
                .set("client.id", format!("{topic}-p{pi}"))
                .set("acks", "1")
                .set("enable.idempotence", "false")
                // A key's producer keeps order: one request in flight per connection.
                .set("max.in.flight.requests.per.connection", "1")
                .set("linger.ms", "5")
                .set("message.timeout.ms", "30000")
                .create()
                .unwrap();
            let mut seq = vec![0u64; KEYS_PER_PRODUCER];
            let mut i = 0usize;
            let mut pending = Vec::new();
            let tick = Duration::from_millis(10);
            let per_tick = (rate as usize / 100).max(1);
            let mut next = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                for _ in 0..per_tick {
                    let k = i % KEYS_PER_PRODUCER;
                    let key = format!("p{pi}-k{k}");
                    let value = format!("{key}:{}", seq[k]);
                    match p.send_result(FutureRecord::to(&topic).key(&key).payload(&value)) {
                        Ok(delivery) => {
                            seq[k] += 1;
                            i += 1;
                            let (acked, failed) = (acked.clone(), failed.clone());
                            pending.push(tokio::spawn(async move {
                                if let Ok(Ok(_)) = delivery.await {
                                    acked.lock().unwrap().push(value);
                                } else {
                                    failed.fetch_add(1, Ordering::Relaxed);
                                }
                            }));
                        }
                        Err(_) => break, // queue full: try again next tick
                    }
                }
                *last_produce.lock().unwrap() = Instant::now();
                next += tick;
                let now = Instant::now();
                if next > now {
                    tokio::time::sleep(next - now).await;
                } else {
                    next = now;
                }
            }
            for h in pending {
                let _ = h.await;
            }
        }));
    }

    // 6 splits and 4 merges, one every 4 s, asked alternately of instance 1 and 2 (the
    // non-leader forwards to the leader). Splits take the widest shard, merges the adjacent
    // pair with the smallest combined range.
    let plan = [
        true, true, false, true, true, false, true, false, true, false,
    ];
    let mut api_errors = Vec::new();
    let (mut splits, mut merges) = (0, 0);
    for (step, split) in plan.into_iter().enumerate() {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let via = step % 2;
        let map = inst.map(via, &topic).expect("map");
        let shards = active(&map);
        let (code, body) = if split {
            let widest = shards.iter().max_by_key(|s| width(s)).unwrap();
            let id = widest["id"].as_u64().unwrap();
            inst.call(
                via,
                "POST",
                &format!("/api/v1/topics/{topic}/shards/{id}/split"),
                Some(json!({})),
            )
        } else {
            let i = (0..shards.len() - 1)
                .min_by_key(|i| width(&shards[*i]) + width(&shards[i + 1]))
                .unwrap();
            let (a, b) = (
                shards[i]["id"].as_u64().unwrap(),
                shards[i + 1]["id"].as_u64().unwrap(),
            );
            inst.call(
                via,
                "POST",
                &format!("/api/v1/topics/{topic}/merge"),
                Some(json!({"shards": [a, b]})),
            )
        };
        if code == 200 {
            if split {
                splits += 1;
            } else {
                merges += 1;
            }
        } else {
            api_errors.push(format!(
                "step {step} via instance {}: {code} {body}",
                via + 1
            ));
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    for t in producer_tasks {
        t.await.unwrap();
    }
    let produce_secs = started.elapsed().as_secs_f64();
    let last = *last_produce.lock().unwrap();
    let want: Vec<String> = acked.lock().unwrap().clone();
    let undelivered = |order: &Order| -> Vec<String> {
        want.iter()
            .filter(|v| !order.contains(v))
            .cloned()
            .collect()
    };

    // Within 15 s of the last produce...
    let deadline = last + DELIVERY_DEADLINE;
    while Instant::now() < deadline && !undelivered(&order.lock().unwrap()).is_empty() {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let missing_at_deadline = undelivered(&order.lock().unwrap());
    let at_deadline = last.elapsed();
    // ...and, to tell "late" from "stuck", some time after.
    let late_deadline = deadline + late;
    while Instant::now() < late_deadline && !undelivered(&order.lock().unwrap()).is_empty() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let missing_late = undelivered(&order.lock().unwrap());
    let at_late = last.elapsed();

    // Where the undelivered records are: read the topic directly from Kafka.
    let maps: Vec<Value> = (0..2).map(|i| inst.map(i, &topic).unwrap()).collect();
    let pool = maps[0]["pool"].as_i64().unwrap_or(16) as i32;
    let direct: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", format!("{topic}-direct"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut ends = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in 0..pool {
        let (_, high) = direct
            .fetch_watermarks(&topic, p, Duration::from_secs(10))
            .unwrap();
        ends.insert(p, high);
        tpl.add_partition_offset(&topic, p, Offset::Beginning)
            .unwrap();
    }
    direct.assign(&tpl).unwrap();
    let total: i64 = ends.values().sum();
    let mut located: HashMap<String, (i32, i64)> = HashMap::new();
    let mut read = 0i64;
    let read_deadline = Instant::now() + Duration::from_secs(60);
    while read < total && Instant::now() < read_deadline {
        if let Some(Ok(m)) = direct.poll(Duration::from_millis(200)) {
            read += 1;
            let v = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
            located.entry(v).or_insert((m.partition(), m.offset()));
        }
    }
    let stored = want.iter().filter(|v| located.contains_key(*v)).count();
    // The group's commits, as Kafka has them (OffsetFetch to the real coordinator).
    let committed: BTreeMap<i32, i64> = {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka())
            .set("group.id", &group)
            .create()
            .unwrap();
        let mut q = TopicPartitionList::new();
        for p in 0..pool {
            q.add_partition(&topic, p);
        }
        c.committed_offsets(q, Duration::from_secs(10))
            .map(|l| {
                l.elements()
                    .iter()
                    .filter_map(|e| e.offset().to_raw().map(|o| (e.partition(), o)))
                    .collect()
            })
            .unwrap_or_default()
    };
    // Virtual leaders of the partitions, as the instances tell clients.
    let leaders: BTreeMap<i32, i32> = {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", inst.bootstrap())
            .create()
            .unwrap();
        c.fetch_metadata(Some(&topic), Duration::from_secs(10))
            .map(|md| {
                md.topics()[0]
                    .partitions()
                    .iter()
                    .map(|p| (p.id(), p.leader()))
                    .collect()
            })
            .unwrap_or_default()
    };
    // The group's coordinator, as the instances tell clients.
    let coordinator = Command::new(bin("kafka-consumer-groups"))
        .args([
            "--bootstrap-server",
            &inst.clients[0],
            "--describe",
            "--group",
            &group,
            "--state",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();

    consumers_done.store(true, Ordering::SeqCst);
    for t in consumer_threads {
        t.join().unwrap();
    }
    let order = order.lock().unwrap();

    // ---- report ----
    let bodies: Vec<String> = (0..2).map(|i| inst.metrics(i)).collect();
    let mut report = String::new();
    let mut line = |s: String| {
        eprintln!("{s}");
        report.push_str(&s);
        report.push('\n');
    };
    line(format!(
        "instances {:?} (leader: instance {:?}); topic {topic}, rf 3, acks=1, {producers} producers x {rate}/s, produce phase {produce_secs:.0}s",
        inst.clients,
        cluster_leader(&inst).map(|i| i + 1)
    ));
    line(format!(
        "forced: {splits} splits, {merges} merges ok; api errors: {api_errors:?}"
    ));
    line(format!(
        "acknowledged {} (failed deliveries {}), stored upstream {stored}, delivered to the group {} ({} re-deliveries)",
        want.len(),
        failed.load(Ordering::Relaxed),
        want.len() - missing_late.len(),
        order.redeliveries
    ));
    let pct = |n: usize| 100.0 * n as f64 / want.len().max(1) as f64;
    line(format!(
        "NOT delivered {:.0}s after the last produce: {} ({:.1}%); {:.0}s after: {} ({:.1}%)",
        at_deadline.as_secs_f64(),
        missing_at_deadline.len(),
        pct(missing_at_deadline.len()),
        at_late.as_secs_f64(),
        missing_late.len(),
        pct(missing_late.len())
    ));
    line(format!("keys backwards: {}", order.violations.len()));
    line(format!(
        "group coordinator (kafka-consumer-groups --state):\n{}",
        coordinator.trim()
    ));
    line(format!(
        "virtual leaders (partition -> node id): {leaders:?}"
    ));
    line(format!("group commits (Kafka): {committed:?}"));
    line(format!("upstream end offsets: {ends:?}"));
    for (i, m) in maps.iter().enumerate() {
        line(format!(
            "instance {} map: epoch {}, active {:?}",
            i + 1,
            m["epoch"],
            active(m)
                .iter()
                .map(|s| (s["id"].as_u64().unwrap(), s["partition"].as_i64().unwrap()))
                .collect::<Vec<_>>()
        ));
    }
    let gates = maps[0]["gates"].as_array().cloned().unwrap_or_default();
    for g in &gates {
        let p = g["partition"].as_i64().unwrap() as i32;
        let parents: Vec<String> = g["after"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let pp = a["partition"].as_i64().unwrap() as i32;
                format!(
                    "p{pp} seal {} (committed {:?}, leader node {:?})",
                    a["seal_offset"],
                    committed.get(&pp),
                    leaders.get(&pp)
                )
            })
            .collect();
        line(format!(
            "gate on p{p} (leader node {:?}) from {} after [{}]",
            leaders.get(&p),
            g["from_offset"],
            parents.join(", ")
        ));
    }
    let mut by_partition: BTreeMap<i32, (usize, i64, i64)> = BTreeMap::new();
    let mut not_stored = 0;
    for v in &missing_late {
        match located.get(v) {
            Some((p, o)) => {
                let e = by_partition.entry(*p).or_insert((0, i64::MAX, -1));
                e.0 += 1;
                e.1 = e.1.min(*o);
                e.2 = e.2.max(*o);
            }
            None => not_stored += 1,
        }
    }
    for (p, (n, lo, hi)) in &by_partition {
        let gated_from = gates
            .iter()
            .filter(|g| g["partition"].as_i64() == Some(*p as i64))
            .filter_map(|g| g["from_offset"].as_i64())
            .min();
        line(format!(
            "  undelivered on p{p} (leader node {:?}): {n} records, offsets {lo}..={hi}; first gate from {gated_from:?}; group committed {:?}",
            leaders.get(p),
            committed.get(p)
        ));
    }
    if not_stored > 0 {
        line(format!(
            "  undelivered and not found upstream: {not_stored}"
        ));
    }
    for (i, body) in bodies.iter().enumerate() {
        let t = format!("topic=\"{topic}\"");
        line(format!(
            "instance {} metrics: gate_fallback_opens_total {}, gate_held_fetches_total {}, gate_wait_seconds count {}, gate_closed (sum) {}, splits {}, merges {}, writer_indeterminate_total {}, leader_moves {}",
            i + 1,
            metric_in(body, "shardgate_gate_fallback_opens_total", &[&t]),
            metric_in(body, "shardgate_gate_held_fetches_total", &[&t]),
            metric_in(body, "shardgate_gate_wait_seconds_count", &[&t]),
            metric_in(body, "shardgate_gate_closed", &[&t]),
            metric_in(body, "shardgate_shard_splits_total", &[&t]),
            metric_in(body, "shardgate_shard_merges_total", &[&t]),
            metric_in(body, "shardgate_writer_indeterminate_total", &[]),
            metric_in(body, "shardgate_leader_moves_total", &[&t]),
        ));
    }
    line(format!(
        "gate wait (both instances, histogram upper bounds): p50 {:?} s, p99 {:?} s",
        histogram_quantile(&bodies, "shardgate_gate_wait_seconds", &topic, 0.5),
        histogram_quantile(&bodies, "shardgate_gate_wait_seconds", &topic, 0.99)
    ));
    let _ = std::fs::write(
        cache()
            .join("run")
            .join(format!("instances-report-{topic}.txt")),
        &report,
    );

    assert!(
        want.len() > 1000,
        "too few records acknowledged ({}) for the test to mean anything",
        want.len()
    );
    assert_eq!(
        (splits, merges),
        (6, 4),
        "forced splits/merges failed: {api_errors:?}"
    );
    assert!(
        order.violations.is_empty(),
        "{} keys went backwards: {:?}",
        order.violations.len(),
        &order.violations[..order.violations.len().min(10)]
    );
    assert!(
        missing_at_deadline.is_empty(),
        "{} of {} acknowledged records ({:.1}%) not delivered within {DELIVERY_DEADLINE:?} of the last produce ({} still missing {:.0}s after it)",
        missing_at_deadline.len(),
        want.len(),
        pct(missing_at_deadline.len()),
        missing_late.len(),
        at_late.as_secs_f64()
    );
}

/// Issue 8, fencing: an instance frozen (SIGSTOP) for longer than its store session's TTL while
/// the leader splits must, once resumed, write nothing with the epoch it had before the freeze.
/// The leader's seal stops waiting for the frozen instance when its session expires; whatever
/// the resumed instance then writes with its old map lands on the parent after the seal.
/// Checked in Kafka: no record of a key the split moved sits on the parent at or after the seal
/// offset. Producers use acks=all, so a lagging high watermark (seal.rs) plays no part here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the testbed with Consul: integration/run-tests (or testbed up --instances 2)"]
async fn a_frozen_instance_writes_nothing_with_an_old_epoch() {
    let inst = instances();
    eventually("a controller leader", Duration::from_secs(30), || {
        inst.leader().is_some()
    });
    let leader = inst.leader().unwrap();
    let frozen_i = 1 - leader;
    let topic = unique("fence");
    let (code, created) = inst.call(
        leader,
        "POST",
        "/api/v1/topics",
        Some(json!({"name": topic, "initial_shards": 2, "pool": 8,
                    "replication_factor": 3, "autoscale": {"enabled": false}})),
    );
    assert_eq!(code, 201, "create: {created}");
    eventually(
        "both instances have the map",
        Duration::from_secs(20),
        || inst.map(0, &topic).is_some() && inst.map(1, &topic).is_some(),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let producer = {
        let (stop, acked, topic, bootstrap) =
            (stop.clone(), acked.clone(), topic.clone(), inst.bootstrap());
        tokio::spawn(async move {
            let p: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("acks", "all")
                .set("enable.idempotence", "true")
                .set("linger.ms", "5")
                .create()
                .unwrap();
            produce_keyed_sequences(p, &topic, "f-k", KEYS_PER_PRODUCER, &stop, &acked).await;
        })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;

    let before = inst.map(leader, &topic).unwrap();
    let epoch_before = before["epoch"].as_u64().unwrap();
    let widest = active(&before).into_iter().max_by_key(width).unwrap();
    let id = widest["id"].as_u64().unwrap();
    let parent = widest["partition"].as_i64().unwrap() as i32;

    // Freeze for 25 s: longer than the session TTL (10 s; Consul may take up to twice that).
    let frozen_at = Instant::now();
    let frozen = Frozen::stop(inst.pid(frozen_i));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let split_started = Instant::now();
    let (code, split) = inst.call(
        leader,
        "POST",
        &format!("/api/v1/topics/{topic}/shards/{id}/split"),
        Some(json!({})),
    );
    let split_took = split_started.elapsed();
    let rest = Duration::from_secs(25).saturating_sub(frozen_at.elapsed());
    tokio::time::sleep(rest.max(Duration::from_secs(2))).await;
    drop(frozen);
    let frozen_for = frozen_at.elapsed();
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::SeqCst);
    producer.await.unwrap();
    assert_eq!(code, 200, "split during the freeze: {split}");

    // The split's gate and its seal (the leader finishes a pending seal in its loop).
    let mut gate = None;
    eventually(
        "the split's gate is sealed",
        Duration::from_secs(40),
        || {
            let map = inst.map(leader, &topic).unwrap();
            gate = map["gates"].as_array().and_then(|g| {
                g.iter()
                    .find(|g| {
                        g["created_epoch"].as_u64() > Some(epoch_before)
                            && g["after"][0]["partition"].as_i64() == Some(parent as i64)
                            && g["after"][0]["seal_offset"].is_i64()
                    })
                    .cloned()
            });
            gate.is_some()
        },
    );
    let gate = gate.unwrap();
    let child = gate["partition"].as_i64().unwrap() as i32;
    let from = gate["from_offset"].as_i64().unwrap();
    let seal = gate["after"][0]["seal_offset"].as_i64().unwrap();

    let direct: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", format!("{topic}-direct"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut ends = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in [parent, child] {
        ends.insert(
            p,
            direct
                .fetch_watermarks(&topic, p, Duration::from_secs(10))
                .unwrap()
                .1,
        );
        tpl.add_partition_offset(&topic, p, Offset::Beginning)
            .unwrap();
    }
    direct.assign(&tpl).unwrap();
    let mut records: HashMap<i32, Vec<(i64, String)>> = HashMap::new();
    let total: i64 = ends.values().sum();
    let mut read = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while read < total && Instant::now() < deadline {
        if let Some(Ok(m)) = direct.poll(Duration::from_millis(200)) {
            read += 1;
            records.entry(m.partition()).or_default().push((
                m.offset(),
                String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
            ));
        }
    }
    let key = |v: &str| v.rsplit_once(':').unwrap().0.to_string();
    let moved: BTreeSet<String> = records
        .get(&child)
        .map(|r| {
            r.iter()
                .filter(|(o, _)| *o >= from)
                .map(|(_, v)| key(v))
                .collect()
        })
        .unwrap_or_default();
    let behind_seal: Vec<&(i64, String)> = records
        .get(&parent)
        .map(|r| {
            r.iter()
                .filter(|(o, v)| *o >= seal && moved.contains(&key(v)))
                .collect()
        })
        .unwrap_or_default();
    eprintln!(
        "froze instance {} for {:.0}s; split via instance {} took {:.1}s ({code}); acked {}; gate on p{child} from {from} after p{parent} seal {seal} (p{parent} end {:?}); moved keys {}; records of moved keys on p{parent} at/after the seal: {} {:?}",
        frozen_i + 1,
        frozen_for.as_secs_f64(),
        leader + 1,
        split_took.as_secs_f64(),
        acked.lock().unwrap().len(),
        ends.get(&parent),
        moved.len(),
        behind_seal.len(),
        &behind_seal[..behind_seal.len().min(5)]
    );
    assert!(
        behind_seal.is_empty(),
        "{} records of moved keys landed on the parent p{parent} at or after its seal offset {seal} (first {:?})",
        behind_seal.len(),
        behind_seal.first()
    );
}
