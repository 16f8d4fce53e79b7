//! Authorization of client requests (`[authorization]`): upstream sees shardgate's principal,
//! so what each client principal may do is decided here, before a request is routed.
//!
//! A request is let through, answered at once (everything it names is denied), or forwarded
//! without the resources it may not touch, their error entries added to the answer: the codes
//! Kafka's own authorizer would give (TOPIC_, GROUP_, CLUSTER_, TRANSACTIONAL_ID_
//! AUTHORIZATION_FAILED). Produce, Fetch, ListOffsets, OffsetForLeaderEpoch, DeleteRecords and
//! Metadata check their topics in their own paths (`topic_denied`, `Access`), where partitions
//! already get per-partition answers.
//!
//! Independently of ACLs, requests that change the real cluster as shardgate's principal
//! (CreateAcls, DeleteAcls, DeleteRecords) are refused unless `allow_cluster_changes` is set
//! or the principal is a super user.

mod apis;
mod groups;
mod topics;

use kafka_protocol::messages::ApiKey;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion};

use super::connection::ClientConn;
use super::forward::typed_reply;
use super::{Ctx, HandlerError, Reply};
use crate::auth::acl::{Authorizer, Operation, ResourceType, Subject};
use crate::protocol::{RequestFrame, decode_response};

/// What to do with a request.
pub enum Verdict {
    /// Route it as it is.
    Allow,
    /// Answer it without routing (everything it names is denied).
    Answer(Reply),
    /// Route this request instead, then pass the answer through `fix`.
    Rewrite { req: RequestFrame, fix: Fix },
}

/// Adds the denied resources' entries to an answer (or filters what the client may not see).
pub type Fix = Box<dyn FnOnce(&RequestFrame, Reply) -> Result<Reply, HandlerError> + Send>;

/// A client principal's rights for one request.
pub struct Access {
    acls: std::sync::Arc<Authorizer>,
    pub who: Subject,
    api: ApiKey,
    conn: u64,
}

impl Access {
    /// None: authorization is off.
    pub fn of(ctx: &Ctx, client: &ClientConn, api: ApiKey) -> Option<Self> {
        let acls = ctx.acls.load_full()?;
        Some(Self {
            acls,
            who: client.subject(),
            api,
            conn: client.id,
        })
    }

    pub fn allows(&self, op: Operation, kind: ResourceType, name: &str) -> bool {
        self.acls.authorize(&self.who, op, kind, name)
    }

    pub fn cluster(&self, op: Operation) -> bool {
        self.allows(op, ResourceType::Cluster, crate::auth::acl::CLUSTER_NAME)
    }

    pub fn authorized_operations(&self, kind: ResourceType, name: &str) -> i32 {
        self.acls.authorized_operations(&self.who, kind, name)
    }

    /// Counts and logs a refusal (one line per request, naming the first resource).
    pub fn refused(&self, op: Operation, kind: ResourceType, names: &[&str]) {
        if names.is_empty() {
            return;
        }
        metrics::counter!(
            "shardgate_authorization_denied_total",
            "api" => format!("{:?}", self.api),
            "resource_type" => kind.name(),
        )
        .increment(names.len() as u64);
        tracing::info!(
            conn = self.conn,
            principal = %self.who.principal,
            host = %self.who.host,
            api = ?self.api,
            operation = op.name(),
            resource_type = kind.name(),
            resource = names[0],
            count = names.len(),
            "request denied by authorization rules"
        );
    }

    /// Topics of `names` this principal may not `op`, counted and logged.
    pub fn denied_topics<'n>(&self, op: Operation, names: &[&'n str]) -> Vec<&'n str> {
        let denied: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !self.allows(op, ResourceType::Topic, n))
            .collect();
        self.refused(op, ResourceType::Topic, &denied);
        denied
    }
}

/// Whether this client may change the real cluster (CreateAcls, DeleteAcls, DeleteRecords).
fn may_change_cluster(ctx: &Ctx, client: &ClientConn) -> bool {
    let auth = &ctx.settings.authorization;
    auth.allow_cluster_changes || {
        let who = client.subject();
        auth.super_users.contains(&who.principal)
    }
}

