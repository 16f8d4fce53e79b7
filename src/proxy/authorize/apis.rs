//! The rule of each API, as Kafka's broker applies it (`KafkaApis`): which operation on which
//! resource a request needs, and the answer for what is denied.
//!
//! Requests that only read (OffsetFetch, DescribeGroups, DescribeConfigs, ...) go upstream
//! whole and denied entries are replaced in the answer; requests that change something are
//! forwarded without the denied resources.

use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

use super::{Access, Verdict, fix_with, groups, topics};
use crate::auth::acl::{Operation, ResourceType};
use crate::protocol::{RequestFrame, codes};
use crate::proxy::coordinator::error_answer;
use crate::proxy::forward::typed_reply;
use crate::proxy::{Ctx, HandlerError, Reply};

use Operation::*;
use ResourceType::{Cluster, Group, TransactionalId};

pub(super) const TOPIC_DENIED: i16 = codes::TOPIC_AUTHORIZATION_FAILED;
pub(super) const GROUP_DENIED: i16 = codes::GROUP_AUTHORIZATION_FAILED;
pub(super) const CLUSTER_DENIED: i16 = codes::CLUSTER_AUTHORIZATION_FAILED;
pub(super) const TXN_DENIED: i16 = codes::TRANSACTIONAL_ID_AUTHORIZATION_FAILED;

/// Config resource types (DescribeConfigs and friends).
pub(super) const CONFIG_TOPIC: i8 = 2;
pub(super) const CONFIG_GROUP: i8 = 32;

pub(super) fn s(x: &StrBytes) -> &str {
    x.as_str()
}

/// One resource, allowed or refused (counted and logged).
pub(super) fn one(a: &Access, op: Operation, kind: ResourceType, name: &str) -> bool {
    let ok = a.allows(op, kind, name);
    if !ok {
        a.refused(op, kind, &[name]);
    }
    ok
}

/// The API's error answer with `code`, or the request goes on.
pub(super) fn whole(req: &RequestFrame, key: &str, code: i16) -> Result<Verdict, HandlerError> {
    match error_answer(req, &[key.to_string()], code)? {
        Some(reply) => Ok(Verdict::Answer(reply)),
        None => Ok(Verdict::Answer(Reply::Close(format!(
            "{:?} denied ({code}) and has no error field",
            req.api_key
        )))),
    }
}

