//! A broker dies in the middle of produce and consume: clients through shardgate keep going
//! and no acknowledged record is lost. Runs last and alone (it kills broker 2 of the 3-broker
//! testbed, then restarts it and waits until its replicas are back in sync).

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};

fn testbed(args: &[&str]) {
    run_ok(
        Command::new(repo().join("integration/testbed")).args(args),
        Duration::from_secs(180),
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the 3-broker testbed: integration/run-tests"]
async fn killing_a_broker_mid_produce_loses_no_acknowledged_record() {
    assert_eq!(brokers(), 3, "this test needs the 3-broker testbed");
    let topic = unique("failover");
    create_topic(&topic, 6);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", proxy())
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "120000")
        .create()
        .unwrap();

    // Produce continuously; kill broker 2 after a while; keep producing; restart it.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let prod = {
        let (stop, acked, failed, topic) =
            (stop.clone(), acked.clone(), failed.clone(), topic.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            let mut inflight = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let p = producer.clone();
                let t = topic.clone();
                let (acked, failed) = (acked.clone(), failed.clone());
                inflight.push(tokio::spawn(async move {
                    let v = format!("r-{i}");
                    match p
                        .send(
                            FutureRecord::to(&t)
                                .key(&format!("k-{}", i % 100))
                                .payload(&v),
                            Duration::from_secs(120),
                        )
                        .await
                    {
                        Ok(_) => {
                            acked.lock().unwrap().insert(v);
                        }
                        Err((e, _)) => failed.lock().unwrap().push(format!("{v}: {e}")),
                    }
                }));
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            for h in inflight {
                let _ = h.await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before_kill = acked.lock().unwrap().len();
    tokio::task::spawn_blocking(|| testbed(&["kill-broker", "2"]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let during = acked.lock().unwrap().len();
    tokio::task::spawn_blocking(|| testbed(&["start-broker", "2"]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    prod.await.unwrap();

    let acked = acked.lock().unwrap().clone();
    let failed = failed.lock().unwrap().clone();
    assert!(
        before_kill > 100,
        "produced only {before_kill} records before the kill"
    );
    assert!(
        acked.len() > during,
        "producing did not continue after the broker came back"
    );
    assert!(
        during > before_kill,
        "producing stalled while broker 2 was down ({before_kill} -> {during})"
    );
    eprintln!(
        "acked {} records ({} before the kill, {} failed deliveries)",
        acked.len(),
        before_kill,
        failed.len()
    );

    // Every acknowledged record can be read back through shardgate.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", proxy())
        .set("group.id", unique("g-failover"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline && !acked.is_subset(&seen) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) {
            seen.insert(String::from_utf8_lossy(m.payload().unwrap()).into_owned());
        }
    }
    let lost: Vec<_> = acked.difference(&seen).take(10).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged records lost, e.g. {lost:?}",
        acked.difference(&seen).count()
    );
}