/// Decides what happens to a request before it is routed.
pub fn check(ctx: &Ctx, client: &ClientConn, req: &RequestFrame) -> Result<Verdict, HandlerError> {
    if matches!(
        req.api_key,
        ApiKey::CreateAcls | ApiKey::DeleteAcls | ApiKey::DeleteRecords
    ) && !may_change_cluster(ctx, client)
    {
        metrics::counter!(
            "shardgate_authorization_denied_total",
            "api" => format!("{:?}", req.api_key),
            "resource_type" => "Cluster",
        )
        .increment(1);
        tracing::info!(conn = client.id, principal = %client.subject().principal, api = ?req.api_key, "cluster change refused (authorization.allow_cluster_changes is false)");
        return topics::cluster_change_refused(req).map(Verdict::Answer);
    }
    match Access::of(ctx, client, req.api_key) {
        Some(access) => apis::check(ctx, &access, req),
        None => Ok(Verdict::Allow),
    }
}

/// Routes `body` (what is left of the request) and passes the answer through `add`; answers
/// with `add` applied to an empty response when nothing is left.
fn partial<Req, Resp>(
    req: &RequestFrame,
    body: &Req,
    nothing_left: bool,
    add: impl FnOnce(&mut Resp) + Send + 'static,
) -> Result<Verdict, HandlerError>
where
    Req: Encodable + HeaderVersion,
    Resp: Decodable + Encodable + Default + 'static,
{
    if nothing_left {
        let mut resp = Resp::default();
        add(&mut resp);
        return Ok(Verdict::Answer(typed_reply(req, &resp)?));
    }
    Ok(Verdict::Rewrite {
        req: req.with_body(body)?,
        fix: fix_with(add),
    })
}

/// The request without the entries `denied` picks (in the list `entries` gives), each of them
/// answered by `refusal` in the list `answers` gives; the request goes on unchanged when
/// nothing is denied.
fn without<Req, Resp, T, E>(
    req: &RequestFrame,
    body: &Req,
    entries: fn(&mut Req) -> &mut Vec<T>,
    denied: impl Fn(&T) -> bool,
    refusal: impl Fn(&T) -> E,
    answers: fn(&mut Resp) -> &mut Vec<E>,
) -> Result<Verdict, HandlerError>
where
    Req: Clone + Encodable + HeaderVersion,
    Resp: Decodable + Encodable + Default + 'static,
    E: Send + 'static,
{
    let mut rest = body.clone();
    let mut errors = Vec::new();
    entries(&mut rest).retain(|t| {
        let refused = denied(t);
        if refused {
            errors.push(refusal(t));
        }
        !refused
    });
    if errors.is_empty() {
        return Ok(Verdict::Allow);
    }
    let nothing_left = entries(&mut rest).is_empty();
    partial(req, &rest, nothing_left, move |r: &mut Resp| {
        answers(r).extend(errors)
    })
}

/// `verdict` with `extra` applied to the answer too (nothing to do when nothing is routed).
fn also(verdict: Verdict, req: &RequestFrame, extra: Fix) -> Verdict {
    match verdict {
        Verdict::Allow => Verdict::Rewrite {
            req: req.clone(),
            fix: extra,
        },
        Verdict::Answer(reply) => Verdict::Answer(reply),
        Verdict::Rewrite { req, fix } => Verdict::Rewrite {
            req,
            fix: Box::new(move |r, reply| fix(r, reply).and_then(|reply| extra(r, reply))),
        },
    }
}

/// A fix that decodes the answer, changes it and encodes it again.
fn fix_with<Resp>(change: impl FnOnce(&mut Resp) + Send + 'static) -> Fix
where
    Resp: Decodable + Encodable + Default + 'static,
{
    Box::new(move |req, reply| {
        let frame = match reply {
            Reply::Frame(b) if b.len() >= 4 => b.slice(4..),
            Reply::Forwarded { upstream, .. } => upstream,
            other => return Ok(other),
        };
        let mut resp: Resp = decode_response(req.api_key, req.api_version, frame)?;
        change(&mut resp);
        typed_reply(req, &resp)
    })
}