pub(super) fn check(ctx: &Ctx, a: &Access, req: &RequestFrame) -> Result<Verdict, HandlerError> {
    match req.api_key {
        ApiKey::JoinGroup => group_read(a, req, req.decode_body::<JoinGroupRequest>()?.group_id),
        ApiKey::SyncGroup => group_read(a, req, req.decode_body::<SyncGroupRequest>()?.group_id),
        ApiKey::Heartbeat => group_read(a, req, req.decode_body::<HeartbeatRequest>()?.group_id),
        ApiKey::LeaveGroup => group_read(a, req, req.decode_body::<LeaveGroupRequest>()?.group_id),
        ApiKey::ConsumerGroupHeartbeat => {
            let body: ConsumerGroupHeartbeatRequest = req.decode_body()?;
            if !one(a, Read, Group, s(&body.group_id)) {
                return whole(req, s(&body.group_id), GROUP_DENIED);
            }
            let names: Vec<&str> = body
                .subscribed_topic_names
                .iter()
                .flatten()
                .map(|t| s(t))
                .collect();
            if !a.denied_topics(Describe, &names).is_empty() {
                return whole(req, s(&body.group_id), TOPIC_DENIED);
            }
            // Upstream resolves a regex with shardgate's rights: only a principal that may
            // describe every topic may subscribe by pattern.
            if body
                .subscribed_topic_regex
                .as_ref()
                .is_some_and(|r| !r.is_empty())
                && !a.allows(Describe, ResourceType::Topic, "*")
            {
                a.refused(Describe, ResourceType::Topic, &["(regex subscription)"]);
                return whole(req, s(&body.group_id), TOPIC_DENIED);
            }
            Ok(Verdict::Allow)
        }
        ApiKey::FindCoordinator => groups::find_coordinator(a, req),
        ApiKey::InitProducerId => {
            let body: InitProducerIdRequest = req.decode_body()?;
            match &body.transactional_id {
                Some(t) if !one(a, Write, TransactionalId, s(t)) => whole(req, s(t), TXN_DENIED),
                Some(_) => Ok(Verdict::Allow),
                // KIP-679: an idempotent producer needs IDEMPOTENT_WRITE on the cluster or
                // WRITE on some topic.
                None if a.cluster(IdempotentWrite) || a.acls.may_write_some_topic(&a.who) => {
                    Ok(Verdict::Allow)
                }
                None => {
                    a.refused(IdempotentWrite, Cluster, &[crate::auth::acl::CLUSTER_NAME]);
                    whole(req, "", CLUSTER_DENIED)
                }
            }
        }
        ApiKey::AddOffsetsToTxn => {
            let body: AddOffsetsToTxnRequest = req.decode_body()?;
            if !one(a, Write, TransactionalId, s(&body.transactional_id)) {
                return whole(req, "", TXN_DENIED);
            }
            group_read(a, req, body.group_id)
        }
        ApiKey::EndTxn => {
            let body: EndTxnRequest = req.decode_body()?;
            if !one(a, Write, TransactionalId, s(&body.transactional_id)) {
                return whole(req, "", TXN_DENIED);
            }
            Ok(Verdict::Allow)
        }
        ApiKey::AddPartitionsToTxn => groups::add_partitions_to_txn(a, req),
        ApiKey::OffsetCommit => groups::offset_commit(ctx, a, req),
        ApiKey::TxnOffsetCommit => groups::txn_offset_commit(a, req),
        ApiKey::OffsetFetch => groups::offset_fetch(ctx, a, req),
        ApiKey::OffsetDelete => groups::offset_delete(a, req),
        ApiKey::DescribeGroups => groups::describe_groups(a, req),
        ApiKey::ConsumerGroupDescribe => groups::consumer_group_describe(a, req),
        ApiKey::DeleteGroups => groups::delete_groups(a, req),
        ApiKey::ListGroups if a.cluster(Describe) => Ok(Verdict::Allow),
        ApiKey::ListGroups => {
            let visible = seen_by(a, Group);
            Ok(Verdict::Rewrite {
                req: req.clone(),
                fix: fix_with(move |r: &mut ListGroupsResponse| {
                    r.groups.retain(|g| visible(s(&g.group_id)))
                }),
            })
        }
        ApiKey::CreateTopics => topics::create_topics(a, req),
        ApiKey::DeleteTopics => topics::delete_topics(ctx, a, req),
        ApiKey::CreatePartitions => topics::create_partitions(a, req),
        ApiKey::DescribeConfigs => topics::describe_configs(a, req),
        ApiKey::AlterConfigs => topics::alter_configs(a, req),
        ApiKey::IncrementalAlterConfigs => topics::incremental_alter_configs(a, req),
        ApiKey::DescribeAcls if !one(a, Describe, Cluster, crate::auth::acl::CLUSTER_NAME) => {
            let resp = DescribeAclsResponse::default().with_error_code(CLUSTER_DENIED);
            Ok(Verdict::Answer(typed_reply(req, &resp)?))
        }
        ApiKey::CreateAcls | ApiKey::DeleteAcls
            if !one(a, Alter, Cluster, crate::auth::acl::CLUSTER_NAME) =>
        {
            topics::cluster_change_refused(req).map(Verdict::Answer)
        }
        // Produce (its own lane)/Fetch/ListOffsets/OffsetForLeaderEpoch/DeleteRecords/Metadata check their
        // topics in their own paths; ApiVersions, SASL and DescribeCluster need no right.
        _ => Ok(Verdict::Allow),
    }
}

/// A predicate "this principal may describe the resource", for filtering answers.
pub(super) fn seen_by(a: &Access, kind: ResourceType) -> impl Fn(&str) -> bool + Send + 'static {
    let (acls, who) = (a.acls.clone(), a.who.clone());
    move |name| acls.authorize(&who, Describe, kind, name)
}

pub(super) fn group_read(
    a: &Access,
    req: &RequestFrame,
    group: GroupId,
) -> Result<Verdict, HandlerError> {
    if one(a, Read, Group, s(&group)) {
        Ok(Verdict::Allow)
    } else {
        whole(req, s(&group), GROUP_DENIED)
    }
}

/// Per-partition error entries of topics, for commit-like answers.
pub(super) fn partitions_with<P: Default>(parts: &[i32], make: impl Fn(P, i32) -> P) -> Vec<P> {
    parts.iter().map(|p| make(P::default(), *p)).collect()
}
