//! One client connection. The read loop never waits on a request's processing: each request
//! is handed to its own task, and a sequencer writes the responses back in request order
//! (Kafka clients match responses by order as well as correlation id). Produce requests go
//! through a per-connection lane that queues them upstream in arrival order before their
//! responses are awaited concurrently, so pipelined produces keep their order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::ApiKey;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc, watch};

use super::responses::{Responses, Slot};
use super::{Ctx, Reply};
use crate::protocol::frame::FrameReader;
use crate::protocol::versions::{self, Route};
use crate::protocol::{RequestFrame, peek_prefix};
use crate::telemetry;

/// What is known about the client behind a connection.
#[derive(Debug, Clone)]
pub struct ClientConn {
    pub id: u64,
    pub peer: SocketAddr,
    /// Shared by every task working for this client: the last one to finish closes the
    /// upstream connections the client owned (a request still running after the client left
    /// may have opened one).
    _owned: Arc<OwnedSockets>,
    /// Set once a request's replica fields were forced to consumer values: warn once only.
    rewrote: Arc<std::sync::atomic::AtomicBool>,
    /// Until when (ms since the Unix epoch) this client's produces and fetches use sockets of
    /// its own: Kafka mutes a throttled client's *socket* for the throttle time (KIP-219), and
    /// on a shared socket that would stall every other client on it.
    throttled_until_ms: Arc<std::sync::atomic::AtomicU64>,
    /// Fetch read-ahead and upstream polls of this connection.
    pub fetch: Arc<super::fetch::readahead::ConnFetch>,
    /// The user the client authenticated as (SASL), once it has.
    principal: Arc<std::sync::OnceLock<String>>,
}

/// How long a client stays on its own sockets after its last throttled answer.
const THROTTLE_MEMORY_MS: u64 = 300_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Closes a client's own upstream connections when dropped.
struct OwnedSockets {
    id: u64,
    pool: Arc<crate::upstream::pool::Pool>,
}

impl std::fmt::Debug for OwnedSockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OwnedSockets({})", self.id)
    }
}

impl Drop for OwnedSockets {
    fn drop(&mut self) {
        self.pool.release(self.id);
    }
}

impl ClientConn {
    pub fn new(id: u64, peer: SocketAddr, pool: Arc<crate::upstream::pool::Pool>) -> Self {
        Self {
            id,
            peer,
            _owned: Arc::new(OwnedSockets { id, pool }),
            rewrote: Arc::default(),
            throttled_until_ms: Arc::default(),
            fetch: Arc::default(),
            principal: Arc::default(),
        }
    }

    /// The user the client authenticated as (None: no SASL on the listener, or not yet).
    pub fn principal(&self) -> Option<&str> {
        self.principal.get().map(String::as_str)
    }

    /// Sets the client's principal once (from its certificate; SASL sets it in the read loop).
    pub fn set_principal(&self, name: String) {
        let _ = self.principal.set(name);
    }

    /// Who the client is for authorization: its SASL user ("User:ANONYMOUS" without one) and
    /// address.
    pub fn subject(&self) -> crate::auth::acl::Subject {
        crate::auth::acl::Subject::new(self.principal(), self.peer.ip())
    }

    /// Notes a throttled answer (throttle_time_ms > 0) from upstream.
    pub fn note_throttle(&self, throttle_ms: i32) {
        if throttle_ms > 0 {
            let until = now_ms() + throttle_ms as u64 + THROTTLE_MEMORY_MS;
            self.throttled_until_ms
                .fetch_max(until, std::sync::atomic::Ordering::Relaxed);
            metrics::counter!("shardgate_throttled_answers_total").increment(1);
        }
    }

    /// Whether upstream throttled this client recently (its requests then avoid shared
    /// sockets).
    pub fn throttled(&self) -> bool {
        self.throttled_until_ms
            .load(std::sync::atomic::Ordering::Relaxed)
            > now_ms()
    }

    /// True the first time on this connection (see `client_fields::report`).
    pub fn first_rewrite(&self) -> bool {
        !self
            .rewrote
            .swap(true, std::sync::atomic::Ordering::Relaxed)
    }

    /// Upstream connection slot this client is pinned to.
    pub fn pin(&self) -> u64 {
        self.id
    }
}

/// Why the read loop stopped taking requests.
enum Stop {
    Eof,
    Idle,
    FirstRequest,
    SlowFrame,
    Bad,
    Shutdown,
    Closed,
}

