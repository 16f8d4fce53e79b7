//! Writes a small seed corpus for the `request_decode` fuzz target: valid request frames
//! (length prefix, header, body) encoded with kafka-protocol, so the fuzzer starts past the
//! header checks, plus bare record batches in every codec for the `decode_batches` path.
//!
//! Usage: `cargo run --release -p shardgate-fuzz-seed -- corpus/request_decode`

use std::path::PathBuf;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, FetchRequest, GroupId, MetadataRequest, OffsetCommitRequest,
    ProduceRequest, RequestHeader, TopicName,
};
use kafka_protocol::protocol::{Encodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

fn frame<T: Encodable>(api: ApiKey, version: i16, correlation_id: i32, body: &T) -> Bytes {
    let header = RequestHeader::default()
        .with_request_api_key(api as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("fuzz-seed")));
    let mut payload = BytesMut::new();
    header
        .encode(&mut payload, api.request_header_version(version))
        .unwrap();
    body.encode(&mut payload, version).unwrap();
    let mut out = BytesMut::with_capacity(4 + payload.len());
    out.put_u32(payload.len() as u32);
    out.put_slice(&payload);
    out.freeze()
}

fn batch(compression: Compression) -> Bytes {
    let records: Vec<Record> = (0..3)
        .map(|i| Record {
            transactional: false,
            control: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i,
            sequence: i as i32,
            timestamp: 1_700_000_000_000 + i,
            key: Some(Bytes::from(format!("key-{i}"))),
            value: Some(Bytes::from(format!("value-{i}-{}", "x".repeat(20)))),
            headers: [(StrBytes::from_static_str("h"), Some(Bytes::from_static(b"v")))]
                .into_iter()
                .collect(),
            delete_horizon: false,
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression,
        },
    )
    .unwrap();
    buf.freeze()
}

fn produce(version: i16, records: Bytes) -> Bytes {
    let body = ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(TopicName(StrBytes::from_static_str("orders")))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(0)
                .with_records(Some(records))])]);
    frame(ApiKey::Produce, version, 3, &body)
}

fn main() {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: shardgate-fuzz-seed <corpus dir>"),
    );
    std::fs::create_dir_all(&dir).unwrap();

    let api_versions = frame(
        ApiKey::ApiVersions,
        3,
        1,
        &ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("fuzz"))
            .with_client_software_version(StrBytes::from_static_str("1.0")),
    );
    let metadata = frame(
        ApiKey::Metadata,
        12,
        2,
        &MetadataRequest::default()
            .with_topics(Some(vec![
                MetadataRequestTopic::default()
                    .with_name(Some(TopicName(StrBytes::from_static_str("orders")))),
            ]))
            .with_allow_auto_topic_creation(false),
    );
    let fetch = frame(
        ApiKey::Fetch,
        12,
        4,
        &FetchRequest::default()
            .with_max_wait_ms(500)
            .with_min_bytes(1)
            .with_max_bytes(1 << 20)
            .with_topics(vec![FetchTopic::default()
                .with_topic(TopicName(StrBytes::from_static_str("orders")))
                .with_partitions(vec![FetchPartition::default()
                    .with_partition(0)
                    .with_fetch_offset(42)
                    .with_partition_max_bytes(1 << 20)])]),
    );
    let offset_commit = frame(
        ApiKey::OffsetCommit,
        8,
        5,
        &OffsetCommitRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("group")))
            .with_generation_id_or_member_epoch(1)
            .with_member_id(StrBytes::from_static_str("member-1"))
            .with_topics(vec![OffsetCommitRequestTopic::default()
                .with_name(TopicName(StrBytes::from_static_str("orders")))
                .with_partitions(vec![OffsetCommitRequestPartition::default()
                    .with_partition_index(0)
                    .with_committed_offset(42)])]),
    );
    // A too-new ApiVersions (the KIP-511 downgrade answer path): the v3 frame with its
    // version field (after the 4-byte length and 2-byte api key) set to 99.
    let mut api_versions_new = BytesMut::from(&api_versions[..]);
    api_versions_new[6..8].copy_from_slice(&99i16.to_be_bytes());
    let api_versions_new = api_versions_new.freeze();

    let mut files: Vec<(String, Bytes)> = vec![
        ("api_versions_v3".into(), api_versions.clone()),
        ("api_versions_v99".into(), api_versions_new),
        ("metadata_v12".into(), metadata.clone()),
        ("fetch_v12".into(), fetch),
        ("offset_commit_v8".into(), offset_commit),
        ("produce_v3_none".into(), produce(3, batch(Compression::None))),
    ];
    for (name, c) in [
        ("none", Compression::None),
        ("gzip", Compression::Gzip),
        ("snappy", Compression::Snappy),
        ("lz4", Compression::Lz4),
        ("zstd", Compression::Zstd),
    ] {
        files.push((format!("produce_v9_{name}"), produce(9, batch(c))));
        files.push((format!("batch_{name}"), batch(c)));
    }
    // A connection's worth of frames back to back.
    let mut stream = BytesMut::new();
    stream.put_slice(&api_versions);
    stream.put_slice(&metadata);
    stream.put_slice(&produce(9, batch(Compression::None)));
    files.push(("stream_api_versions_metadata_produce".into(), stream.freeze()));

    for (name, bytes) in &files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    println!("wrote {} seeds to {}", files.len(), dir.display());
}
