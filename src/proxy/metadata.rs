//! The cluster view: Metadata, FindCoordinator and DescribeCluster, answered with upstream
//! data rewritten to the virtual cluster (brokers = shardgate instances).

use kafka_protocol::messages::*;

use super::authorize::Access;
use super::connection::ClientConn;
use super::forward::{any_broker, call_typed, typed_reply};
use super::{Ctx, HandlerError, Reply};
use crate::auth::acl::{CLUSTER_NAME, Operation, ResourceType};
use crate::protocol::{RequestFrame, codes};

pub async fn cluster_view(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
) -> Result<Reply, HandlerError> {
    let broker = any_broker(ctx, client)?;
    match req.api_key {
        ApiKey::Metadata => {
            let mut body: MetadataRequest = req.decode_body()?;
            let all = body.topics.is_none()
                || (req.api_version == 0 && body.topics.as_ref().is_some_and(|t| t.is_empty()));
            let access = Access::of(ctx, client, ApiKey::Metadata);
            if let Some(a) = &access {
                no_unauthorized_creation(a, &mut body);
            }
            let mut resp: MetadataResponse = call_typed(ctx, client, broker, req, &body).await?;
            ctx.topology().absorb(&resp, all);
            ctx.cluster.rewrite_metadata(&mut resp);
            if let Some(a) = &access {
                filter_metadata(a, &body, all, &mut resp);
            }
            typed_reply(req, &resp)
        }
        ApiKey::FindCoordinator => {
            let body: FindCoordinatorRequest = req.decode_body()?;
            let mut resp: FindCoordinatorResponse =
                call_typed(ctx, client, broker, req, &body).await?;
            if resp.coordinators.is_empty() {
                if resp.error_code == 0 {
                    ctx.coordinators
                        .put(body.key_type, &body.key, resp.node_id.0);
                }
            } else {
                for c in &resp.coordinators {
                    if c.error_code == 0 {
                        ctx.coordinators.put(body.key_type, &c.key, c.node_id.0);
                    }
                }
            }
            ctx.cluster
                .rewrite_find_coordinator(&mut resp, body.key_type, &body.key);
            typed_reply(req, &resp)
        }
        ApiKey::DescribeCluster => {
            let body: DescribeClusterRequest = req.decode_body()?;
            let mut resp: DescribeClusterResponse =
                call_typed(ctx, client, broker, req, &body).await?;
            ctx.cluster.rewrite_describe_cluster(&mut resp);
            if let Some(a) = Access::of(ctx, client, ApiKey::DescribeCluster)
                && body.include_cluster_authorized_operations
            {
                resp.cluster_authorized_operations =
                    a.authorized_operations(ResourceType::Cluster, CLUSTER_NAME);
            }
            typed_reply(req, &resp)
        }
        other => Err(HandlerError::Protocol(
            crate::protocol::ProtocolError::Decode {
                what: format!("{other:?}"),
                message: "not a cluster-view API".into(),
            },
        )),
    }
}

/// Asked topics the client may not create are not created by asking for them (Kafka answers
/// UNKNOWN_TOPIC_OR_PARTITION then, as it does without the CREATE right).
fn no_unauthorized_creation(a: &Access, body: &mut MetadataRequest) {
    if body.allow_auto_topic_creation && !a.cluster(Operation::Create) {
        let all_creatable = body.topics.iter().flatten().all(|t| {
            t.name
                .as_ref()
                .is_some_and(|n| a.allows(Operation::Create, ResourceType::Topic, n.as_str()))
        });
        if !all_creatable {
            body.allow_auto_topic_creation = false;
        }
    }
}

/// Kafka's rule: topics the client may not DESCRIBE are left out of an all-topics answer, and
/// answered TOPIC_AUTHORIZATION_FAILED (nothing else: not even whether they exist) when asked
/// by name. Authorized-operation bit fields are the client's, not shardgate's.
fn filter_metadata(a: &Access, body: &MetadataRequest, all: bool, resp: &mut MetadataResponse) {
    let mut refused = Vec::new();
    resp.topics.retain_mut(|t| {
        let name = t.name.as_ref().map(|n| n.to_string()).unwrap_or_default();
        if a.allows(Operation::Describe, ResourceType::Topic, &name) {
            if body.include_topic_authorized_operations {
                t.topic_authorized_operations = a.authorized_operations(ResourceType::Topic, &name);
            }
            return true;
        }
        if all {
            return false;
        }
        refused.push(name);
        *t = metadata_response::MetadataResponseTopic::default()
            .with_name(t.name.clone())
            .with_error_code(codes::TOPIC_AUTHORIZATION_FAILED)
            .with_topic_authorized_operations(i32::MIN);
        true
    });
    a.refused(
        Operation::Describe,
        ResourceType::Topic,
        &refused.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    if body.include_cluster_authorized_operations {
        resp.cluster_authorized_operations =
            a.authorized_operations(ResourceType::Cluster, CLUSTER_NAME);
    }
}
