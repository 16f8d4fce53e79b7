//! The fetch path (issue 10): what a consumer costs the brokers and what it gets back. An idle
//! consumer costs no more upstream fetches than its own; a response keeps the client's
//! max_bytes however many brokers its partitions live on; a Java consumer of 1,000 partitions
//! uses incremental fetch sessions (KIP-227) and gets the same records as straight from Kafka;
//! a record on one broker reaches a consumer without waiting for the long-polls of idle ones.
//! Each scenario runs straight to Kafka too, as the control.
//!
//! Ports: 127.0.0.1:29185/29285 (idle consumer), 29186/29286 (fetch sessions).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::{
    ApiKey, BrokerId, FetchRequest, FetchResponse, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable as _, StrBytes};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// The sum of a metric's series (with all `labels`) on the admin HTTP of an instance; None
/// when the instance exports no such series (a metric it does not have, or one never touched
/// yet), so that a missing metric is never read as a zero that passes.
fn series(admin: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let (_, body) = shardgate::admin::http_request(admin, "GET", "/metrics", None)
        .unwrap_or_else(|e| panic!("{admin}/metrics: {e}"));
    let values: Vec<f64> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let s = l.split_whitespace().next().unwrap_or("");
            s.split('{').next() == Some(name) && labels.iter().all(|x| s.contains(x))
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Fetch requests shardgate sent upstream, as its upstream latency histogram counts them (the
/// figure today's binary has; the new path's own counter is `shardgate_upstream_fetches_total`).
fn upstream_fetch_histogram(admin: &str) -> f64 {
    series(
        admin,
        "shardgate_upstream_request_duration_seconds_count",
        &["api=\"Fetch\""],
    )
    .unwrap_or(0.0)
}

fn create_with_assignment(topic: &str, assignment: &str) {
    run_ok(
        Command::new(bin("kafka-topics")).args([
            "--bootstrap-server",
            &kafka(),
            "--create",
            "--topic",
            topic,
            "--replica-assignment",
            assignment,
        ]),
        Duration::from_secs(60),
    );
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

// ---------------------------------------------------------------------------------------
// 1. Idle consumers

/// One consumer of 6 empty partitions on one broker, fetch.wait.max.ms = 500 (about 2 fetches
/// a second of its own), through an instance that serves nobody else. Polling upstream with
/// max_wait 0 until the client's wait runs out costs the broker ~13 fetches per client fetch;
/// one upstream long-poll per client wait costs one.
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn an_idle_consumer_costs_no_more_upstream_fetches_than_its_own() {
    let (client, admin) = ("127.0.0.1:29185", "127.0.0.1:29285");
    let admin_url = format!("http://{admin}");
    let _sg = own_instance("fetch-idle", client, admin, "", "");
    let topic = unique("fetch-idle");
    create_with_assignment(&topic, &["1"; 6].join(","));

    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", client)
        .set("group.id", unique("fetch-idle"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "500")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..6 {
        tpl.add_partition_offset(&topic, p, Offset::End).unwrap();
    }
    c.assign(&tpl).unwrap();
    let poll_for = |d: Duration| {
        let until = Instant::now() + d;
        while Instant::now() < until {
            if let Some(Err(e)) = c.poll(Duration::from_millis(100)) {
                panic!("consumer error: {e}");
            }
        }
    };
    // Warm up: metadata, offsets, the first fetches.
    let own = || series(&admin_url, "shardgate_requests_total", &["api=\"Fetch\""]);
    let warm_until = Instant::now() + Duration::from_secs(20);
    while own().unwrap_or(0.0) < 2.0 {
        assert!(
            Instant::now() < warm_until,
            "the consumer sent no fetches through shardgate within 20 s"
        );
        poll_for(Duration::from_millis(200));
    }
    poll_for(Duration::from_secs(2));

    let upstream = || series(&admin_url, "shardgate_upstream_fetches_total", &[]);
    let (own0, up0, hist0) = (
        own().unwrap(),
        upstream(),
        upstream_fetch_histogram(&admin_url),
    );
    let started = Instant::now();
    poll_for(Duration::from_secs(10));
    let secs = started.elapsed().as_secs_f64();
    let (own1, up1, hist1) = (
        own().unwrap(),
        upstream(),
        upstream_fetch_histogram(&admin_url),
    );
    let own_rate = (own1 - own0) / secs;
    let hist_rate = (hist1 - hist0) / secs;
    println!(
        "idle consumer (6 empty partitions on broker 1, fetch.wait.max.ms 500) over {secs:.1} s: its own fetches {:.0} ({own_rate:.2}/s); upstream fetches: shardgate_upstream_fetches_total {}, upstream latency histogram {:.0} ({hist_rate:.2}/s)",
        own1 - own0,
        match (up0, up1) {
            (_, None) => "not exported".to_string(),
            (a, Some(b)) => format!(
                "{:.0} ({:.2}/s)",
                b - a.unwrap_or(0.0),
                (b - a.unwrap_or(0.0)) / secs
            ),
        },
        hist1 - hist0,
    );
    assert!(
        own1 - own0 >= 5.0,
        "the consumer fetched only {:.0} times in {secs:.1} s",
        own1 - own0
    );
    let Some(up1) = up1 else {
        panic!(
            "shardgate exports no shardgate_upstream_fetches_total; its upstream latency histogram counted {:.0} upstream fetches ({hist_rate:.2}/s) for the consumer's own {:.0} ({own_rate:.2}/s)",
            hist1 - hist0,
            own1 - own0
        );
    };
    let up = up1 - up0.unwrap_or(0.0);
    // One upstream fetch per client fetch, give or take the one in flight at either end of the
    // window.
    assert!(
        up <= own1 - own0 + 1.0,
        "an idle consumer made shardgate send {up:.0} fetches upstream ({:.2}/s) for its own {:.0} ({own_rate:.2}/s)",
        up / secs,
        own1 - own0
    );
}

// ---------------------------------------------------------------------------------------
// 2. max_bytes over several brokers

/// A Fetch v12 (topic names) for `parts` (partition, offset) of `topic`, max_bytes and every
/// partition's max_bytes `max_bytes`, max wait 500 ms, min bytes 1.
fn fetch_v12(topic: &str, parts: &[(i32, i64)], max_bytes: i32) -> FetchRequest {
    FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(500)
        .with_min_bytes(1)
        .with_max_bytes(max_bytes)
        .with_session_id(0)
        .with_session_epoch(-1)
        .with_topics(vec![
            FetchTopic::default()
                .with_topic(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partitions(
                    parts
                        .iter()
                        .map(|&(p, offset)| {
                            FetchPartition::default()
                                .with_partition(p)
                                .with_fetch_offset(offset)
                                .with_partition_max_bytes(max_bytes)
                        })
                        .collect(),
                ),
        ])
}

/// Sends `req` on a fresh connection to `addr`: the response frame's size (length prefix
/// included) and the response.
fn fetch_raw(addr: &str, req: &FetchRequest) -> (usize, FetchResponse) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(&frame(ApiKey::Fetch, 12, 1, req)).unwrap();
    let body = read_frame(&mut s).expect("a fetch answer");
    let size = body.len() + 4;
    let mut b = bytes::Bytes::from(body);
    ResponseHeader::decode(&mut b, ApiKey::Fetch.response_header_version(12)).unwrap();
    (size, FetchResponse::decode(&mut b, 12).unwrap())
}

/// What one partition's records hold: complete batches (bytes, largest, the offset after the
/// last), as a consumer reads them (a trailing partial batch is ignored).
#[derive(Debug, Default, Clone, Copy)]
struct Batches {
    bytes: usize,
    largest: usize,
    next_offset: Option<i64>,
}

fn batches(records: &[u8]) -> Batches {
    let mut out = Batches::default();
    let mut pos = 0;
    while pos + 12 <= records.len() {
        let base = i64::from_be_bytes(records[pos..pos + 8].try_into().unwrap());
        let len = i32::from_be_bytes(records[pos + 8..pos + 12].try_into().unwrap()) as usize;
        let total = 12 + len;
        if pos + total > records.len() || len < 49 {
            break;
        }
        // baseOffset 8, batchLength 4, partitionLeaderEpoch 4, magic 1, crc 4, attributes 2.
        let delta = i32::from_be_bytes(records[pos + 23..pos + 27].try_into().unwrap()) as i64;
        out.bytes += total;
        out.largest = out.largest.max(total);
        out.next_offset = Some(base + delta + 1);
        pos += total;
    }
    out
}

/// (partition, batches) of a response; panics on an error code.
fn partitions(resp: &FetchResponse, who: &str) -> Vec<(i32, Batches)> {
    assert_eq!(resp.error_code, 0, "{who}: fetch error {}", resp.error_code);
    resp.responses
        .iter()
        .flat_map(|t| &t.partitions)
        .map(|p| {
            assert_eq!(
                p.error_code, 0,
                "{who}: partition {} error {}",
                p.partition_index, p.error_code
            );
            (
                p.partition_index,
                batches(p.records.as_deref().unwrap_or_default()),
            )
        })
        .collect()
}

/// A topic of 3 partitions, one led by each broker, ~3 MiB in each (1 KiB records in batches
/// of at most 64 KiB). A raw Fetch through shardgate for all three, max_bytes 1 MiB (and 1 MiB
/// per partition), over a few rounds advancing the offsets: no response may exceed 1 MiB plus
/// one batch (Kafka's rule: the first batch may exceed max_bytes so the consumer progresses)
/// plus the response's headers. Control: each broker, asked for its own partition alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the 3-broker testbed: integration/run-tests"]
async fn a_response_never_exceeds_max_bytes_plus_one_batch() {
    assert!(brokers() >= 3, "needs 3 brokers");
    const RECORDS: usize = 3000;
    const HEADERS: usize = 16 * KIB;
    let topic = unique("fetch-maxbytes");
    create_with_assignment(&topic, "1,2,3");
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("acks", "1")
        .set("linger.ms", "20")
        .set("batch.size", (64 * KIB).to_string())
        .set("compression.type", "none")
        .create()
        .unwrap();
    let filled = Instant::now();
    let value = vec![b'x'; KIB];
    let mut sends = Vec::with_capacity(3 * RECORDS);
    for i in 0..RECORDS {
        for part in 0..3 {
            let key = format!("k{part}-{i}");
            let rec = FutureRecord::to(&topic)
                .partition(part)
                .key(&key)
                .payload(&value);
            sends.push(p.send_result(rec).map_err(|(e, _)| e).expect("queued"));
        }
    }
    for r in futures::future::join_all(sends).await {
        r.expect("delivery reported")
            .map_err(|(e, _)| e)
            .expect("record acknowledged");
    }
    let fill_secs = filled.elapsed().as_secs_f64();

    // Each partition's leader, as Kafka lists it.
    let direct: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let md = direct
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .unwrap();
    let addr_of = |id: i32| {
        md.brokers()
            .iter()
            .find(|b| b.id() == id)
            .map(|b| format!("{}:{}", b.host(), b.port()))
            .unwrap()
    };
    let leaders: Vec<(i32, String)> = md.topics()[0]
        .partitions()
        .iter()
        .map(|p| (p.id(), addr_of(p.leader())))
        .collect();
    assert_eq!(leaders.len(), 3);

    let max = MIB as i32;
    let mut offsets = [0i64; 3];
    let mut largest = 0usize;
    let mut through = Vec::new(); // (round, frame size, per-partition record bytes)
    let mut control = Vec::new(); // (round, partition, frame size)
    for round in 0..3 {
        let parts: Vec<(i32, i64)> = (0..3).map(|p| (p, offsets[p as usize])).collect();
        for (part, addr) in &leaders {
            let (size, resp) = fetch_raw(addr, &fetch_v12(&topic, &[parts[*part as usize]], max));
            for (_, b) in partitions(&resp, "direct") {
                largest = largest.max(b.largest);
            }
            control.push((round, *part, size));
        }
        // Through shardgate; it may need a moment to learn the new topic's leaders.
        let mut tries = 0;
        let (size, got) = loop {
            let (size, resp) = fetch_raw(&proxy(), &fetch_v12(&topic, &parts, max));
            let unknown = resp
                .responses
                .iter()
                .flat_map(|t| &t.partitions)
                .any(|p| p.error_code == 3 || p.error_code == 6);
            if unknown && round == 0 && tries < 20 {
                tries += 1;
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            break (size, partitions(&resp, "shardgate"));
        };
        let mut per_part = [0usize; 3];
        for (part, b) in got {
            largest = largest.max(b.largest);
            per_part[part as usize] = b.bytes;
            if let Some(next) = b.next_offset {
                offsets[part as usize] = next;
            }
        }
        through.push((round, size, per_part));
    }
    let bound = MIB + largest + HEADERS;
    let kib = |b: usize| format!("{:.1} KiB", b as f64 / KIB as f64);
    println!(
        "max_bytes 1 MiB over 3 brokers ({RECORDS} x 1 KiB records per partition, filled in {fill_secs:.1} s); largest batch {}, bound {}",
        kib(largest),
        kib(bound)
    );
    for (round, size, per) in &through {
        println!(
            "  round {round} through shardgate: response {} (complete batches per partition: {}, {}, {})",
            kib(*size),
            kib(per[0]),
            kib(per[1]),
            kib(per[2])
        );
    }
    for (round, part, size) in &control {
        println!(
            "  round {round} direct, partition {part} from its leader: response {}",
            kib(*size)
        );
    }
    for (round, part, size) in &control {
        assert!(
            *size <= bound,
            "control: partition {part}'s leader answered round {round} with {} (bound {})",
            kib(*size),
            kib(bound)
        );
    }
    let carried: usize = through
        .iter()
        .map(|(_, _, per)| per.iter().sum::<usize>())
        .sum();
    assert!(carried > 0, "shardgate's responses carried no records");
    for (round, size, per) in &through {
        assert!(
            *size <= bound,
            "round {round}: shardgate answered a fetch with max_bytes 1 MiB with {} ({} + {} + {} of records from the 3 partitions); bound 1 MiB + largest batch {} + {} headers = {}",
            kib(*size),
            kib(per[0]),
            kib(per[1]),
            kib(per[2]),
            kib(largest),
            kib(HEADERS),
            kib(bound)
        );
    }
}

// ---------------------------------------------------------------------------------------
// 3. Fetch sessions

const SESSION_PARTITIONS: i32 = 1000;
const PER_PARTITION: usize = 10;
/// The Java consumer exits after this long without a record: the idle phase during which a
/// session consumer sends incremental fetches listing nothing.
const IDLE_MS: u64 = 10_000;
/// The idle phase is measured from this long after the last record: by then the consumer has
/// fetched again every partition it drained from its buffer (listing each once, as changed).
const SETTLE: Duration = Duration::from_secs(2);

/// Session metrics of an instance: (full, incremental, sessionless, request partitions,
/// response partitions); None for the series it does not export.
#[derive(Debug, Clone, Copy)]
struct Sessions {
    client_fetches: f64,
    full: Option<f64>,
    incremental: Option<f64>,
    sessionless: Option<f64>,
    req_partitions: Option<f64>,
    resp_partitions: Option<f64>,
}

fn sessions(admin: &str) -> Sessions {
    let kind = |k: &str| {
        series(
            admin,
            "shardgate_fetch_session_requests_total",
            &[&format!("kind=\"{k}\"")],
        )
    };
    let dir = |d: &str| {
        series(
            admin,
            "shardgate_fetch_session_partitions_total",
            &[&format!("direction=\"{d}\"")],
        )
    };
    Sessions {
        client_fetches: series(admin, "shardgate_requests_total", &["api=\"Fetch\""])
            .unwrap_or(0.0),
        full: kind("full"),
        incremental: kind("incremental"),
        sessionless: kind("sessionless"),
        req_partitions: dir("request"),
        resp_partitions: dir("response"),
    }
}

/// later - earlier of an optional counter (a series not yet exported counts as 0 before).
fn delta(earlier: Option<f64>, later: Option<f64>) -> Option<f64> {
    later.map(|l| l - earlier.unwrap_or(0.0))
}

fn show(v: Option<f64>) -> String {
    v.map_or("not exported".to_string(), |v| format!("{v:.0}"))
}

/// Runs the Java console consumer on `topic` in a new group through `bootstrap` until it has
/// had no record for IDLE_MS: its output lines, and `at_end()`'s value (called when the last
/// expected record was printed).
fn java_consume<T: Send + 'static>(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    at_end: impl Fn() -> T + Send + 'static,
) -> (Vec<String>, Option<T>, Duration) {
    let started = Instant::now();
    let mut child = Command::new(bin("kafka-console-consumer"))
        .args(["--bootstrap-server", bootstrap, "--topic", topic])
        .args(["--group", &unique("fetch-sessions")])
        .args(["--from-beginning", "--timeout-ms", &IDLE_MS.to_string()])
        .args(["--property", "print.partition=true"])
        .args(["--property", "print.offset=true"])
        .args(["--property", "print.key=true"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kafka-console-consumer starts");
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        let mut end = None;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            lines.push(line);
            if lines.len() == expected {
                end = Some(at_end());
            }
        }
        (lines, end)
    });
    let limit = Duration::from_secs(180);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kafka-console-consumer via {bootstrap} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (lines, end) = reader.join().unwrap();
    let err = err.join().unwrap();
    assert!(
        lines.len() == expected,
        "kafka-console-consumer via {bootstrap} printed {} records, {expected} expected; stderr:\n{err}",
        lines.len()
    );
    (lines, end, started.elapsed())
}

/// 1,000 partitions of 10 records each, read by Kafka's Java console consumer (which uses
/// fetch sessions when the broker offers them) once straight from Kafka and once through an
/// instance that serves nobody else: the same records, and through shardgate incremental
/// fetches that list only what changed — in the idle phase after the last record, nothing.
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn a_java_consumer_of_1000_partitions_uses_incremental_fetch_sessions() {
    let (client, admin) = ("127.0.0.1:29186", "127.0.0.1:29286");
    let admin_url = format!("http://{admin}");
    let _sg = own_instance("fetch-sessions", client, admin, "", "");
    let topic = unique("fetch-sessions");
    run_ok(
        Command::new(bin("kafka-topics")).args([
            "--bootstrap-server",
            &kafka(),
            "--create",
            "--topic",
            &topic,
            "--partitions",
            &SESSION_PARTITIONS.to_string(),
            "--replication-factor",
            "1",
        ]),
        Duration::from_secs(120),
    );
    let produced = Instant::now();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let p: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", kafka())
            .set("acks", "1")
            .set("linger.ms", "5")
            .create()
            .unwrap();
        let mut sends = Vec::new();
        for part in 0..SESSION_PARTITIONS {
            for i in 0..PER_PARTITION {
                let (key, value) = (format!("k{part}-{i}"), format!("v{part}-{i}"));
                let rec = FutureRecord::to(&topic)
                    .partition(part)
                    .key(&key)
                    .payload(&value);
                sends.push(p.send_result(rec).map_err(|(e, _)| e).expect("queued"));
            }
        }
        for r in futures::future::join_all(sends).await {
            r.expect("delivery reported")
                .map_err(|(e, _)| e)
                .expect("record acknowledged");
        }
    });
    let produce_secs = produced.elapsed().as_secs_f64();
    let expected = SESSION_PARTITIONS as usize * PER_PARTITION;

    let (mut direct, _, direct_took) = java_consume(&kafka(), &topic, expected, || ());
    let before = sessions(&admin_url);
    let at_end = {
        let admin_url = admin_url.clone();
        move || {
            std::thread::sleep(SETTLE);
            sessions(&admin_url)
        }
    };
    let (mut through, caught_up, through_took) = java_consume(client, &topic, expected, at_end);
    let after = sessions(&admin_url);
    let caught_up = caught_up.expect("the last record was printed");
    direct.sort();
    through.sort();
    let same = direct == through;
    let differing = direct
        .iter()
        .zip(&through)
        .find(|(a, b)| a != b)
        .map(|(a, b)| format!("direct {a:?} vs shardgate {b:?}"));

    let incremental = delta(before.incremental, after.incremental);
    let req = delta(before.req_partitions, after.req_partitions);
    let resp = delta(before.resp_partitions, after.resp_partitions);
    let idle_incremental = delta(caught_up.incremental, after.incremental);
    let idle_req = delta(caught_up.req_partitions, after.req_partitions);
    let idle_resp = delta(caught_up.resp_partitions, after.resp_partitions);
    let mean = |parts: Option<f64>, n: Option<f64>| match (parts, n) {
        (Some(p), Some(n)) if n > 0.0 => Some(p / n),
        _ => None,
    };
    let show_mean = |m: Option<f64>| m.map_or("n/a".to_string(), |m| format!("{m:.1}"));
    println!(
        "{expected} records on {SESSION_PARTITIONS} partitions (produced in {produce_secs:.1} s); Java console consumer direct {direct_took:.1?}, through shardgate {through_took:.1?} (each ending with {IDLE_MS} ms idle); same records: {same}"
    );
    println!(
        "  through shardgate, whole run: {:.0} client fetches; by session kind: full {}, incremental {}, sessionless {}; partitions in incremental requests {} (mean {}), in their responses {} (mean {})",
        after.client_fetches - before.client_fetches,
        show(delta(before.full, after.full)),
        show(incremental),
        show(delta(before.sessionless, after.sessionless)),
        show(req),
        show_mean(mean(req, incremental)),
        show(resp),
        show_mean(mean(resp, incremental)),
    );
    println!(
        "  idle phase ({SETTLE:?} after the last record until exit): {:.0} client fetches, incremental {}; partitions in incremental requests {} (mean {}), in their responses {} (mean {})",
        after.client_fetches - caught_up.client_fetches,
        show(idle_incremental),
        show(idle_req),
        show_mean(mean(idle_req, idle_incremental)),
        show(idle_resp),
        show_mean(mean(idle_resp, idle_incremental)),
    );

    assert!(
        same,
        "the Java consumer read different records through shardgate: {} vs {} lines, first difference {}",
        through.len(),
        direct.len(),
        differing.unwrap_or_default()
    );
    let Some(incremental) = incremental.filter(|n| *n > 0.0) else {
        panic!(
            "no incremental fetch session request through shardgate (incremental {}; full {}, sessionless {}; {:.0} client fetches)",
            show(incremental),
            show(delta(before.full, after.full)),
            show(delta(before.sessionless, after.sessionless)),
            after.client_fetches - before.client_fetches
        );
    };
    let req =
        req.expect("shardgate_fetch_session_partitions_total{direction=\"request\"} exported");
    let whole = req / incremental;
    // A sessionless consumer lists all 1,000 in every fetch. With a session, the Java consumer
    // lists a partition when it changed: when it is added back to the session after its
    // buffered records were consumed (it leaves the session while they are buffered), i.e.
    // each partition once or twice over the run, spread over ~30 fetches. The idle phase below
    // is the sharp check.
    assert!(
        whole < 200.0,
        "incremental fetches listed {whole:.1} of the {SESSION_PARTITIONS} partitions on average ({req:.0} in {incremental:.0})"
    );
    let idle_incremental = idle_incremental.unwrap_or(0.0);
    assert!(
        idle_incremental >= 3.0,
        "only {idle_incremental:.0} incremental fetches in the idle phase ({IDLE_MS} ms less {SETTLE:?})"
    );
    let idle_req = idle_req.unwrap_or(0.0) / idle_incremental;
    let idle_resp = idle_resp
        .expect("shardgate_fetch_session_partitions_total{direction=\"response\"} exported")
        / idle_incremental;
    assert!(
        idle_req < 10.0 && idle_resp < 10.0,
        "idle incremental fetches listed {idle_req:.1} partitions and were answered with {idle_resp:.1} on average: a session sends and receives only what changed"
    );
}

// ---------------------------------------------------------------------------------------
// 4. No waiting for idle brokers

/// (latency of each record, produced at 100 ms intervals to partition 0 of `topic`, as seen
/// by a consumer of all 3 partitions through `bootstrap` with fetch.wait.max.ms = 2000).
async fn latency_scenario(bootstrap: &str, topic: &str, label: &str) -> Vec<Duration> {
    const RECORDS: usize = 50;
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (bootstrap, topic, stop, ready) = (
            bootstrap.to_string(),
            topic.to_string(),
            stop.clone(),
            ready.clone(),
        );
        let label = label.to_string();
        std::thread::spawn(move || {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", unique("fetch-latency"))
                .set("enable.auto.commit", "false")
                .set("fetch.wait.max.ms", "2000")
                .create()
                .unwrap();
            let mut tpl = TopicPartitionList::new();
            for p in 0..3 {
                tpl.add_partition_offset(&topic, p, Offset::End).unwrap();
            }
            c.assign(&tpl).unwrap();
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match c.poll(Duration::from_millis(50)) {
                    Some(Ok(m)) => {
                        let at = now_micros();
                        let payload = std::str::from_utf8(m.payload().unwrap()).unwrap();
                        if payload == "warm" {
                            ready.store(true, Ordering::Relaxed);
                            continue;
                        }
                        let sent: u64 = payload.parse().unwrap();
                        out.push(Duration::from_micros(at.saturating_sub(sent)));
                        if out.len() == RECORDS {
                            break;
                        }
                    }
                    Some(Err(e)) => panic!("{label}: consumer error: {e}"),
                    None => {}
                }
            }
            out
        })
    };
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("acks", "1")
        .set("linger.ms", "0")
        .create()
        .unwrap();
    // Until the consumer gets a record (it starts at the end offsets once it has them).
    let started = Instant::now();
    while !ready.load(Ordering::Relaxed) {
        assert!(
            started.elapsed() < Duration::from_secs(30) && !consumer.is_finished(),
            "{label}: the consumer received nothing within 30 s"
        );
        p.send(
            FutureRecord::<(), _>::to(topic)
                .partition(0)
                .payload("warm"),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("delivered");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A few long-polls in, so the consumer is in its steady state.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut next = Instant::now();
    for _ in 0..RECORDS {
        let v = now_micros().to_string();
        p.send(
            FutureRecord::<(), _>::to(topic).partition(0).payload(&v),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("delivered");
        next += Duration::from_millis(100);
        tokio::time::sleep_until(next.into()).await;
    }
    let waited = Instant::now();
    while !consumer.is_finished() && waited.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let got = consumer.join().unwrap();
    assert_eq!(
        got.len(),
        RECORDS,
        "{label}: the consumer received {} of {RECORDS} records",
        got.len()
    );
    got
}

fn percentile(v: &[Duration], pct: usize) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[(v.len() * pct / 100).min(v.len() - 1)]
}

/// A consumer of 3 partitions, one on each broker, through shardgate with fetch.wait.max.ms
/// 2000; one record every 100 ms to partition 0 only (produced straight to Kafka, so no
/// produce through shardgate can wake the fetch). The record must not wait for the long-polls
/// of the two idle brokers: end-to-end p50 well below the 2 s wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the 3-broker testbed: integration/run-tests"]
async fn a_consumer_over_three_brokers_gets_data_without_waiting_for_idle_ones() {
    assert!(brokers() >= 3, "needs 3 brokers");
    let topic = unique("fetch-latency");
    create_with_assignment(&topic, "1,2,3");
    let direct = latency_scenario(&kafka(), &topic, "direct").await;
    let through = latency_scenario(&proxy(), &topic, "shardgate").await;
    let (d50, d99) = (percentile(&direct, 50), percentile(&direct, 99));
    let (s50, s99) = (percentile(&through, 50), percentile(&through, 99));
    println!(
        "one record per 100 ms to partition 0 (broker 1) of 3, fetch.wait.max.ms 2000: produce-to-consume p50 {s50:.1?}, p99 {s99:.1?} through shardgate; direct p50 {d50:.1?}, p99 {d99:.1?}"
    );
    assert!(
        s50 < Duration::from_millis(300),
        "through shardgate a record took {s50:.1?} (p50; p99 {s99:.1?}) to reach a consumer whose other partitions are idle; direct p50 {d50:.1?}"
    );
}
