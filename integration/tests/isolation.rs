//! One client never stalls or breaks another through shardgate's upstream sockets. A broker
//! reads one request per socket at a time: a request it holds (acks=all waiting for a paused
//! follower) must not delay other clients' requests, and a body it cannot parse (it closes the
//! socket) must not fail theirs. Each scenario runs the same load straight to Kafka as the
//! control.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

fn create(topic: &str, assignment: &str) {
    create_topic_direct(
        topic,
        &[
            "--replica-assignment",
            assignment,
            "--config",
            "min.insync.replicas=1",
        ],
    );
}

fn producer(bootstrap: &str, client_id: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("client.id", client_id)
        .set("acks", "all")
        .set("linger.ms", "0")
        .set("max.in.flight", "1")
        .set("message.timeout.ms", "60000")
        .create()
        .unwrap()
}

/// Sends one record at a time until `stop`, returning (sent at, latency) of each.
async fn one_at_a_time(
    p: FutureProducer,
    topic: String,
    stop: Arc<AtomicBool>,
) -> Vec<(Instant, Duration)> {
    let mut out = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let v = format!("v{i}");
        let started = Instant::now();
        p.send(
            FutureRecord::<(), _>::to(&topic).payload(&v),
            Duration::from_secs(60),
        )
        .await
        .expect("delivered");
        out.push((started, started.elapsed()));
        i += 1;
    }
    out
}

