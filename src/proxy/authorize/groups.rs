//! Group, offset and transaction APIs: the group, transactional id and topics each needs.

use std::collections::HashSet;

use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

use super::apis::*;
use kafka_protocol::protocol::{Decodable, Encodable};

use super::{Access, Verdict, fix_with, partial, without};
use crate::auth::acl::{Operation, ResourceType};
use crate::protocol::{RequestFrame, codes};
use crate::proxy::forward::typed_reply;
use crate::proxy::{Ctx, HandlerError};

use Operation::*;
use ResourceType::{Group, Topic, TransactionalId};

pub(super) fn find_coordinator(a: &Access, req: &RequestFrame) -> Result<Verdict, HandlerError> {
    let body: FindCoordinatorRequest = req.decode_body()?;
    let (kind, code) = match body.key_type {
        1 => (TransactionalId, TXN_DENIED),
        _ => (Group, GROUP_DENIED),
    };
    let refused = |code: i16| {
        FindCoordinatorResponse::default()
            .with_error_code(code)
            .with_node_id(BrokerId(-1))
            .with_port(-1)
    };
    if req.api_version < 4 {
        return if one(a, Describe, kind, s(&body.key)) {
            Ok(Verdict::Allow)
        } else {
            Ok(Verdict::Answer(typed_reply(req, &refused(code))?))
        };
    }
    let denied: Vec<StrBytes> = body
        .coordinator_keys
        .iter()
        .filter(|k| !a.allows(Describe, kind, s(k)))
        .cloned()
        .collect();
    if denied.is_empty() {
        return Ok(Verdict::Allow);
    }
    a.refused(Describe, kind, &denied.iter().map(s).collect::<Vec<_>>());
    let mut rest = body.clone();
    rest.coordinator_keys.retain(|k| !denied.contains(k));
    partial(
        req,
        &rest,
        rest.coordinator_keys.is_empty(),
        move |r: &mut FindCoordinatorResponse| {
            r.coordinators.extend(denied.into_iter().map(|k| {
                find_coordinator_response::Coordinator::default()
                    .with_key(k)
                    .with_node_id(BrokerId(-1))
                    .with_port(-1)
                    .with_error_code(code)
            }))
        },
    )
}

pub(super) fn add_partitions_to_txn(
    a: &Access,
    req: &RequestFrame,
) -> Result<Verdict, HandlerError> {
    // v4+ is the brokers' batched form, not offered to clients.
    let body: AddPartitionsToTxnRequest = req.decode_body()?;
    let txn_ok = one(
        a,
        Write,
        TransactionalId,
        s(&body.v3_and_below_transactional_id),
    );
    let names: Vec<&str> = body
        .v3_and_below_topics
        .iter()
        .map(|t| s(&t.name))
        .collect();
    let denied: HashSet<&str> = if txn_ok {
        a.denied_topics(Write, &names).into_iter().collect()
    } else {
        HashSet::new()
    };
    if txn_ok && denied.is_empty() {
        return Ok(Verdict::Allow);
    }
    // Kafka answers the whole request: denied partitions with their code, the others
    // OPERATION_NOT_ATTEMPTED.
    let results = body
        .v3_and_below_topics
        .iter()
        .map(|t| {
            let code = match (txn_ok, denied.contains(s(&t.name))) {
                (false, _) => TXN_DENIED,
                (true, true) => TOPIC_DENIED,
                (true, false) => codes::OPERATION_NOT_ATTEMPTED,
            };
            add_partitions_to_txn_response::AddPartitionsToTxnTopicResult::default()
                .with_name(t.name.clone())
                .with_results_by_partition(
                    t.partitions
                        .iter()
                        .map(|p| {
                            add_partitions_to_txn_response::AddPartitionsToTxnPartitionResult::default()
                                .with_partition_index(*p)
                                .with_partition_error_code(code)
                        })
                        .collect(),
                )
        })
        .collect();
    let resp = AddPartitionsToTxnResponse::default().with_results_by_topic_v3_and_below(results);
    Ok(Verdict::Answer(typed_reply(req, &resp)?))
}

