//! Metric names and recording helpers, so names live in one place. Everything is exported in
//! Prometheus format on the admin port under `shardgate_*`.

use std::time::Duration;

use kafka_protocol::messages::ApiKey;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let buckets = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ];
    // Replica moves take seconds to hours.
    let move_buckets = [
        0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets(&buckets)?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("shardgate_reassignment_seconds".into()),
            &move_buckets,
        )?
        .install_recorder()?;
    describe();
    zero();
    Ok(handle)
}

/// Counters of rare events exist from the start at 0, with every label value they can
/// take: "nothing happened" then reads as 0 (and rate() works), not as a missing series an
/// alert or dashboard cannot tell from a scrape that failed.
fn zero() {
    use metrics::counter;
    for name in [
        "shardgate_requests_abandoned_total",
        "shardgate_upstream_timeouts_closed_total",
        "shardgate_upstream_fetches_total",
        "shardgate_upstream_fetch_bytes_total",
        "shardgate_pool_grown_total",
        "shardgate_prefetch_hits_total",
        "shardgate_prefetch_misses_total",
        "shardgate_prefetch_prefetched_records_total",
        "shardgate_prefetch_delivered_records_total",
        "shardgate_fetch_readahead_polls_total",
        "shardgate_fetch_readahead_dropped_total",
        "shardgate_prefetch_opening_reads_total",
        "shardgate_prefetch_wasted_bytes_total",
        "shardgate_prefetch_fetches_saved_total",
        "shardgate_fetch_delivered_records_total",
    ] {
        counter!(name).increment(0);
    }
    let labelled: [(&'static str, &'static str, &[&'static str]); 10] = [
        (
            "shardgate_connections_rejected_total",
            "reason",
            &["max_connections", "per_source"],
        ),
        (
            "shardgate_connections_closed_total",
            "reason",
            &["no_first_request", "slow_request"],
        ),
        (
            "shardgate_upstream_errors_total",
            "kind",
            &[
                "connect",
                "disconnected",
                "timeout",
                "unknown_broker",
                "no_broker",
                "protocol",
            ],
        ),
        (
            "shardgate_store_errors_total",
            "op",
            &["watch", "report", "campaign"],
        ),
        (
            "shardgate_topology_refreshes_total",
            "result",
            &["ok", "error"],
        ),
        (
            "shardgate_prefetch_reads_total",
            "reason",
            &["rebalance", "shared"],
        ),
        (
            "shardgate_prefetch_offset_reads_total",
            "outcome",
            &["read", "failed"],
        ),
        (
            "shardgate_prefetch_offset_answers_total",
            "outcome",
            &["answered", "late", "missing"],
        ),
        (
            "shardgate_prefetch_evictions_total",
            "reason",
            &["ttl", "replaced", "crowded", "unasked", "unassigned"],
        ),
        ("shardgate_prefetch_refused_total", "reason", &["memory"]),
    ];
    for (name, label, values) in labelled {
        for v in values {
            counter!(name, label => *v).increment(0);
        }
    }
    // Gauges set only when something happens.
    for name in [
        "shardgate_prefetch_bytes",
        "shardgate_prefetch_queue_bytes",
        "shardgate_memory_budget_waiting",
    ] {
        metrics::gauge!(name).set(0.0);
    }
}

/// Reasons a split or merge is made for (`shards::controller`: "api" from the admin API,
/// the autoscaler's measures, "hot_key" when one key is isolated, "cold" merges).
const SPLIT_REASONS: [&str; 5] = [
    "api",
    "records_rate",
    "bytes_rate",
    "consumer_lag",
    "hot_key",
];
const MERGE_REASONS: [&str; 2] = ["api", "cold"];

/// A managed topic's rare-event counters at 0 from when this instance first knows it (see
/// `zero`).
pub fn zero_topic(topic: &str) {
    for name in [
        "shardgate_gate_fallback_opens_total",
        "shardgate_gate_held_fetches_total",
        "shardgate_pool_nudges_total",
    ] {
        metrics::counter!(name, "topic" => topic.to_string()).increment(0);
    }
    for reason in ["max_shards", "pool_exhausted"] {
        metrics::gauge!("shardgate_split_blocked", "topic" => topic.to_string(), "reason" => reason)
            .set(0.0);
    }
    for reason in SPLIT_REASONS {
        metrics::counter!("shardgate_shard_splits_total", "topic" => topic.to_string(), "reason" => reason)
            .increment(0);
    }
    for reason in MERGE_REASONS {
        metrics::counter!("shardgate_shard_merges_total", "topic" => topic.to_string(), "reason" => reason)
            .increment(0);
    }
    for kind in ["idle", "active"] {
        metrics::counter!("shardgate_reassignments_finished_total", "topic" => topic.to_string(), "kind" => kind)
            .increment(0);
        for reason in MOVE_REASONS {
            metrics::counter!("shardgate_reassignments_started_total", "topic" => topic.to_string(), "kind" => kind, "reason" => reason)
                .increment(0);
        }
    }
    for reason in MOVE_CANCEL_REASONS {
        metrics::counter!("shardgate_reassignments_cancelled_total", "topic" => topic.to_string(), "reason" => reason)
            .increment(0);
    }
    for name in [
        "shardgate_reassignment_bytes_total",
        "shardgate_reassignments_adopted_total",
    ] {
        metrics::counter!(name, "topic" => topic.to_string()).increment(0);
    }
}

/// Why a replica move starts (`shards::controller::reassign`) and why one is cancelled.
const MOVE_REASONS: [&str; 3] = ["balance", "split_placement", "api"];
const MOVE_CANCEL_REASONS: [&str; 6] = [
    "api",
    "timeout",
    "topic_deleted",
    "refused",
    "external",
    "lost_leadership",
];

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "shardgate_reassignments_started_total",
        "Replica moves of pool partitions started, by kind (idle/active) and reason"
    );
    describe_counter!(
        "shardgate_reassignments_finished_total",
        "Replica moves Kafka completed, by kind"
    );
    describe_counter!(
        "shardgate_reassignments_cancelled_total",
        "Replica moves cancelled, by reason"
    );
    describe_counter!(
        "shardgate_reassignments_adopted_total",
        "Replica moves a new leader instance took over from its predecessor"
    );
    describe_counter!(
        "shardgate_reassignment_bytes_total",
        "Bytes the new replicas of finished moves held"
    );
    describe_histogram!(
        "shardgate_reassignment_seconds",
        "Duration of finished replica moves, by kind"
    );
    describe_gauge!(
        "shardgate_placement_imbalance_ratio",
        "Busiest broker's active-shard load over the mean (leader instance)"
    );
    describe_gauge!(
        "shardgate_placement_blocked",
        "1 while placement cannot act on a topic, by reason"
    );
    describe_gauge!("shardgate_connections", "Open client connections");
    describe_counter!("shardgate_connections_total", "Client connections accepted");
    describe_counter!(
        "shardgate_connections_rejected_total",
        "Client connections refused at the limit"
    );
    describe_counter!(
        "shardgate_allocator_trims_total",
        "Freed memory returned to the system after client connections left"
    );
    describe_counter!("shardgate_requests_total", "Client requests by API");
    describe_histogram!(
        "shardgate_request_duration_seconds",
        "Client request latency by API"
    );
    describe_counter!(
        "shardgate_request_errors_total",
        "Client requests that failed, by API and kind"
    );
    describe_counter!("shardgate_frame_errors_total", "Bad client frames, by kind");
    describe_counter!("shardgate_bytes_in_total", "Bytes received from clients");
    describe_counter!("shardgate_bytes_out_total", "Bytes sent to clients");
    describe_histogram!(
        "shardgate_upstream_request_duration_seconds",
        "Upstream request latency by API and broker"
    );
    describe_counter!(
        "shardgate_upstream_errors_total",
        "Upstream failures by kind"
    );
    describe_counter!(
        "shardgate_upstream_error_codes_total",
        "Kafka error codes returned by upstream, by API and code"
    );
    describe_counter!(
        "shardgate_upstream_connects_total",
        "Upstream connection attempts"
    );
    describe_counter!(
        "shardgate_topology_refreshes_total",
        "Upstream topology refreshes"
    );
    describe_counter!(
        "shardgate_client_fields_rewritten_total",
        "Client request fields forced to a consumer's values (a client posing as a broker), by API and field"
    );
    describe_gauge!(
        "shardgate_upstream_api_versions_brokers",
        "Live upstream brokers whose ApiVersions answer is in the offered intersection"
    );
    describe_counter!(
        "shardgate_prefetch_embedding_samples_total",
        "Record samples accepted by the background embedding pool"
    );
    describe_counter!(
        "shardgate_prefetch_embedding_dropped_total",
        "Record samples dropped because the embedding queue was full"
    );
    describe_counter!(
        "shardgate_prefetch_embedding_errors_total",
        "Record samples lost to an embedder error"
    );
    describe_histogram!(
        "shardgate_prefetch_embedding_batch_seconds",
        "Time to embed one batch of samples on an embedding thread"
    );
    describe_counter!(
        "shardgate_prefetch_offset_reads_total",
        "Committed offsets read when a classic group's leader sent its assignment, by outcome"
    );
    describe_counter!(
        "shardgate_prefetch_offset_answers_total",
        "Members' OffsetFetch after a rebalance: answered from the rebalance read, or left to Kafka (late, missing)"
    );
    describe_counter!(
        "shardgate_prefetch_wasted_bytes_total",
        "Record bytes read from upstream ahead of consumers and dropped before any fetch took them"
    );
    describe_counter!(
        "shardgate_prefetch_fetches_saved_total",
        "Fetch responses with records whose request sent no upstream poll of its own"
    );
    describe_counter!(
        "shardgate_fetch_delivered_records_total",
        "Records delivered to consumers (coverage = prefetch_delivered_records_total / this)"
    );
    describe_counter!(
        "shardgate_prefetch_opening_reads_total",
        "Partitions of read-ahead polls read because an ordering gate holding them is about to open"
    );
}