pub async fn serve<S>(
    stream: S,
    client: ClientConn,
    ctx: Arc<Ctx>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let limits = &ctx.settings.raw.limits;
    let (rd, wr) = tokio::io::split(stream);
    let mut reader = FrameReader::new(rd, limits.max_frame_bytes);
    let responses = Responses::new(ctx.budget.clone());
    let writer = tokio::spawn({
        let (responses, id) = (responses.clone(), client.id);
        async move { responses.write_loop(wr, id).await }
    });
    let in_flight = Arc::new(Semaphore::new(limits.max_in_flight_per_connection));
    let (produce_tx, produce_rx) =
        mpsc::channel::<(RequestFrame, Slot, Instant)>(limits.max_in_flight_per_connection);
    tokio::spawn(produce_lane(produce_rx, client.clone(), ctx.clone()));
    let idle = Duration::from_millis(limits.idle_timeout_ms);
    let first_wait = Duration::from_millis(limits.handshake_timeout_ms);
    let frame_wait = Duration::from_millis(limits.request_read_timeout_ms);
    let mut first = true;
    let mut sasl = super::sasl::SaslConn::new(ctx.sasl.clone(), client.peer.ip());
    // Requests running for this client (produces excepted: the lane answers those). Reaped as
    // they end; aborted if the client goes away, so a fetch waiting up to its max wait or a
    // call held upstream does not outlive the connection.
    let mut running = tokio::task::JoinSet::new();

    let stop = loop {
        // Backpressure: no more than max_in_flight requests of this client at once.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break Stop::Closed;
        };
        let wait = if first { first_wait } else { idle };
        let size = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => break Stop::Shutdown,
            _ = responses.wait_closed() => break Stop::Closed,
            r = tokio::time::timeout(wait, reader.next_size()) => r,
        };
        let size = match size {
            Err(_) if first => break Stop::FirstRequest,
            Err(_) => break Stop::Idle,
            Ok(Ok(Some(size))) => size,
            Ok(Ok(None)) => break Stop::Eof,
            Ok(Err(e)) => break bad_frame(&client, e),
        };
        if let Some(limit) = sasl.frame_limit()
            && size > limit
        {
            metrics::counter!("shardgate_sasl_failures_total", "reason" => "large_frame_before_authentication", "mechanism" => "")
                .increment(1);
            tracing::warn!(conn = client.id, peer = %client.peer, size, limit, "frame larger than allowed before authentication; closing");
            break Stop::Bad;
        }
        // The frame is held (and its buffer allocated) only within the memory budget.
        let charge = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => break Stop::Shutdown,
            _ = responses.wait_closed() => break Stop::Closed,
            c = ctx.budget.reserve(size + 4) => c,
        };
        let frame = match tokio::time::timeout(frame_wait, reader.next()).await {
            Err(_) => break Stop::SlowFrame,
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => break Stop::Eof,
            Ok(Err(e)) => break bad_frame(&client, e),
        };
        first = false;
        metrics::counter!("shardgate_bytes_in_total").increment(frame.len() as u64 + 4);
        let started = Instant::now();
        let slot = responses.slot(Some(charge), Some(permit));
        let admitted = match admit(&client, frame) {
            Admitted::Request(req) if super::sasl::is_sasl(req.api_key) => {
                // In the read loop: the exchange's steps are in order and nothing else is
                // served before it ends.
                let a = sasl.answer(&req).await;
                if let Some(p) = a.principal {
                    // Re-authentication is checked to be the same user.
                    let _ = client.principal.set(p);
                }
                slot.complete(a.reply);
                if a.close {
                    break Stop::Bad;
                }
                continue;
            }
            Admitted::Request(req) => match sasl.check(req.api_key) {
                Ok(()) => Admitted::Request(req),
                Err((label, reason)) => {
                    metrics::counter!("shardgate_sasl_failures_total", "reason" => label, "mechanism" => "")
                        .increment(1);
                    tracing::warn!(conn = client.id, peer = %client.peer, api = ?req.api_key, reason, "closing");
                    Admitted::Refuse(reason.to_string())
                }
            },
            other => other,
        };
        match admitted {
            Admitted::Request(req) if req.api_key == ApiKey::Produce => {
                if produce_tx.send((req, slot, started)).await.is_err() {
                    break Stop::Closed;
                }
            }
            Admitted::Request(req) => {
                let ctx = ctx.clone();
                let client = client.clone();
                while running.try_join_next().is_some() {}
                running.spawn(async move {
                    let _counted = InProgress::start();
                    let reply = run(&ctx, &client, req, started).await;
                    slot.complete(reply);
                });
            }
            Admitted::Answer(frame) => slot.complete(Reply::Frame(frame)),
            Admitted::Refuse(reason) => {
                slot.complete(Reply::Close(reason));
                break Stop::Bad;
            }
        }
    };
    match stop {
        Stop::Idle => {
            tracing::debug!(conn = client.id, peer = %client.peer, "idle connection closed")
        }
        Stop::FirstRequest => {
            metrics::counter!("shardgate_connections_closed_total", "reason" => "no_first_request")
                .increment(1);
            tracing::info!(conn = client.id, peer = %client.peer, "no request within limits.handshake_timeout_ms; closing");
        }
        Stop::SlowFrame => {
            metrics::counter!("shardgate_connections_closed_total", "reason" => "slow_request")
                .increment(1);
            tracing::warn!(conn = client.id, peer = %client.peer, "request not received within limits.request_read_timeout_ms; closing");
        }
        Stop::Shutdown => {
            tracing::debug!(conn = client.id, "shutting down: answering what was read")
        }
        Stop::Eof | Stop::Bad | Stop::Closed => {}
    }
    drop(reader);
    drop(produce_tx);
    // Finished tasks stay in the set until reaped: only requests still running are
    // abandoned (abandoning drops the answers not yet written, such as a SASL refusal's).
    while running.try_join_next().is_some() {}
    if !matches!(stop, Stop::Shutdown) && !running.is_empty() {
        // The client is gone (or being closed): nobody will read these answers.
        metrics::counter!("shardgate_requests_abandoned_total").increment(running.len() as u64);
        responses.abandon();
        running.abort_all();
    }
    responses.reader_done();
    let _ = writer.await;
    ctx.groups.forget_connection(client.id);
    ctx.profiles.connection_closed(client.id);
    // The client's own upstream connections close when the last task holding `client` ends.
}