pub(super) fn offset_commit(
    ctx: &Ctx,
    a: &Access,
    req: &RequestFrame,
) -> Result<Verdict, HandlerError> {
    use offset_commit_response::{
        OffsetCommitResponsePartition as P, OffsetCommitResponseTopic as T,
    };
    let body: OffsetCommitRequest = req.decode_body()?;
    let topo = ctx.topology().load();
    // v10 names topics by id; an id shardgate cannot name yet is never authorized blindly.
    let name_of = |t: &offset_commit_request::OffsetCommitRequestTopic| -> Option<String> {
        if t.topic_id.is_nil() {
            Some(t.name.0.to_string())
        } else {
            topo.topic_name(&t.topic_id).map(|n| n.to_string())
        }
    };
    if body.topics.iter().any(|t| name_of(t).is_none()) {
        ctx.topology().request_refresh();
    }
    let names: Vec<String> = body.topics.iter().filter_map(name_of).collect();
    let (code, denied) = topic_refusals(a, &body.group_id, None, &names);
    let refusal = |t: &offset_commit_request::OffsetCommitRequestTopic| {
        let code = if name_of(t).is_none() {
            codes::UNKNOWN_TOPIC_ID
        } else {
            code
        };
        let parts: Vec<i32> = t.partitions.iter().map(|p| p.partition_index).collect();
        T::default()
            .with_name(t.name.clone())
            .with_topic_id(t.topic_id)
            .with_partitions(partitions_with(&parts, |p: P, i| {
                p.with_partition_index(i).with_error_code(code)
            }))
    };
    if code != TOPIC_DENIED {
        // The group is denied: nothing goes to its coordinator, even a commit of no topic.
        let errors: Vec<T> = body.topics.iter().map(refusal).collect();
        return partial(req, &body, true, move |r: &mut OffsetCommitResponse| {
            r.topics.extend(errors)
        });
    }
    without(
        req,
        &body,
        |r: &mut OffsetCommitRequest| &mut r.topics,
        |t| name_of(t).is_none_or(|n| denied.contains(&n)),
        refusal,
        |r: &mut OffsetCommitResponse| &mut r.topics,
    )
}

/// The code and the topics refused for a commit-like request: every topic when the
/// transactional id (WRITE) or the group (READ) is denied, else those without READ.
fn topic_refusals(
    a: &Access,
    group: &GroupId,
    transactional_id: Option<&kafka_protocol::messages::TransactionalId>,
    names: &[String],
) -> (i16, HashSet<String>) {
    let refused = if transactional_id.is_some_and(|t| !one(a, Write, TransactionalId, s(t))) {
        Some(TXN_DENIED)
    } else if !one(a, Read, Group, s(group)) {
        Some(GROUP_DENIED)
    } else {
        None
    };
    match refused {
        Some(code) => (code, names.iter().cloned().collect()),
        None => {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let denied = a.denied_topics(Read, &refs);
            (
                TOPIC_DENIED,
                denied.into_iter().map(str::to_string).collect(),
            )
        }
    }
}

pub(super) fn txn_offset_commit(a: &Access, req: &RequestFrame) -> Result<Verdict, HandlerError> {
    use txn_offset_commit_response::{
        TxnOffsetCommitResponsePartition as P, TxnOffsetCommitResponseTopic as T,
    };
    let body: TxnOffsetCommitRequest = req.decode_body()?;
    let names: Vec<String> = body.topics.iter().map(|t| t.name.to_string()).collect();
    let (code, denied) = topic_refusals(a, &body.group_id, Some(&body.transactional_id), &names);
    if code != TOPIC_DENIED {
        // The transactional id or group is denied: nothing goes to the coordinator.
        let errors: Vec<T> = body
            .topics
            .iter()
            .map(|t| {
                let parts: Vec<i32> = t.partitions.iter().map(|p| p.partition_index).collect();
                T::default()
                    .with_name(t.name.clone())
                    .with_partitions(partitions_with(&parts, |p: P, i| {
                        p.with_partition_index(i).with_error_code(code)
                    }))
            })
            .collect();
        return partial(req, &body, true, move |r: &mut TxnOffsetCommitResponse| {
            r.topics.extend(errors)
        });
    }
    without(
        req,
        &body,
        |r: &mut TxnOffsetCommitRequest| &mut r.topics,
        |t| denied.contains(s(&t.name)),
        |t| {
            let parts: Vec<i32> = t.partitions.iter().map(|p| p.partition_index).collect();
            T::default()
                .with_name(t.name.clone())
                .with_partitions(partitions_with(&parts, |p: P, i| {
                    p.with_partition_index(i).with_error_code(code)
                }))
        },
        |r: &mut TxnOffsetCommitResponse| &mut r.topics,
    )
}