pub fn api_name(api: i16) -> &'static str {
    match ApiKey::try_from(api) {
        Ok(k) => api_label(k),
        Err(_) => "Unknown",
    }
}

/// `ApiKey` debug names are stable identifiers; leak-free static strings for labels.
pub fn api_label(k: ApiKey) -> &'static str {
    use ApiKey::*;
    match k {
        Produce => "Produce",
        Fetch => "Fetch",
        ListOffsets => "ListOffsets",
        Metadata => "Metadata",
        OffsetCommit => "OffsetCommit",
        OffsetFetch => "OffsetFetch",
        FindCoordinator => "FindCoordinator",
        JoinGroup => "JoinGroup",
        Heartbeat => "Heartbeat",
        LeaveGroup => "LeaveGroup",
        SyncGroup => "SyncGroup",
        DescribeGroups => "DescribeGroups",
        ListGroups => "ListGroups",
        ApiVersions => "ApiVersions",
        CreateTopics => "CreateTopics",
        DeleteTopics => "DeleteTopics",
        DeleteRecords => "DeleteRecords",
        InitProducerId => "InitProducerId",
        OffsetForLeaderEpoch => "OffsetForLeaderEpoch",
        AddPartitionsToTxn => "AddPartitionsToTxn",
        AddOffsetsToTxn => "AddOffsetsToTxn",
        EndTxn => "EndTxn",
        TxnOffsetCommit => "TxnOffsetCommit",
        DescribeAcls => "DescribeAcls",
        CreateAcls => "CreateAcls",
        DeleteAcls => "DeleteAcls",
        DescribeConfigs => "DescribeConfigs",
        AlterConfigs => "AlterConfigs",
        CreatePartitions => "CreatePartitions",
        DeleteGroups => "DeleteGroups",
        IncrementalAlterConfigs => "IncrementalAlterConfigs",
        OffsetDelete => "OffsetDelete",
        DescribeCluster => "DescribeCluster",
        ConsumerGroupHeartbeat => "ConsumerGroupHeartbeat",
        ConsumerGroupDescribe => "ConsumerGroupDescribe",
        _ => "Other",
    }
}