fn p99(mut v: Vec<Duration>) -> Duration {
    assert!(!v.is_empty(), "no samples");
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

/// Y's p99 before and during a 5 s pause of broker 2, while X produces to a topic replicated
/// on brokers 1+2 and Y to a topic on broker 1 alone, both acks=all, through `bootstrap`.
async fn pause_scenario(bootstrap: &str, label: &str) -> (Duration, Duration, Duration) {
    let (a, b) = (unique("iso-a"), unique("iso-b"));
    create(&a, "1:2");
    create(&b, "1");
    let x = producer(bootstrap, &format!("{label}-x"));
    let y = producer(bootstrap, &format!("{label}-y"));
    // Warm up: metadata, connections, producer ids.
    for (p, t) in [(&x, &a), (&y, &b)] {
        p.send(
            FutureRecord::<(), _>::to(t).payload("warm"),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let xs = tokio::spawn(one_at_a_time(x, a, stop.clone()));
    let ys = tokio::spawn(one_at_a_time(y, b, stop.clone()));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let paused_at = Instant::now();
    let frozen = Frozen::stop(Frozen::pid_of("kafka-2.pid"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let resumed_at = Instant::now();
    drop(frozen);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let x_samples = xs.await.unwrap();
    let y_samples = ys.await.unwrap();
    let before: Vec<Duration> = y_samples
        .iter()
        .filter(|(at, _)| *at < paused_at)
        .map(|(_, d)| *d)
        .collect();
    let during: Vec<Duration> = y_samples
        .iter()
        .filter(|(at, _)| *at >= paused_at && *at < resumed_at)
        .map(|(_, d)| *d)
        .collect();
    let x_max = x_samples.iter().map(|(_, d)| *d).max().unwrap_or_default();
    let (pb, pd) = (p99(before.clone()), p99(during.clone()));
    eprintln!(
        "{label}: Y (topic on broker 1 only) p99 {pb:?} before ({} samples), {pd:?} while broker 2 was paused ({} samples); X (topic on brokers 1+2) slowest {x_max:?}",
        before.len(),
        during.len()
    );
    (pb, pd, x_max)
}

/// A shardgate of the test's own with `upstream` lines added to its `[upstream]` section.
fn own_instance(name: &str, client: &str, admin: &str, upstream: &str) -> Shardgate {
    common::own_instance(name, client, admin, upstream, "")
}

/// One shared upstream connection per broker, so two clients surely share one wherever
/// requests are pooled (with several, whether two clients share depends on their connection
/// ids).
fn one_socket_per_broker(name: &str, client: &str, admin: &str) -> Shardgate {
    own_instance(name, client, admin, "connections_per_broker = 1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the 3-broker testbed: integration/run-tests"]
async fn a_request_the_broker_holds_delays_no_other_client() {
    assert!(brokers() >= 3, "needs 3 brokers");
    let (client, admin) = ("127.0.0.1:29198", "127.0.0.1:29298");
    let _sg = one_socket_per_broker("iso-pause", client, admin);
    let (direct_before, direct_during, direct_x) = pause_scenario(&kafka(), "direct").await;
    let (before, during, x) = pause_scenario(client, "shardgate").await;
    assert!(
        direct_x >= Duration::from_secs(2) && x >= Duration::from_secs(2),
        "the pause must hold X's acks=all produce (direct {direct_x:?}, shardgate {x:?})"
    );
    // Within 2x of Y's own p99 before the pause (plus 10 ms for this 2-core machine's jitter).
    let limit = before * 2 + Duration::from_millis(10);
    assert!(
        during <= limit,
        "Y waited behind X: p99 {during:?} while paused vs {before:?} before (limit {limit:?}); straight to Kafka {direct_during:?} vs {direct_before:?}"
    );
}

/// A client whose admin request body the broker cannot parse (the broker closes that socket)
/// while 20 clients produce: none of them sees an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the testbed: integration/run-tests"]
async fn an_undecodable_admin_request_breaks_no_other_client() {
    use kafka_protocol::messages::ApiKey;
    let (client, admin) = ("127.0.0.1:29199", "127.0.0.1:29299");
    let _sg = one_socket_per_broker("iso-hostile", client, admin);
    let topic = unique("iso-hostile");
    create_topic(&topic, 3);
    let stop = Arc::new(AtomicBool::new(false));
    let mut producers = Vec::new();
    for n in 0..20 {
        let p: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", client)
            .set("client.id", format!("iso-producer-{n}"))
            .set("acks", "all")
            .set("retries", "0")
            .set("message.timeout.ms", "20000")
            .create()
            .unwrap();
        let (topic, stop) = (topic.clone(), stop.clone());
        producers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match p
                    .send(
                        FutureRecord::<(), _>::to(&topic).payload("x"),
                        Duration::from_secs(20),
                    )
                    .await
                {
                    Ok(_) => ok += 1,
                    Err((e, _)) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // CreateTopics v7 whose body is garbage after a valid header: shardgate forwards admin
    // APIs to any broker, which cannot parse it and closes the socket it came on.
    let mut hostile = 0;
    for i in 0..20 {
        let mut s = TcpStream::connect(client).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut f = frame(
            ApiKey::CreateTopics,
            7,
            i,
            &kafka_protocol::messages::CreateTopicsRequest::default(),
        );
        // Replace the body with bytes that claim a huge compact array.
        f.truncate(f.len().saturating_sub(3));
        f.extend_from_slice(&[0xff, 0xff, 0xff, 0x7f, 0x01]);
        let len = (f.len() - 4) as u32;
        f[..4].copy_from_slice(&len.to_be_bytes());
        let _ = s.write_all(&f);
        let _ = read_frame(&mut s);
        hostile += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for p in producers {
        let (ok, failed) = p.await.unwrap();
        assert!(failed.is_empty(), "a producer saw errors: {failed:?}");
        total += ok;
    }
    eprintln!(
        "{hostile} undecodable admin requests; 20 producers delivered {total} records, 0 errors"
    );
    assert!(total > 0);
}

/// An upstream socket that stops answering (its broker paused with `kill -STOP`: the socket
/// stays open, nothing comes back) is taken out of service when a request on it times out,
/// and the next request goes on a fresh connection once the broker answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the 3-broker testbed: integration/run-tests"]
async fn a_socket_that_stops_answering_is_replaced_within_the_request_timeout() {
    assert!(brokers() >= 3, "needs 3 brokers");
    let topic = unique("iso-stuck");
    create(&topic, "1");
    let (client, admin) = ("127.0.0.1:29197", "127.0.0.1:29297");
    let _sg = own_instance("iso-stuck", client, admin, "request_timeout_ms = 3000");
    let closed = || {
        let (_, body) =
            shardgate::admin::http_request(&format!("http://{admin}"), "GET", "/metrics", None)
                .unwrap();
        body.lines()
            .find(|l| l.starts_with("shardgate_upstream_timeouts_closed_total"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", client)
        .set("acks", "1")
        .set("message.timeout.ms", "60000")
        .create()
        .unwrap();
    let send = |v: &'static str| {
        let (p, topic) = (p.clone(), topic.clone());
        async move {
            p.send(
                FutureRecord::<(), _>::to(&topic).payload(v),
                Duration::from_secs(60),
            )
            .await
        }
    };
    send("before").await.expect("delivered before the pause");
    let before = closed();
    let frozen = Frozen::stop(Frozen::pid_of("kafka-1.pid"));
    let paused = Instant::now();
    let during = tokio::spawn(send("during"));
    eventually(
        "the stuck socket is closed",
        Duration::from_secs(10),
        || closed() > before,
    );
    let detected = paused.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(frozen);
    during
        .await
        .unwrap()
        .expect("the record sent during the pause is delivered after it (client retry)");
    send("after").await.expect("delivered after the pause");
    eprintln!(
        "stuck socket closed {detected:?} after the broker stopped answering (request timeout 3 s)"
    );
    assert!(detected < Duration::from_secs(6), "{detected:?}");
}

/// Y's latencies (sent at, latency) before and while X, whose client id has a produce quota
/// upstream, produces as fast as it can; both acks=1 to topics on broker 1, through
/// `bootstrap`. Kafka answers a client over its quota at once and then mutes the *socket* for
/// the throttle time (KIP-219).
async fn throttle_scenario(bootstrap: &str, label: &str) -> (Duration, Duration, u64) {
    let (a, b) = (unique("iso-quota-x"), unique("iso-quota-y"));
    create(&a, "1");
    create(&b, "1");
    let x_id = unique(&format!("{label}-quota-x"));
    run_ok(
        std::process::Command::new(bin("kafka-configs")).args([
            "--bootstrap-server",
            &kafka(),
            "--alter",
            "--add-config",
            "producer_byte_rate=50000",
            "--entity-type",
            "clients",
            "--entity-name",
            &x_id,
        ]),
        Duration::from_secs(60),
    );
    if label != "direct" {
        // shardgate reads the client quotas every 10 s: let it see X's.
        tokio::time::sleep(Duration::from_secs(11)).await;
    }
    let x: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("client.id", &x_id)
        .set("acks", "1")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "20000")
        .create()
        .unwrap();
    let y: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("client.id", unique(&format!("{label}-quota-y")))
        .set("acks", "1")
        .set("linger.ms", "0")
        .set("max.in.flight", "1")
        .set("message.timeout.ms", "60000")
        .create()
        .unwrap();
    y.send(
        FutureRecord::<(), _>::to(&b).payload("warm"),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let ys = {
        let (y, b, stop) = (y.clone(), b.clone(), stop.clone());
        tokio::spawn(async move {
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                y.send(
                    FutureRecord::<(), _>::to(&b).payload("y"),
                    Duration::from_secs(60),
                )
                .await
                .expect("delivered");
                out.push((started, started.elapsed()));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            out
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let x_started = Instant::now();
    // X: 10 KiB records as fast as the producer takes them, for 8 s (far over 50 KB/s).
    let payload = vec![b'x'; 10 * 1024];
    let mut x_waits = Vec::new();
    while x_started.elapsed() < Duration::from_secs(8) {
        match x.send_result(FutureRecord::<(), _>::to(&a).payload(&payload)) {
            Ok(f) => x_waits.push(f),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
        if x_waits.len() % 50 == 0 {
            tokio::task::yield_now().await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let samples = ys.await.unwrap();
    // Most of X's records are still queued behind its quota: drop them.
    rdkafka::producer::Producer::purge(
        &x,
        rdkafka::producer::PurgeConfig::default().queue().inflight(),
    );
    drop(x);
    let before: Vec<Duration> = samples
        .iter()
        .filter(|(at, _)| *at < x_started)
        .map(|(_, d)| *d)
        .collect();
    let during: Vec<Duration> = samples
        .iter()
        .filter(|(at, _)| *at >= x_started)
        .map(|(_, d)| *d)
        .collect();
    let (pb, pd) = (p99(before.clone()), p99(during.clone()));
    let throttled = shardgate_throttle_count(label);
    eprintln!(
        "{label}: Y p99 {pb:?} before ({} samples), {pd:?} while throttled X produced ({} samples); X queued {} records",
        before.len(),
        during.len(),
        x_waits.len()
    );
    (pb, pd, throttled)
}

fn shardgate_throttle_count(label: &str) -> u64 {
    if label == "direct" {
        return 0;
    }
    let (_, body) =
        shardgate::admin::http_request("http://127.0.0.1:29295", "GET", "/metrics", None).unwrap();
    body.lines()
        .find(|l| l.starts_with("shardgate_throttled_answers_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// A client over its Kafka quota: the broker mutes the socket its answer went on for the
/// throttle time. On a shared upstream socket that would stall every client on it; shardgate
/// moves a throttled client to sockets of its own (draining its in-flight produces first, so
/// its batches keep their order), so another client's latency holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the testbed: integration/run-tests"]
async fn a_throttled_client_mutes_no_other_client() {
    let (client, admin) = ("127.0.0.1:29195", "127.0.0.1:29295");
    let _sg = one_socket_per_broker("iso-quota", client, admin);
    let (direct_before, direct_during, _) = throttle_scenario(&kafka(), "direct").await;
    let (before, during, throttled) = throttle_scenario(client, "shardgate").await;
    assert!(
        throttled > 0,
        "upstream never throttled X: the scenario did not provoke a quota"
    );
    let limit = before * 2 + Duration::from_millis(20);
    assert!(
        during <= limit,
        "Y waited behind the throttled X's muted socket: p99 {during:?} vs {before:?} before (limit {limit:?}); straight to Kafka {direct_during:?} vs {direct_before:?}"
    );
}

/// Five consumers long-poll an empty topic (fetch.wait.max.ms 5000) while Y produces acks=1 one
/// record at a time, on an instance with one shared upstream socket per broker: the long-polls
/// must not sit on the socket Y's produces share (they would hold Y up to 5 s each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the testbed: integration/run-tests"]
async fn a_fetch_long_poll_delays_no_other_client() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let (client, admin) = ("127.0.0.1:29187", "127.0.0.1:29287");
    let _sg = one_socket_per_broker("iso-longpoll", client, admin);
    let (idle, busy) = (unique("iso-idle"), unique("iso-busy"));
    // One idle partition per consumer: consumers of the same partition would share one
    // long-poll upstream (prefetch's shared reads), and this test wants five.
    create(&idle, "1,1,1,1,1");
    create(&busy, "1");
    let upstream_fetches = || {
        let (_, body) =
            shardgate::admin::http_request(&format!("http://{admin}"), "GET", "/metrics", None)
                .unwrap();
        body.lines()
            .find(|l| l.starts_with("shardgate_upstream_fetches_total"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let stop = Arc::new(AtomicBool::new(false));
    let consumers: Vec<_> = (0..5)
        .map(|i| {
            let (idle, stop) = (idle.clone(), stop.clone());
            std::thread::spawn(move || {
                let c: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", client)
                    .set("group.id", unique(&format!("iso-idle-{i}")))
                    .set("fetch.wait.max.ms", "5000")
                    .create()
                    .unwrap();
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&idle, i, Offset::End).unwrap();
                c.assign(&tpl).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let _ = c.poll(Duration::from_millis(100));
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await; // the consumers are long-polling
    let fetches_before = upstream_fetches();
    let y: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", client)
        .set("client.id", "iso-longpoll-y")
        .set("acks", "1")
        .set("linger.ms", "0")
        .set("message.timeout.ms", "60000")
        .create()
        .unwrap();
    let y_stop = Arc::new(AtomicBool::new(false));
    let sender = tokio::spawn(one_at_a_time(y, busy.clone(), y_stop.clone()));
    tokio::time::sleep(Duration::from_secs(8)).await;
    y_stop.store(true, Ordering::Relaxed);
    let samples: Vec<Duration> = sender.await.unwrap().into_iter().map(|(_, d)| d).collect();
    let polls = upstream_fetches() - fetches_before;
    stop.store(true, Ordering::Relaxed);
    for c in consumers {
        c.join().unwrap();
    }
    let (n, worst) = (samples.len(), *samples.iter().max().unwrap());
    let p = p99(samples);
    println!(
        "5 consumers long-polling (5 s) beside Y: {polls} upstream fetches in 8 s; Y acks=1 p99 {p:?}, slowest {worst:?} over {n} records"
    );
    assert!(
        polls >= 5.0,
        "the consumers were not long-polling ({polls} upstream fetches)"
    );
    assert!(
        worst < Duration::from_secs(1),
        "Y waited behind a long-poll: slowest produce {worst:?} (p99 {p:?})"
    );
}