pub(super) fn offset_fetch(
    ctx: &Ctx,
    a: &Access,
    req: &RequestFrame,
) -> Result<Verdict, HandlerError> {
    let body: OffsetFetchRequest = req.decode_body()?;
    let visible = seen_by(a, Topic);
    // v10 names topics by id in its answer.
    let topo = ctx.topology().load();
    // An id shardgate cannot name is not shown (never authorized blindly).
    let name = move |name: &TopicName, id: &uuid::Uuid| -> Option<String> {
        if name.is_empty() && !id.is_nil() {
            topo.topic_name(id).map(|n| n.to_string())
        } else {
            Some(name.to_string())
        }
    };
    if req.api_version < 8 {
        if !one(a, Describe, Group, s(&body.group_id)) {
            if req.api_version >= 2 {
                return whole(req, s(&body.group_id), GROUP_DENIED);
            }
            // v1 has no top-level error: every asked partition carries it.
            use offset_fetch_response::{
                OffsetFetchResponsePartition as P, OffsetFetchResponseTopic as T,
            };
            let topics = body
                .topics
                .iter()
                .flatten()
                .map(|t| {
                    T::default()
                        .with_name(t.name.clone())
                        .with_partitions(partitions_with(&t.partition_indexes, |p: P, i| {
                            p.with_partition_index(i)
                                .with_committed_offset(-1)
                                .with_error_code(GROUP_DENIED)
                        }))
                })
                .collect();
            let resp = OffsetFetchResponse::default().with_topics(topics);
            return Ok(Verdict::Answer(typed_reply(req, &resp)?));
        }
        let all = body.topics.is_none();
        return Ok(Verdict::Rewrite {
            req: req.clone(),
            fix: fix_with(move |r: &mut OffsetFetchResponse| {
                r.topics.retain_mut(|t| {
                    let ok = name(&t.name, &uuid::Uuid::nil()).is_some_and(|n| visible(&n));
                    if !ok {
                        for p in &mut t.partitions {
                            (p.error_code, p.committed_offset, p.metadata) =
                                (TOPIC_DENIED, -1, None);
                        }
                    }
                    ok || !all
                })
            }),
        });
    }
    let group_visible = seen_by(a, Group);
    let denied: Vec<&str> = body
        .groups
        .iter()
        .map(|g| s(&g.group_id))
        .filter(|g| !group_visible(g))
        .collect();
    a.refused(Describe, Group, &denied);
    // Groups asking for all their topics: those it may not describe are left out (as Kafka
    // does); topics asked by name are answered TOPIC_AUTHORIZATION_FAILED.
    let all: HashSet<GroupId> = body
        .groups
        .iter()
        .filter(|g| g.topics.is_none())
        .map(|g| g.group_id.clone())
        .collect();
    Ok(Verdict::Rewrite {
        req: req.clone(),
        fix: fix_with(move |r: &mut OffsetFetchResponse| {
            for g in &mut r.groups {
                if !group_visible(s(&g.group_id)) {
                    g.topics.clear();
                    g.error_code = GROUP_DENIED;
                    continue;
                }
                let all = all.contains(&g.group_id);
                g.topics.retain_mut(|t| {
                    let ok = name(&t.name, &t.topic_id).is_some_and(|n| visible(&n));
                    if !ok {
                        for p in &mut t.partitions {
                            (p.error_code, p.committed_offset, p.metadata) =
                                (TOPIC_DENIED, -1, None);
                        }
                    }
                    ok || !all
                });
            }
        }),
    })
}

