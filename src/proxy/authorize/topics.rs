//! Topic and cluster administration: creating, deleting and altering topics, configs, ACLs.

use std::collections::HashSet;

use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

use super::apis::*;
use super::{Access, Verdict, also, fix_with, partial, without};
use crate::auth::acl::{Operation, ResourceType};
use crate::protocol::RequestFrame;
use crate::proxy::forward::typed_reply;
use crate::proxy::{Ctx, HandlerError, Reply};

use Operation::*;
use ResourceType::{Cluster, Group, Topic};

pub(super) fn create_topics(a: &Access, req: &RequestFrame) -> Result<Verdict, HandlerError> {
    let body: CreateTopicsRequest = req.decode_body()?;
    let names: Vec<&str> = body.topics.iter().map(|t| s(&t.name)).collect();
    let denied: HashSet<&str> = if a.cluster(Create) {
        HashSet::new()
    } else {
        a.denied_topics(Create, &names).into_iter().collect()
    };
    // Kafka shows a created topic's configs only with DESCRIBE_CONFIGS on it.
    let hidden: HashSet<String> = names
        .iter()
        .filter(|n| !a.allows(DescribeConfigs, Topic, n))
        .map(|n| n.to_string())
        .collect();
    let verdict = without(
        req,
        &body,
        |r: &mut CreateTopicsRequest| &mut r.topics,
        |t| denied.contains(s(&t.name)),
        |t| {
            create_topics_response::CreatableTopicResult::default()
                .with_name(t.name.clone())
                .with_error_code(TOPIC_DENIED)
                .with_num_partitions(-1)
                .with_replication_factor(-1)
        },
        |r: &mut CreateTopicsResponse| &mut r.topics,
    )?;
    if hidden.is_empty() {
        return Ok(verdict);
    }
    Ok(also(
        verdict,
        req,
        fix_with(move |r: &mut CreateTopicsResponse| {
            for t in &mut r.topics {
                if t.error_code == 0 && hidden.contains(s(&t.name)) {
                    t.configs = None;
                    t.topic_config_error_code = TOPIC_DENIED;
                }
            }
        }),
    ))
}