pub fn request_done(api: ApiKey, elapsed: Duration, error_kind: Option<&'static str>) {
    let name = api_label(api);
    metrics::counter!("shardgate_requests_total", "api" => name).increment(1);
    metrics::histogram!("shardgate_request_duration_seconds", "api" => name)
        .record(elapsed.as_secs_f64());
    if let Some(kind) = error_kind {
        metrics::counter!("shardgate_request_errors_total", "api" => name, "kind" => kind)
            .increment(1);
    }
}

pub fn frame_error(kind: &'static str) {
    metrics::counter!("shardgate_frame_errors_total", "kind" => kind).increment(1);
}

pub fn upstream_request(
    api: ApiKey,
    broker: i32,
    elapsed: Duration,
    error_kind: Option<&'static str>,
) {
    let name = api_label(api);
    metrics::histogram!(
        "shardgate_upstream_request_duration_seconds",
        "api" => name,
        "broker" => broker.to_string()
    )
    .record(elapsed.as_secs_f64());
    if let Some(kind) = error_kind {
        metrics::counter!("shardgate_upstream_errors_total", "kind" => kind).increment(1);
    }
}

/// Counts a non-zero Kafka error code returned by upstream.
pub fn upstream_code(api: ApiKey, code: i16) {
    if code != 0 {
        metrics::counter!(
            "shardgate_upstream_error_codes_total",
            "api" => api_label(api),
            "code" => code.to_string()
        )
        .increment(1);
    }
}

/// A request answered with an error because upstream could not be reached.
pub fn request_upstream_failure(api: ApiKey, kind: &'static str) {
    metrics::counter!(
        "shardgate_request_errors_total",
        "api" => api_label(api),
        "kind" => kind
    )
    .increment(1);
}

/// A client request field forced to a consumer's value (see `proxy::client_fields`).
pub fn client_field_rewritten(api: ApiKey, field: &'static str) {
    metrics::counter!(
        "shardgate_client_fields_rewritten_total",
        "api" => api_label(api),
        "field" => field
    )
    .increment(1);
}