pub(super) fn offset_delete(a: &Access, req: &RequestFrame) -> Result<Verdict, HandlerError> {
    use offset_delete_response::{
        OffsetDeleteResponsePartition as P, OffsetDeleteResponseTopic as T,
    };
    let body: OffsetDeleteRequest = req.decode_body()?;
    if !one(a, Delete, Group, s(&body.group_id)) {
        let resp = OffsetDeleteResponse::default().with_error_code(GROUP_DENIED);
        return Ok(Verdict::Answer(typed_reply(req, &resp)?));
    }
    let names: Vec<&str> = body.topics.iter().map(|t| s(&t.name)).collect();
    let denied: HashSet<&str> = a.denied_topics(Read, &names).into_iter().collect();
    without(
        req,
        &body,
        |r: &mut OffsetDeleteRequest| &mut r.topics,
        |t| denied.contains(s(&t.name)),
        |t| {
            let parts: Vec<i32> = t.partitions.iter().map(|p| p.partition_index).collect();
            T::default()
                .with_name(t.name.clone())
                .with_partitions(partitions_with(&parts, |p: P, i| {
                    p.with_partition_index(i).with_error_code(TOPIC_DENIED)
                }))
        },
        |r: &mut OffsetDeleteResponse| &mut r.topics,
    )
}

pub(super) fn describe_groups(a: &Access, req: &RequestFrame) -> Result<Verdict, HandlerError> {
    use describe_groups_response::DescribedGroup as G;
    let body: DescribeGroupsRequest = req.decode_body()?;
    hide_groups(
        a,
        req,
        &body.groups,
        body.include_authorized_operations,
        |r: &mut DescribeGroupsResponse| &mut r.groups,
        |g: &mut G| (&mut g.group_id, &mut g.authorized_operations),
        |id| G::default().with_group_id(id).with_error_code(GROUP_DENIED),
    )
}

/// Groups the principal may not describe answered GROUP_AUTHORIZATION_FAILED (nothing else);
/// the others' authorized operations computed for the principal when asked for.
fn hide_groups<Resp, G>(
    a: &Access,
    req: &RequestFrame,
    asked: &[GroupId],
    with_ops: bool,
    groups: fn(&mut Resp) -> &mut Vec<G>,
    fields: fn(&mut G) -> (&mut GroupId, &mut i32),
    refused: fn(GroupId) -> G,
) -> Result<Verdict, HandlerError>
where
    Resp: Decodable + Encodable + Default + 'static,
    G: 'static,
{
    let denied: Vec<&str> = asked
        .iter()
        .map(|g| s(g))
        .filter(|g| !a.allows(Describe, Group, g))
        .collect();
    a.refused(Describe, Group, &denied);
    let (acls, who) = (a.acls.clone(), a.who.clone());
    Ok(Verdict::Rewrite {
        req: req.clone(),
        fix: fix_with(move |r: &mut Resp| {
            for g in groups(r) {
                let (id, ops) = fields(g);
                if !acls.authorize(&who, Describe, Group, s(id)) {
                    let id = id.clone();
                    *g = refused(id);
                    *fields(g).1 = i32::MIN;
                } else if with_ops {
                    *ops = acls.authorized_operations(&who, Group, s(id));
                }
            }
        }),
    })
}

pub(super) fn consumer_group_describe(
    a: &Access,
    req: &RequestFrame,
) -> Result<Verdict, HandlerError> {
    use consumer_group_describe_response::DescribedGroup as G;
    let body: ConsumerGroupDescribeRequest = req.decode_body()?;
    hide_groups(
        a,
        req,
        &body.group_ids,
        body.include_authorized_operations,
        |r: &mut ConsumerGroupDescribeResponse| &mut r.groups,
        |g: &mut G| (&mut g.group_id, &mut g.authorized_operations),
        |id| G::default().with_group_id(id).with_error_code(GROUP_DENIED),
    )
}

pub(super) fn delete_groups(a: &Access, req: &RequestFrame) -> Result<Verdict, HandlerError> {
    let body: DeleteGroupsRequest = req.decode_body()?;
    let denied: Vec<&str> = body
        .groups_names
        .iter()
        .map(|g| s(g))
        .filter(|g| !a.allows(Delete, Group, g))
        .collect();
    a.refused(Delete, Group, &denied);
    without(
        req,
        &body,
        |r: &mut DeleteGroupsRequest| &mut r.groups_names,
        |g| denied.contains(&s(g)),
        |g| {
            delete_groups_response::DeletableGroupResult::default()
                .with_group_id(g.clone())
                .with_error_code(GROUP_DENIED)
        },
        |r: &mut DeleteGroupsResponse| &mut r.results,
    )
}
