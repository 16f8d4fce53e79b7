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
            let uncreatable = match &access {
                Some(a) => no_unauthorized_creation(a, &mut body),
                None => Vec::new(),
            };
            let mut resp: MetadataResponse = call_typed(ctx, client, broker, req, &body).await?;
            ctx.topology().absorb(&resp, all);
            ctx.cluster.rewrite_metadata(&mut resp);
            if let Some(a) = &access {
                filter_metadata(a, &body, all, &uncreatable, &mut resp);
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
                resp.cluster_authorized_operations = cluster_operations(&a);
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

/// Asked topics the client may not create (CREATE, and DESCRIBE: Kafka creates only what the
/// principal may see) are not created by asking for them; their names, answered
/// TOPIC_AUTHORIZATION_FAILED when they do not exist, as Kafka answers.
fn no_unauthorized_creation(a: &Access, body: &mut MetadataRequest) -> Vec<String> {
    if !body.allow_auto_topic_creation {
        return Vec::new();
    }
    let cluster_create = a.cluster(Operation::Create);
    let uncreatable: Vec<String> = body
        .topics
        .iter()
        .flatten()
        .filter_map(|t| t.name.as_ref().map(|n| n.to_string()))
        .filter(|n| {
            !(a.allows(Operation::Describe, ResourceType::Topic, n)
                && (cluster_create || a.allows(Operation::Create, ResourceType::Topic, n)))
        })
        .collect();
    if !uncreatable.is_empty() {
        body.allow_auto_topic_creation = false;
    }
    uncreatable
}

/// Kafka's rule: topics the client may not DESCRIBE are left out of an all-topics answer, and
/// answered TOPIC_AUTHORIZATION_FAILED (nothing else: not even whether they exist) when asked
/// for (by id: the id kept, no name). Authorized-operation bit fields are the client's, not
/// shardgate's.
fn filter_metadata(
    a: &Access,
    body: &MetadataRequest,
    all: bool,
    uncreatable: &[String],
    resp: &mut MetadataResponse,
) {
    let mut refused = Vec::new();
    let by_id = |id: &uuid::Uuid| {
        !id.is_nil()
            && body
                .topics
                .iter()
                .flatten()
                .any(|t| t.topic_id == *id && t.name.is_none())
    };
    resp.topics.retain_mut(|t| {
        let name = t.name.as_ref().map(|n| n.to_string()).unwrap_or_default();
        if a.allows(Operation::Describe, ResourceType::Topic, &name) {
            if body.include_topic_authorized_operations {
                t.topic_authorized_operations = a.authorized_operations(ResourceType::Topic, &name);
            }
            if t.error_code == codes::UNKNOWN_TOPIC_OR_PARTITION && uncreatable.contains(&name) {
                t.error_code = codes::TOPIC_AUTHORIZATION_FAILED;
            }
            return true;
        }
        if all {
            return false;
        }
        refused.push(name);
        let refusal = metadata_response::MetadataResponseTopic::default()
            .with_error_code(codes::TOPIC_AUTHORIZATION_FAILED)
            .with_topic_authorized_operations(i32::MIN);
        *t = if by_id(&t.topic_id) {
            refusal.with_topic_id(t.topic_id)
        } else {
            refusal.with_name(t.name.clone())
        };
        true
    });
    a.refused(
        Operation::Describe,
        ResourceType::Topic,
        &refused.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    if body.include_cluster_authorized_operations {
        resp.cluster_authorized_operations = cluster_operations(a);
    }
}

/// The client's authorized operations on the cluster (none without DESCRIBE on it, as Kafka).
fn cluster_operations(a: &Access) -> i32 {
    if a.cluster(Operation::Describe) {
        a.authorized_operations(ResourceType::Cluster, CLUSTER_NAME)
    } else {
        0
    }
}
