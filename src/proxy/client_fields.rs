//! Request fields through which a client could pose as a broker, forced to a consumer's
//! values before anything goes upstream.
//!
//! A Fetch with a broker's id as `replica_id` is a follower fetch: Kafka reads it up to the log
//! end instead of the high watermark and records the "follower's" position, which moves the
//! high watermark. ListOffsets with a replica id (or the debug id -2) answers the log end and
//! ignores `isolation_level`. Through shardgate every client is a consumer, so these fields are
//! set to -1 (the consumer value) whatever the client sent. Each rewrite is counted in
//! `shardgate_client_fields_rewritten_total{api,field}` and logged once per connection at warn
//! (debug afterwards): a client doing this is misconfigured or probing.

use kafka_protocol::messages::fetch_request::ReplicaState;
use kafka_protocol::messages::{
    ApiKey, BrokerId, FetchRequest, ListOffsetsRequest, OffsetForLeaderEpochRequest,
};

use super::connection::ClientConn;
use crate::telemetry;

/// The consumer's replica id in Fetch, ListOffsets and OffsetForLeaderEpoch.
const CONSUMER: i32 = -1;

/// A field that was rewritten: its name and what the client had sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    pub field: &'static str,
    pub sent: i64,
}

/// Fetch: `replica_id` (v4-14) and `replica_state` (v15+, a tagged field; the crate decodes
/// `replica_id` as -1 there).
pub fn fetch_as_consumer(req: &mut FetchRequest) -> Vec<Rewrite> {
    let mut out = Vec::new();
    if req.replica_id.0 != CONSUMER {
        out.push(Rewrite {
            field: "replica_id",
            sent: req.replica_id.0.into(),
        });
        req.replica_id = BrokerId(CONSUMER);
    }
    let state = &req.replica_state;
    if state.replica_id.0 != CONSUMER {
        out.push(Rewrite {
            field: "replica_state.replica_id",
            sent: state.replica_id.0.into(),
        });
    }
    if state.replica_epoch != -1 {
        out.push(Rewrite {
            field: "replica_state.replica_epoch",
            sent: state.replica_epoch,
        });
    }
    if *state != ReplicaState::default() {
        // The default is not encoded at all (tagged field), exactly as a consumer sends it.
        req.replica_state = ReplicaState::default();
    }
    out
}

/// ListOffsets: `replica_id` in every version. `isolation_level` is the client's to choose.
pub fn list_offsets_as_consumer(req: &mut ListOffsetsRequest) -> Vec<Rewrite> {
    if req.replica_id.0 == CONSUMER {
        return Vec::new();
    }
    let sent = req.replica_id.0.into();
    req.replica_id = BrokerId(CONSUMER);
    vec![Rewrite {
        field: "replica_id",
        sent,
    }]
}

/// OffsetForLeaderEpoch: `replica_id` exists from v3 (below it is not on the wire and the
/// encoder refuses a non-default value).
pub fn offset_for_leader_epoch_as_consumer(
    req: &mut OffsetForLeaderEpochRequest,
    version: i16,
) -> Vec<Rewrite> {
    if version < 3 || req.replica_id.0 == CONSUMER {
        return Vec::new();
    }
    let sent = req.replica_id.0.into();
    req.replica_id = BrokerId(CONSUMER);
    vec![Rewrite {
        field: "replica_id",
        sent,
    }]
}

/// Counts and logs the rewrites of one request.
pub fn report(client: &ClientConn, api: ApiKey, client_id: Option<&str>, rewrites: &[Rewrite]) {
    if rewrites.is_empty() {
        return;
    }
    for r in rewrites {
        telemetry::client_field_rewritten(api, r.field);
    }
    let fields: Vec<String> = rewrites
        .iter()
        .map(|r| format!("{}={}", r.field, r.sent))
        .collect();
    if client.first_rewrite() {
        tracing::warn!(
            conn = client.id, peer = %client.peer, client_id, api = ?api, sent = ?fields,
            "client request posed as a broker; replica fields forced to consumer values \
             (logged once per connection)"
        );
    } else {
        tracing::debug!(conn = client.id, api = ?api, sent = ?fields, "replica fields forced to consumer values");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use kafka_protocol::protocol::{Decodable, Encodable};

    #[test]
    fn a_follower_fetch_becomes_a_consumer_fetch_in_every_version() {
        let mut old = FetchRequest::default().with_replica_id(BrokerId(2));
        let r = fetch_as_consumer(&mut old);
        assert_eq!(
            r,
            vec![Rewrite {
                field: "replica_id",
                sent: 2
            }]
        );
        assert_eq!(old.replica_id.0, -1);

        let mut new = FetchRequest::default().with_replica_state(
            ReplicaState::default()
                .with_replica_id(BrokerId(3))
                .with_replica_epoch(77),
        );
        let r = fetch_as_consumer(&mut new);
        assert_eq!(r.len(), 2);
        // Encoded at v17 the request is byte for byte a consumer's.
        let mut ours = BytesMut::new();
        new.encode(&mut ours, 17).unwrap();
        let mut consumer = BytesMut::new();
        FetchRequest::default().encode(&mut consumer, 17).unwrap();
        assert_eq!(ours, consumer);
        let back = FetchRequest::decode(&mut ours.freeze(), 17).unwrap();
        assert_eq!(back.replica_state, ReplicaState::default());

        let mut consumer = FetchRequest::default();
        assert!(fetch_as_consumer(&mut consumer).is_empty());
    }

    #[test]
    fn list_offsets_replica_and_debug_ids_become_the_consumer_id() {
        for id in [0, 1, -2] {
            let mut req = ListOffsetsRequest::default()
                .with_replica_id(BrokerId(id))
                .with_isolation_level(1);
            assert_eq!(list_offsets_as_consumer(&mut req).len(), 1);
            assert_eq!(req.replica_id.0, -1);
            assert_eq!(req.isolation_level, 1, "isolation level is the client's");
        }
        let mut req = ListOffsetsRequest::default().with_replica_id(BrokerId(-1));
        assert!(list_offsets_as_consumer(&mut req).is_empty());
    }

    #[test]
    fn offset_for_leader_epoch_is_rewritten_only_where_the_field_exists() {
        let mut v2 = OffsetForLeaderEpochRequest::default(); // -2, not on the wire at v2
        assert!(offset_for_leader_epoch_as_consumer(&mut v2, 2).is_empty());
        let mut b = BytesMut::new();
        v2.encode(&mut b, 2).unwrap();
        let mut v4 = OffsetForLeaderEpochRequest::default().with_replica_id(BrokerId(1));
        assert_eq!(offset_for_leader_epoch_as_consumer(&mut v4, 4).len(), 1);
        assert_eq!(v4.replica_id.0, -1);
    }
}