/// A request being worked on, for `shardgate_requests_in_progress` (dropped also when the
/// task is aborted).
struct InProgress;

impl InProgress {
    fn start() -> Self {
        metrics::gauge!("shardgate_requests_in_progress").increment(1.0);
        InProgress
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        metrics::gauge!("shardgate_requests_in_progress").decrement(1.0);
    }
}

/// A frame that cannot be read: counted, logged (unless the socket just failed), and the
/// connection closed.
fn bad_frame(client: &ClientConn, e: crate::protocol::frame::FrameError) -> Stop {
    telemetry::frame_error(e.kind());
    if !matches!(e, crate::protocol::frame::FrameError::Io(_)) {
        tracing::warn!(conn = client.id, peer = %client.peer, error = %e, "bad frame; closing connection");
    }
    Stop::Bad
}

enum Admitted {
    Request(RequestFrame),
    /// Answered without processing (ApiVersions downgrade).
    Answer(Bytes),
    /// Not answerable: close the connection, as a Kafka broker does.
    Refuse(String),
}

/// Checks api key and version and parses the header, before any processing.
fn admit(client: &ClientConn, frame: Bytes) -> Admitted {
    let prefix = match peek_prefix(&frame) {
        Ok(p) => p,
        Err(e) => {
            telemetry::frame_error(e.kind());
            tracing::warn!(conn = client.id, peer = %client.peer, error = %e, "malformed request");
            return Admitted::Refuse(e.to_string());
        }
    };
    let Some(supported) = versions::lookup(prefix.api_key) else {
        telemetry::frame_error("unknown_api_key");
        tracing::warn!(conn = client.id, peer = %client.peer, api_key = prefix.api_key, "unknown or unsupported api key; closing connection");
        return Admitted::Refuse(format!("unknown api key {}", prefix.api_key));
    };
    let range = versions::local_range(supported);
    if prefix.api_version < range.min || prefix.api_version > range.max {
        telemetry::frame_error("unsupported_version");
        if supported.api == ApiKey::ApiVersions {
            // KIP-511: answer a too-new ApiVersions with a v0 body carrying our ranges.
            tracing::info!(
                conn = client.id,
                version = prefix.api_version,
                "ApiVersions downgrade answer"
            );
            return match super::api_versions::downgrade_answer(prefix.correlation_id) {
                Ok(f) => Admitted::Answer(f),
                Err(e) => Admitted::Refuse(e.to_string()),
            };
        }
        tracing::warn!(conn = client.id, peer = %client.peer, api = ?supported.api, version = prefix.api_version, "unsupported version; closing connection");
        return Admitted::Refuse(format!(
            "{:?} v{} unsupported",
            supported.api, prefix.api_version
        ));
    }
    match RequestFrame::parse(supported.api, prefix.api_version, frame) {
        Ok(r) => Admitted::Request(r),
        Err(e) => {
            telemetry::frame_error(e.kind());
            tracing::warn!(conn = client.id, peer = %client.peer, error = %e, "malformed request header");
            Admitted::Refuse(e.to_string())
        }
    }
}

