//! The explicit table of APIs and versions shardgate serves, and how each is routed.
//!
//! A version is offered to clients only if it is in this table, in the protocol crate, and in
//! what the upstream brokers advertise. The test at the bottom fails when the crate learns a
//! version this table has not opted into, so that upgrades are a conscious review of each API.

use kafka_protocol::messages::ApiKey;
use kafka_protocol::protocol::VersionRange;

/// How a request reaches the upstream cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Answered by shardgate itself (ApiVersions).
    Local,
    /// Forwarded, response rewritten to the virtual cluster (Metadata, DescribeCluster,
    /// FindCoordinator).
    ClusterView,
    /// Split by partition leader, fanned out, merged (Produce, Fetch, ListOffsets, ...).
    PartitionLeaders,
    /// Forwarded as bytes to the coordinator of a group.
    GroupCoordinator,
    /// Forwarded as bytes to the coordinator of a transactional id.
    TxnCoordinator,
    /// Forwarded as bytes to any broker (KRaft brokers forward controller requests themselves).
    AnyBroker,
    /// Sent to every broker, responses merged (ListGroups).
    AllBrokers,
    /// The connection's own authentication (SaslHandshake, SaslAuthenticate): answered in its
    /// read loop, in order, never forwarded.
    Sasl,
}

pub struct Supported {
    pub api: ApiKey,
    pub min: i16,
    pub max: i16,
    pub route: Route,
    /// The crate's highest version when this row was last reviewed.
    pub reviewed_crate_max: i16,
}

const fn row(api: ApiKey, min: i16, max: i16, route: Route, reviewed_crate_max: i16) -> Supported {
    Supported {
        api,
        min,
        max,
        route,
        reviewed_crate_max,
    }
}

use Route::*;

/// Reviewed against kafka-protocol 0.18 (Kafka 4.x schemas).
pub const SUPPORTED: &[Supported] = &[
    row(ApiKey::Produce, 3, 13, PartitionLeaders, 13),
    row(ApiKey::Fetch, 4, 18, PartitionLeaders, 18),
    row(ApiKey::ListOffsets, 1, 10, PartitionLeaders, 10),
    row(ApiKey::Metadata, 0, 13, ClusterView, 13),
    row(ApiKey::OffsetCommit, 2, 10, GroupCoordinator, 10),
    row(ApiKey::OffsetFetch, 1, 10, GroupCoordinator, 10),
    row(ApiKey::FindCoordinator, 0, 6, ClusterView, 6),
    row(ApiKey::JoinGroup, 0, 9, GroupCoordinator, 9),
    row(ApiKey::Heartbeat, 0, 4, GroupCoordinator, 4),
    row(ApiKey::LeaveGroup, 0, 5, GroupCoordinator, 5),
    row(ApiKey::SyncGroup, 0, 5, GroupCoordinator, 5),
    row(ApiKey::DescribeGroups, 0, 6, GroupCoordinator, 6),
    row(ApiKey::ListGroups, 0, 5, AllBrokers, 5),
    row(ApiKey::ApiVersions, 0, 4, Local, 4),
    // v0 handshakes are followed by unframed SASL tokens; v1 (KIP-152) by SaslAuthenticate.
    row(ApiKey::SaslHandshake, 1, 1, Sasl, 1),
    row(ApiKey::SaslAuthenticate, 0, 2, Sasl, 2),
    row(ApiKey::CreateTopics, 2, 7, AnyBroker, 7),
    row(ApiKey::DeleteTopics, 1, 6, AnyBroker, 6),
    row(ApiKey::DeleteRecords, 0, 2, PartitionLeaders, 2),
    row(ApiKey::InitProducerId, 0, 6, TxnCoordinator, 6),
    row(ApiKey::OffsetForLeaderEpoch, 2, 4, PartitionLeaders, 4),
    // v4+ is the broker-to-broker batched form; clients use v0-v3.
    row(ApiKey::AddPartitionsToTxn, 0, 3, TxnCoordinator, 5),
    row(ApiKey::AddOffsetsToTxn, 0, 4, TxnCoordinator, 4),
    row(ApiKey::EndTxn, 0, 5, TxnCoordinator, 5),
    row(ApiKey::TxnOffsetCommit, 0, 5, GroupCoordinator, 5),
    row(ApiKey::DescribeAcls, 1, 3, AnyBroker, 3),
    row(ApiKey::CreateAcls, 1, 3, AnyBroker, 3),
    row(ApiKey::DeleteAcls, 1, 3, AnyBroker, 3),
    row(ApiKey::DescribeConfigs, 1, 4, AnyBroker, 4),
    row(ApiKey::AlterConfigs, 0, 2, AnyBroker, 2),
    row(ApiKey::CreatePartitions, 0, 3, AnyBroker, 3),
    row(ApiKey::DeleteGroups, 0, 2, GroupCoordinator, 2),
    row(ApiKey::IncrementalAlterConfigs, 0, 1, AnyBroker, 1),
    row(ApiKey::OffsetDelete, 0, 0, GroupCoordinator, 0),
    row(ApiKey::DescribeCluster, 0, 2, ClusterView, 2),
    row(ApiKey::ConsumerGroupHeartbeat, 0, 1, GroupCoordinator, 1),
    row(ApiKey::ConsumerGroupDescribe, 0, 1, GroupCoordinator, 1),
];

pub fn lookup(api_key: i16) -> Option<&'static Supported> {
    SUPPORTED.iter().find(|s| s.api as i16 == api_key)
}

/// Our range for an API intersected with the crate's (never wider than what we can decode).
pub fn local_range(s: &Supported) -> VersionRange {
    VersionRange {
        min: s.min,
        max: s.max,
    }
    .intersect(&s.api.valid_versions())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_was_reviewed_against_the_crate_versions() {
        for s in SUPPORTED {
            let crate_range = s.api.valid_versions();
            assert_eq!(
                crate_range.max, s.reviewed_crate_max,
                "kafka-protocol now knows {:?} up to v{}; review the row (max {}) and bump \
                 reviewed_crate_max",
                s.api, crate_range.max, s.max
            );
            assert!(s.min <= s.max, "{:?}", s.api);
            assert!(
                s.min >= crate_range.min && s.max <= crate_range.max,
                "{:?} row exceeds what the crate can decode",
                s.api
            );
        }
    }

    #[test]
    fn every_api_appears_once() {
        for (i, a) in SUPPORTED.iter().enumerate() {
            for b in &SUPPORTED[i + 1..] {
                assert_ne!(a.api, b.api);
            }
        }
    }

    #[test]
    fn broker_internal_apis_are_not_offered() {
        for api in [
            ApiKey::WriteTxnMarkers,
            ApiKey::BrokerRegistration,
            ApiKey::Vote,
        ] {
            assert!(lookup(api as i16).is_none(), "{api:?}");
        }
    }
}
