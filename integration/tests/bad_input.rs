//! Bad input through a real shardgate in front of real Kafka: every kind of broken client
//! gets an error answer or a closed connection, is counted, and never disturbs other clients.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use common::*;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, MetadataRequest, RequestHeader, ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

fn connect() -> TcpStream {
    let s = TcpStream::connect(proxy()).expect("shardgate reachable");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// The peer closed the connection (EOF or reset) within the read timeout.
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1024];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// A well-behaved client still gets answers: ApiVersions over a raw socket, and a metadata
/// round trip with librdkafka.
fn still_serving() {
    let mut s = connect();
    s.write_all(&frame(
        ApiKey::ApiVersions,
        3,
        7,
        &ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("t"))
            .with_client_software_version(StrBytes::from_static_str("1")),
    ))
    .unwrap();
    let resp = read_frame(&mut s).expect("ApiVersions answer");
    let mut b = bytes::Bytes::from(resp);
    let h = ResponseHeader::decode(&mut b, 0).unwrap();
    assert_eq!(h.correlation_id, 7);
    let r = ApiVersionsResponse::decode(&mut b, 3).unwrap();
    assert_eq!(r.error_code, 0);
    assert!(
        r.api_keys
            .iter()
            .any(|k| k.api_key == ApiKey::Produce as i16)
    );

    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", proxy())
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata through shardgate");
    assert!(!md.brokers().is_empty());
    let (code, _) = http_get("/healthz");
    assert_eq!(code, 200);
}