pub(super) fn delete_topics(
    ctx: &Ctx,
    a: &Access,
    req: &RequestFrame,
) -> Result<Verdict, HandlerError> {
    use delete_topics_response::DeletableTopicResult as R;
    let body: DeleteTopicsRequest = req.decode_body()?;
    let topo = ctx.topology().load();
    let mut rest = body.clone();
    let mut errors: Vec<R> = Vec::new();
    let mut refused: Vec<String> = Vec::new();
    rest.topic_names.retain(|n| {
        let ok = a.allows(Delete, Topic, s(n));
        if !ok {
            refused.push(n.to_string());
            errors.push(
                R::default()
                    .with_name(Some(n.clone()))
                    .with_error_code(TOPIC_DENIED),
            );
        }
        ok
    });
    rest.topics.retain(|t| {
        let name = t
            .name
            .clone()
            .or_else(|| topo.topic_name(&t.topic_id).cloned().map(TopicName));
        // An id shardgate cannot name yet (a topic created since its last refresh) is not
        // authorized blindly: UNKNOWN_TOPIC_ID (retriable), and the topology is refreshed.
        let Some(name) = name else {
            ctx.topology().request_refresh();
            errors.push(
                R::default()
                    .with_topic_id(t.topic_id)
                    .with_error_code(crate::protocol::codes::UNKNOWN_TOPIC_ID),
            );
            return false;
        };
        let ok = a.allows(Delete, Topic, s(&name));
        if !ok {
            refused.push(name.to_string());
            errors.push(
                R::default()
                    .with_name(t.name.clone())
                    .with_topic_id(t.topic_id)
                    .with_error_code(TOPIC_DENIED),
            );
        }
        ok
    });
    if errors.is_empty() {
        return Ok(Verdict::Allow);
    }
    a.refused(
        Delete,
        Topic,
        &refused.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let nothing_left = rest.topic_names.is_empty() && rest.topics.is_empty();
    partial(
        req,
        &rest,
        nothing_left,
        move |r: &mut DeleteTopicsResponse| r.responses.extend(errors),
    )
}

pub(super) fn create_partitions(a: &Access, req: &RequestFrame) -> Result<Verdict, HandlerError> {
    let body: CreatePartitionsRequest = req.decode_body()?;
    let names: Vec<&str> = body.topics.iter().map(|t| s(&t.name)).collect();
    let denied: HashSet<&str> = a.denied_topics(Alter, &names).into_iter().collect();
    without(
        req,
        &body,
        |r: &mut CreatePartitionsRequest| &mut r.topics,
        |t| denied.contains(s(&t.name)),
        |t| {
            create_partitions_response::CreatePartitionsTopicResult::default()
                .with_name(t.name.clone())
                .with_error_code(TOPIC_DENIED)
        },
        |r: &mut CreatePartitionsResponse| &mut r.results,
    )
}

/// The resource a config entry is about, and the code for refusing it.
fn config_resource(resource_type: i8) -> (ResourceType, i16) {
    match resource_type {
        CONFIG_TOPIC => (Topic, TOPIC_DENIED),
        CONFIG_GROUP => (Group, GROUP_DENIED),
        _ => (Cluster, CLUSTER_DENIED),
    }
}

fn config_allowed(a: &Access, op: Operation, resource_type: i8, name: &str) -> bool {
    match config_resource(resource_type) {
        (Cluster, _) => a.cluster(op),
        (kind, _) => a.allows(op, kind, name),
    }
}

pub(super) fn describe_configs(a: &Access, req: &RequestFrame) -> Result<Verdict, HandlerError> {
    let body: DescribeConfigsRequest = req.decode_body()?;
    let denied: Vec<(i8, StrBytes)> = body
        .resources
        .iter()
        .filter(|r| !config_allowed(a, DescribeConfigs, r.resource_type, s(&r.resource_name)))
        .map(|r| (r.resource_type, r.resource_name.clone()))
        .collect();
    if denied.is_empty() {
        return Ok(Verdict::Allow);
    }
    for (t, n) in &denied {
        a.refused(DescribeConfigs, config_resource(*t).0, &[s(n)]);
    }
    Ok(Verdict::Rewrite {
        req: req.clone(),
        fix: fix_with(move |r: &mut DescribeConfigsResponse| {
            for res in &mut r.results {
                if denied.contains(&(res.resource_type, res.resource_name.clone())) {
                    res.configs.clear();
                    res.error_code = config_resource(res.resource_type).1;
                    res.error_message = None;
                }
            }
        }),
    })
}

pub(super) fn alter_configs(a: &Access, req: &RequestFrame) -> Result<Verdict, HandlerError> {
    use alter_configs_response::AlterConfigsResourceResponse as R;
    let body: AlterConfigsRequest = req.decode_body()?;
    without(
        req,
        &body,
        |r: &mut AlterConfigsRequest| &mut r.resources,
        |r| !config_alter_allowed(a, r.resource_type, &r.resource_name),
        |r| {
            R::default()
                .with_resource_type(r.resource_type)
                .with_resource_name(r.resource_name.clone())
                .with_error_code(config_resource(r.resource_type).1)
        },
        |r: &mut AlterConfigsResponse| &mut r.responses,
    )
}

/// ALTER_CONFIGS on a config resource, refusals counted and logged.
fn config_alter_allowed(a: &Access, resource_type: i8, name: &StrBytes) -> bool {
    let ok = config_allowed(a, AlterConfigs, resource_type, s(name));
    if !ok {
        a.refused(AlterConfigs, config_resource(resource_type).0, &[s(name)]);
    }
    ok
}

pub(super) fn incremental_alter_configs(
    a: &Access,
    req: &RequestFrame,
) -> Result<Verdict, HandlerError> {
    use incremental_alter_configs_response::AlterConfigsResourceResponse as R;
    let body: IncrementalAlterConfigsRequest = req.decode_body()?;
    without(
        req,
        &body,
        |r: &mut IncrementalAlterConfigsRequest| &mut r.resources,
        |r| !config_alter_allowed(a, r.resource_type, &r.resource_name),
        |r| {
            R::default()
                .with_resource_type(r.resource_type)
                .with_resource_name(r.resource_name.clone())
                .with_error_code(config_resource(r.resource_type).1)
        },
        |r: &mut IncrementalAlterConfigsResponse| &mut r.responses,
    )
}

/// CreateAcls, DeleteAcls and DeleteRecords refused: every entry answered with its code.
pub(super) fn cluster_change_refused(req: &RequestFrame) -> Result<Reply, HandlerError> {
    match req.api_key {
        ApiKey::CreateAcls => {
            let body: CreateAclsRequest = req.decode_body()?;
            let results = body
                .creations
                .iter()
                .map(|_| {
                    create_acls_response::AclCreationResult::default()
                        .with_error_code(CLUSTER_DENIED)
                })
                .collect();
            typed_reply(req, &CreateAclsResponse::default().with_results(results))
        }
        ApiKey::DeleteAcls => {
            let body: DeleteAclsRequest = req.decode_body()?;
            let results = body
                .filters
                .iter()
                .map(|_| {
                    delete_acls_response::DeleteAclsFilterResult::default()
                        .with_error_code(CLUSTER_DENIED)
                })
                .collect();
            typed_reply(
                req,
                &DeleteAclsResponse::default().with_filter_results(results),
            )
        }
        _ => {
            use delete_records_response::{
                DeleteRecordsPartitionResult as P, DeleteRecordsTopicResult as T,
            };
            let body: DeleteRecordsRequest = req.decode_body()?;
            let topics = body
                .topics
                .iter()
                .map(|t| {
                    let parts: Vec<i32> = t.partitions.iter().map(|p| p.partition_index).collect();
                    T::default()
                        .with_name(t.name.clone())
                        .with_partitions(partitions_with(&parts, |p: P, i| {
                            p.with_partition_index(i)
                                .with_low_watermark(-1)
                                .with_error_code(TOPIC_DENIED)
                        }))
                })
                .collect();
            typed_reply(req, &DeleteRecordsResponse::default().with_topics(topics))
        }
    }
}
