//! Producer idempotence on managed topics, with hand-made produce requests so that a client
//! retry is exact: the same batch (producer id, epoch, base sequence) sent twice is answered
//! from shardgate's memory and written once, whether it went to one partition or several.

mod common;

use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, ProduceRequest, ProduceResponse, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, StrBytes};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::json;
use shardgate::protocol::records::{BatchInfo, Record, encode_batch};

const PRODUCE_VERSION: i16 = 9;

/// One batch of an idempotent client producer: `keys[i]` with value "<key>:<seq+i>".
fn batch(producer_id: i64, base_sequence: i32, keys: &[String]) -> Bytes {
    let records: Vec<Record> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| Record {
            attributes: 0,
            timestamp: 1_700_000_000_000 + i as i64,
            key: Some(Bytes::from(k.clone())),
            value: Some(Bytes::from(format!("{k}:{}", base_sequence + i as i32))),
            headers: vec![],
        })
        .collect();
    let refs: Vec<&Record> = records.iter().collect();
    encode_batch(
        &refs,
        &BatchInfo {
            attributes: 0,
            producer_id,
            producer_epoch: 0,
            base_sequence,
            partition_leader_epoch: -1,
            records: keys.len() as i32,
        },
    )
    .unwrap()
}

/// Sends one produce request for client partition 0 and returns (error code, base offset).
fn produce(s: &mut TcpStream, topic: &str, correlation_id: i32, records: Bytes) -> (i16, i64) {
    use std::io::Write;
    let req = ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![
            TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partition_data(vec![
                    PartitionProduceData::default()
                        .with_index(0)
                        .with_records(Some(records)),
                ]),
        ]);
    s.write_all(&frame(
        ApiKey::Produce,
        PRODUCE_VERSION,
        correlation_id,
        &req,
    ))
    .unwrap();
    let mut buf = Bytes::from(read_frame(s).unwrap());
    let header = ResponseHeader::decode(
        &mut buf,
        ApiKey::Produce.response_header_version(PRODUCE_VERSION),
    )
    .unwrap();
    assert_eq!(header.correlation_id, correlation_id);
    let resp = ProduceResponse::decode(&mut buf, PRODUCE_VERSION).unwrap();
    let p = &resp.responses[0].partition_responses[0];
    (p.error_code, p.base_offset)
}

/// Records stored upstream: the sum of the partitions' high watermarks, read from Kafka.
fn stored(topic: &str, partitions: i32) -> i64 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    (0..partitions)
        .map(|p| {
            c.fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap()
                .1
        })
        .sum()
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn a_retried_batch_is_answered_from_memory_and_written_once() {
    let topic = unique("idem");
    let (code, body) = admin_post(
        "/api/v1/topics",
        &json!({"name": topic, "route_by": ["key"], "initial_shards": 3, "pool": 4,
                "replication_factor": rf(), "autoscale": {"enabled": false}}),
    );
    assert_eq!(code, 201, "{body}");
    let mut s = TcpStream::connect(proxy()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let answered_before = metric("shardgate_produce_retries_answered_total", &[]);

    // One key: the batch lands on one partition and gets its real offset, on the retry too.
    let one_key = vec!["solo".to_string(); 10];
    let first = batch(4242, 0, &one_key);
    let (code, offset) = produce(&mut s, &topic, 1, first.clone());
    assert_eq!(code, 0);
    assert!(offset >= 0, "a batch on one partition gets its offset");
    assert_eq!(produce(&mut s, &topic, 2, first), (0, offset), "the retry");
    // The next batch of that producer follows it.
    let (code, next) = produce(&mut s, &topic, 3, batch(4242, 10, &one_key));
    assert_eq!((code, next), (0, offset + 10));

    // Many keys: spread over the shards, offset -1, and the retry is not written again.
    let keys: Vec<String> = (0..100).map(|i| format!("k-{i}")).collect();
    let spread = batch(4343, 0, &keys);
    assert_eq!(produce(&mut s, &topic, 4, spread.clone()), (0, -1));
    assert_eq!(produce(&mut s, &topic, 5, spread), (0, -1), "the retry");

    assert_eq!(stored(&topic, 4), 120, "each record stored once");
    assert!(
        metric("shardgate_produce_retries_answered_total", &[]) - answered_before >= 2.0,
        "both retries answered from memory"
    );
}