fn frame_errors(kind: &str) -> f64 {
    metric(
        "shardgate_frame_errors_total",
        &[&format!("kind=\"{kind}\"")],
    )
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn oversized_frame_is_refused_before_allocation_and_counted() {
    let before = frame_errors("too_large");
    let mut s = connect();
    // Announce 1 GiB (default limit 100 MiB) and send nothing more: shardgate must close
    // without waiting for, or allocating, the body.
    s.write_all(&(1u32 << 30).to_be_bytes()).unwrap();
    assert!(closed(&mut s));
    eventually("too_large counted", Duration::from_secs(5), || {
        frame_errors("too_large") > before
    });
    still_serving();
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn negative_frame_size_closes_the_connection() {
    let before = frame_errors("negative_size");
    let mut s = connect();
    s.write_all(&(-5i32).to_be_bytes()).unwrap();
    assert!(closed(&mut s));
    eventually("negative_size counted", Duration::from_secs(5), || {
        frame_errors("negative_size") > before
    });
    still_serving();
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn unknown_api_key_closes_the_connection() {
    let before = frame_errors("unknown_api_key");
    let mut s = connect();
    let mut f = BytesMut::new();
    f.put_i16(999); // api key
    f.put_i16(0);
    f.put_i32(1);
    f.put_i16(-1); // null client id
    let mut out = (f.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&f);
    s.write_all(&out).unwrap();
    assert!(closed(&mut s));
    eventually("unknown_api_key counted", Duration::from_secs(5), || {
        frame_errors("unknown_api_key") > before
    });
    still_serving();
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn unsupported_version_of_a_known_api_closes_the_connection() {
    let before = frame_errors("unsupported_version");
    // Produce v2 was removed in Kafka 4.0 and is not in shardgate's table.
    let mut f = BytesMut::new();
    f.put_i16(ApiKey::Produce as i16);
    f.put_i16(2);
    f.put_i32(1);
    f.put_i16(-1);
    let mut out = (f.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&f);
    let mut s = connect();
    s.write_all(&out).unwrap();
    assert!(closed(&mut s));
    eventually(
        "unsupported_version counted",
        Duration::from_secs(5),
        || frame_errors("unsupported_version") > before,
    );
    still_serving();
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn too_new_api_versions_gets_the_downgrade_answer_and_the_connection_stays_usable() {
    let mut s = connect();
    // ApiVersions v99: header v2 layout; the body does not matter for the downgrade answer.
    let mut f = BytesMut::new();
    f.put_i16(ApiKey::ApiVersions as i16);
    f.put_i16(99);
    f.put_i32(42);
    f.put_i16(-1);
    f.put_u8(0);
    let mut out = (f.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&f);
    s.write_all(&out).unwrap();
    let resp = read_frame(&mut s).expect("downgrade answer");
    let mut b = bytes::Bytes::from(resp);
    let h = ResponseHeader::decode(&mut b, 0).unwrap();
    assert_eq!(h.correlation_id, 42);
    let r = ApiVersionsResponse::decode(&mut b, 0).unwrap();
    assert_eq!(r.error_code, 35, "UNSUPPORTED_VERSION");
    let produce = r
        .api_keys
        .iter()
        .find(|k| k.api_key == 0)
        .expect("Produce range listed");
    assert!(produce.max_version >= 9);
    // The client retries at a version we speak, on the same connection.
    s.write_all(&frame(
        ApiKey::ApiVersions,
        3,
        43,
        &ApiVersionsRequest::default(),
    ))
    .unwrap();
    let resp = read_frame(&mut s).expect("second answer");
    assert_eq!(&resp[..4], &43i32.to_be_bytes());
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn malformed_request_body_closes_the_connection_and_is_counted() {
    let errors = || {
        metric(
            "shardgate_request_errors_total",
            &["api=\"Metadata\"", "kind=\"decode\""],
        )
    };
    let before = errors();
    let mut s = connect();
    // A Metadata v12 header followed by garbage: topics array length claims 1e9 entries.
    let header = RequestHeader::default()
        .with_request_api_key(ApiKey::Metadata as i16)
        .with_request_api_version(12)
        .with_correlation_id(5);
    let mut f = BytesMut::new();
    header.encode(&mut f, 2).unwrap();
    f.put_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f, 1, 2, 3]);
    let mut out = (f.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&f);
    s.write_all(&out).unwrap();
    assert!(closed(&mut s));
    eventually("decode error counted", Duration::from_secs(5), || {
        errors() > before
    });
    still_serving();
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn truncated_frame_then_close_is_counted() {
    let before = frame_errors("truncated");
    let mut s = connect();
    s.write_all(&[0, 0, 0, 100, 0, 3, 0, 9]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(closed(&mut s));
    eventually("truncated counted", Duration::from_secs(5), || {
        frame_errors("truncated") > before
    });
    still_serving();
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn random_bytes_close_the_connection() {
    // Deterministic pseudo-random bytes (xorshift), several seeds.
    for seed in [1u64, 7, 99, 12345] {
        let mut x = seed;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut s = connect();
        let _ = s.write_all(&data);
        assert!(closed(&mut s), "seed {seed}");
    }
    still_serving();
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn client_disconnecting_mid_request_does_not_disturb_others() {
    for _ in 0..20 {
        let mut s = connect();
        // A Metadata request for every topic, and gone before the answer.
        let f = frame(
            ApiKey::Metadata,
            12,
            1,
            &MetadataRequest::default().with_topics(None),
        );
        s.write_all(&f).unwrap();
        drop(s);
        // And half a frame.
        let mut s = connect();
        s.write_all(&f[..f.len() / 2]).unwrap();
        drop(s);
    }
    still_serving();
}

/// A dead Consul at start: the stored maps cannot be loaded, so this instance cannot tell a
/// managed topic from a plain one. It must neither write records unrouted nor hand out
/// records ungated: produce and fetch get retriable errors (fetch after the client's
/// max_wait), and readiness says why.
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn before_its_maps_are_loaded_an_instance_answers_produce_and_fetch_with_retriable_errors() {
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::{FetchRequest, FetchResponse, ProduceRequest, ProduceResponse};

    let topic = unique("unloaded");
    create_topic(&topic, 1);
    let bootstrap: Vec<String> = kafka().split(',').map(|b| format!("\"{b}\"")).collect();
    let (client, admin) = ("127.0.0.1:29196", "127.0.0.1:29296");
    let config = format!(
        r#"
[listener]
bind = "{client}"

[upstream]
bootstrap = [{bootstrap}]

[admin]
bind = "{admin}"

[store]
kind = "consul"
consul_addr = "http://127.0.0.1:1"
cluster = "unloaded"
"#,
        bootstrap = bootstrap.join(", "),
    );
    let _sg = spawn_shardgate(&cache().join("run"), "unloaded", &config);
    let admin_url = format!("http://{admin}");
    eventually("admin HTTP answers", Duration::from_secs(30), || {
        shardgate::admin::http_request(&admin_url, "GET", "/readyz", None).is_ok()
    });
    let (code, body) = shardgate::admin::http_request(&admin_url, "GET", "/readyz", None).unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("shard maps not loaded"), "{body}");

    let mut s = TcpStream::connect(client).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = kafka_protocol::messages::TopicName(StrBytes::from_string(topic.clone()));
    let produce = ProduceRequest::default()
        .with_acks(1)
        .with_timeout_ms(5_000)
        .with_topic_data(vec![
            TopicProduceData::default()
                .with_name(name.clone())
                .with_partition_data(vec![PartitionProduceData::default().with_index(0)]),
        ]);
    s.write_all(&frame(ApiKey::Produce, 9, 1, &produce))
        .unwrap();
    let mut buf = bytes::Bytes::from(read_frame(&mut s).unwrap());
    ResponseHeader::decode(&mut buf, ApiKey::Produce.response_header_version(9)).unwrap();
    let resp = ProduceResponse::decode(&mut buf, 9).unwrap();
    let code = resp.responses[0].partition_responses[0].error_code;
    assert_eq!(code, 5, "produce answered LEADER_NOT_AVAILABLE, got {code}");

    let fetch = FetchRequest::default()
        .with_max_wait_ms(300)
        .with_min_bytes(1)
        .with_max_bytes(1 << 20)
        .with_session_epoch(-1)
        .with_topics(vec![
            FetchTopic::default().with_topic(name).with_partitions(vec![
                FetchPartition::default()
                    .with_partition(0)
                    .with_fetch_offset(0)
                    .with_partition_max_bytes(1 << 20),
            ]),
        ]);
    let started = std::time::Instant::now();
    s.write_all(&frame(ApiKey::Fetch, 12, 2, &fetch)).unwrap();
    let mut buf = bytes::Bytes::from(read_frame(&mut s).unwrap());
    let waited = started.elapsed();
    ResponseHeader::decode(&mut buf, ApiKey::Fetch.response_header_version(12)).unwrap();
    let resp = FetchResponse::decode(&mut buf, 12).unwrap();
    let p = &resp.responses[0].partitions[0];
    assert_eq!(p.error_code, 6, "fetch answered NOT_LEADER_OR_FOLLOWER");
    assert!(p.records.as_ref().is_none_or(|r| r.is_empty()));
    assert!(
        waited >= Duration::from_millis(250),
        "the fetch waited for the maps within max_wait ({waited:?})"
    );
}

/// A client may not pose as a follower through shardgate: a Fetch or ListOffsets naming a real
/// broker as its replica is served as a consumer's. The control goes to Kafka directly: there
/// the same requests are treated as a replica's (a non-replica "follower" fetch is refused; a
/// replica's ListOffsets answers the log end and ignores read_committed), through shardgate
/// they get a consumer's answers (records served; the last stable offset).
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn a_client_posing_as_a_broker_is_served_as_a_consumer() {
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic, ReplicaState};
    use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
    use kafka_protocol::messages::{
        BrokerId, FetchRequest, FetchResponse, ListOffsetsRequest, ListOffsetsResponse, TopicName,
    };
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    // Brokers as Kafka itself lists them; the topic's one replica on the highest id, and the
    // "follower" we pose as another broker (the leader itself on a one-broker testbed).
    let direct: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let md = direct
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    let mut ids: Vec<(i32, String)> = md
        .brokers()
        .iter()
        .map(|b| (b.id(), format!("{}:{}", b.host(), b.port())))
        .collect();
    ids.sort();
    let (leader, leader_addr) = ids.last().cloned().unwrap();
    let posed = ids.first().unwrap().0;
    let topic = unique("posing");
    run_ok(
        std::process::Command::new(bin("kafka-topics")).args([
            "--bootstrap-server",
            &kafka(),
            "--create",
            "--topic",
            &topic,
            "--replica-assignment",
            &leader.to_string(),
        ]),
        Duration::from_secs(60),
    );

    // Three committed records, then an open transaction: LSO 4 (after the commit marker),
    // log end 6.
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("transactional.id", unique("posing-txn"))
        .create()
        .unwrap();
    let t = Duration::from_secs(30);
    producer.init_transactions(t).unwrap();
    let send = |n: usize| {
        producer.begin_transaction().unwrap();
        for i in 0..n {
            let v = format!("v{i}");
            producer
                .send(BaseRecord::<(), _>::to(&topic).payload(&v))
                .unwrap();
        }
        producer.flush(t).unwrap();
    };
    send(3);
    producer.commit_transaction(t).unwrap();
    send(2);

    let name = TopicName(StrBytes::from_string(topic.clone()));
    let list = |replica: i32| {
        ListOffsetsRequest::default()
            .with_replica_id(BrokerId(replica))
            .with_isolation_level(1)
            .with_topics(vec![
                ListOffsetsTopic::default()
                    .with_name(name.clone())
                    .with_partitions(vec![
                        ListOffsetsPartition::default()
                            .with_partition_index(0)
                            .with_timestamp(-1),
                    ]),
            ])
    };
    let latest = |addr: &str, replica: i32| {
        let r: ListOffsetsResponse = ask(addr, ApiKey::ListOffsets, 7, &list(replica));
        let p = &r.topics[0].partitions[0];
        assert_eq!(p.error_code, 0, "ListOffsets via {addr} as {replica}");
        p.offset
    };
    let rewritten = |api: &str, field: &str| {
        metric(
            "shardgate_client_fields_rewritten_total",
            &[&format!("api=\"{api}\""), &format!("field=\"{field}\"")],
        )
    };
    eventually(
        "the open transaction is visible",
        Duration::from_secs(20),
        || latest(&leader_addr, posed) == 6,
    );
    assert_eq!(
        latest(&leader_addr, -1),
        4,
        "a consumer's read_committed end"
    );
    let before = rewritten("ListOffsets", "replica_id");
    assert_eq!(
        latest(&proxy(), posed),
        4,
        "through shardgate the posing client gets the consumer's last stable offset"
    );
    assert_eq!(rewritten("ListOffsets", "replica_id"), before + 1.0);

    let fetch = |version: i16| {
        let mut r = FetchRequest::default()
            .with_max_wait_ms(0)
            .with_min_bytes(1)
            .with_max_bytes(1 << 20)
            .with_session_epoch(-1)
            .with_topics(vec![
                FetchTopic::default()
                    .with_topic(name.clone())
                    .with_topic_id(md_topic_id(&topic))
                    .with_partitions(vec![
                        FetchPartition::default()
                            .with_partition(0)
                            .with_fetch_offset(0)
                            .with_partition_max_bytes(1 << 20),
                    ]),
            ]);
        if version >= 15 {
            r.replica_state = ReplicaState::default()
                .with_replica_id(BrokerId(posed))
                .with_replica_epoch(1);
        } else {
            r.replica_id = BrokerId(posed);
        }
        r
    };
    for (version, field) in [(12, "replica_id"), (15, "replica_state.replica_id")] {
        let req = fetch(version);
        let control: FetchResponse = ask(&leader_addr, ApiKey::Fetch, version, &req);
        let p = &control.responses[0].partitions[0];
        eprintln!(
            "direct v{version} as broker {posed}: top {} partition {} hw {}",
            control.error_code, p.error_code, p.high_watermark
        );
        assert!(
            control.error_code != 0 || p.error_code != 0,
            "control: Kafka refuses a follower fetch from a broker that is no replica (v{version})"
        );
        let before = rewritten("Fetch", field);
        let resp: FetchResponse = ask(&proxy(), ApiKey::Fetch, version, &req);
        let p = &resp.responses[0].partitions[0];
        assert_eq!((resp.error_code, p.error_code), (0, 0), "v{version}");
        assert_eq!(p.high_watermark, 6, "v{version}");
        assert!(
            p.records.as_ref().is_some_and(|r| !r.is_empty()),
            "v{version}: a consumer's fetch gets the records"
        );
        assert_eq!(rewritten("Fetch", field), before + 1.0, "v{version}");
    }
    producer.abort_transaction(t).unwrap();
    still_serving();
}

/// The topic id Kafka gave `topic` (Fetch v13+ names topics by id).
fn md_topic_id(topic: &str) -> uuid::Uuid {
    use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
    use kafka_protocol::messages::{MetadataResponse, TopicName};
    let req = MetadataRequest::default()
        .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(
            TopicName(StrBytes::from_string(topic.to_string())),
        ))]));
    let first = kafka().split(',').next().unwrap().to_string();
    let mut id = uuid::Uuid::nil();
    eventually("the topic's id", Duration::from_secs(20), || {
        let r: MetadataResponse = ask(&first, ApiKey::Metadata, 12, &req);
        id = r.topics[0].topic_id;
        !id.is_nil()
    });
    id
}