/// Runs a request to completion and records its metrics.
async fn run(ctx: &Arc<Ctx>, client: &ClientConn, req: RequestFrame, started: Instant) -> Reply {
    let api = req.api_key;
    let (req, fix) = match super::authorize::check(ctx, client, &req) {
        Ok(super::authorize::Verdict::Allow) => (req, None),
        Ok(super::authorize::Verdict::Answer(reply)) => {
            return finish(client, api, started, Ok(reply));
        }
        Ok(super::authorize::Verdict::Rewrite { req, fix }) => (req, Some(fix)),
        Err(e) => return finish(client, api, started, Err(e)),
    };
    let route = versions::lookup(api as i16).map(|s| s.route);
    let result = match route {
        Some(Route::Local) => super::api_versions::handle(ctx, &req),
        Some(Route::ClusterView) => super::metadata::cluster_view(ctx, client, &req).await,
        Some(Route::PartitionLeaders) => match api {
            ApiKey::Fetch => super::fetch::handle(ctx, client, &req).await,
            ApiKey::Produce => super::produce::handle(ctx, client, req.clone()).await,
            _ => super::partitioned::handle(ctx, client, &req).await,
        },
        Some(Route::GroupCoordinator) | Some(Route::TxnCoordinator) => {
            super::coordinator::forward_to_coordinator(ctx, client, &req).await
        }
        Some(Route::AnyBroker) => match api {
            ApiKey::DescribeConfigs | ApiKey::AlterConfigs | ApiKey::IncrementalAlterConfigs => {
                super::configs::handle(ctx, client, &req).await
            }
            _ => super::admin_apis::forward_to_any(ctx, client, &req).await,
        },
        Some(Route::AllBrokers) => super::admin_apis::list_groups(ctx, client, &req).await,
        // Answered by the read loop before requests are dispatched.
        Some(Route::Sasl) => Err(super::HandlerError::Protocol(
            crate::protocol::ProtocolError::UnknownApiKey(api as i16),
        )),
        None => Ok(Reply::Close("unroutable api".into())),
    };
    let result = match fix {
        Some(fix) => result.and_then(|reply| fix(&req, reply)),
        None => result,
    };
    finish(client, api, started, result)
}

pub(super) fn finish(
    client: &ClientConn,
    api: ApiKey,
    started: Instant,
    result: Result<Reply, super::HandlerError>,
) -> Reply {
    match result {
        Ok(reply) => {
            telemetry::request_done(api, started.elapsed(), None);
            reply
        }
        Err(e) => {
            telemetry::request_done(api, started.elapsed(), Some(e.kind()));
            tracing::warn!(conn = client.id, peer = %client.peer, ?api, error = %e, "request failed; closing connection so the client retries");
            Reply::Close(e.to_string())
        }
    }
}

/// Queues produce requests upstream one at a time, in arrival order, and awaits their
/// answers concurrently, all within this one task: spawning a task per produce displaces the
/// just-woken upstream writer from the worker's next-task slot, and the scheduler then hands
/// it to the other worker thread (a cross-thread wake-up on every request, measured with
/// strace).
async fn produce_lane(
    mut rx: mpsc::Receiver<(RequestFrame, Slot, Instant)>,
    client: ClientConn,
    ctx: Arc<Ctx>,
) {
    use futures::StreamExt;
    use futures::stream::FuturesUnordered;
    let mut answers = FuturesUnordered::new();
    // What the produces in flight went on: own sockets (acks=all, throttled) or shared ones,
    // and which connection per broker.
    let mut lane = super::produce::Lane::default();
    loop {
        let next = tokio::select! {
            biased;
            Some(()) = answers.next(), if !answers.is_empty() => continue,
            next = rx.recv() => next,
        };
        let Some((req, slot, started)) = next else {
            break;
        };
        let mut queued = {
            let send = super::produce::send(&ctx, &client, &req, &mut lane, !answers.is_empty());
            tokio::pin!(send);
            loop {
                tokio::select! {
                    biased;
                    r = &mut send => break r,
                    Some(()) = answers.next(), if !answers.is_empty() => {}
                }
            }
        };
        if matches!(queued, Err(super::produce::SendError::SocketChange)) {
            // This produce goes on another socket than those still in flight: let them be
            // answered first, or it could overtake them upstream.
            metrics::counter!("shardgate_produce_socket_changes_total").increment(1);
            while answers.next().await.is_some() {}
            queued = super::produce::send(&ctx, &client, &req, &mut lane, false).await;
        }
        let queued = queued.map_err(|e| match e {
            super::produce::SendError::Handler(h) => h,
            super::produce::SendError::SocketChange => unreachable!("nothing in flight"),
        });
        match queued {
            Ok(pending) => {
                let (ctx, client) = (ctx.clone(), client.clone());
                answers.push(async move {
                    let result = pending.finish(&ctx).await;
                    slot.complete(finish(&client, ApiKey::Produce, started, result));
                });
            }
            Err(e) => slot.complete(finish(&client, ApiKey::Produce, started, Err(e))),
        }
    }
    while answers.next().await.is_some() {}
}
