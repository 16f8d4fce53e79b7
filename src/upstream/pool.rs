//! Upstream connections shared by every client connection: `connections_per_broker` slots per
//! broker, each client connection pinned to one slot so its requests to a broker stay in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use kafka_protocol::messages::ApiKey;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

use super::UpstreamError;
use super::connection::{TlsConnector, UpstreamConn};
use super::topology::TopologyHandle;
use crate::config::{HostPort, Settings};
use crate::protocol::{decode_response, encode_request};
use crate::telemetry;

struct Slot {
    conn: ArcSwapOption<UpstreamConn>,
    /// Serialises (re)connecting only; the hot path reads `conn` without locking.
    connecting: tokio::sync::Mutex<()>,
}

pub struct Pool {
    slots: Mutex<HashMap<(i32, usize), Arc<Slot>>>,
    /// Connections owned by one client connection, for requests a broker may park for minutes
    /// (JoinGroup, SyncGroup): a broker serves one request at a time per connection, so parking
    /// them on a shared connection would stall every client pinned to it.
    dedicated: Mutex<HashMap<(i32, u64), Arc<UpstreamConn>>>,
    per_broker: usize,
    connect_timeout: Duration,
    request_timeout: Duration,
    max_frame: usize,
    bootstrap: Vec<HostPort>,
    pub topology: Arc<TopologyHandle>,
    tls: Option<(TlsConnector, Option<String>)>,
    /// shardgate's own SASL identity towards the brokers.
    sasl: Option<super::sasl::Login>,
}

/// Which upstream socket a request goes on. A broker serves one request per socket at a
/// time, so what it may hold must not share a socket with other clients' requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Socket {
    /// One of the broker's shared connections (`pin % connections_per_broker`), for requests
    /// the broker answers at once.
    Shared(u64),
    /// A connection only this owner (a client connection, a writer lane) waits on, for
    /// requests the broker may hold: acks=all produce, rebalances, admin calls with timeouts.
    Own(u64),
    /// A second connection of a client connection's own, for its fetch long-polls: a fetch
    /// held for its max wait must not delay the same client's acks=all produce or commit.
    Fetch(u64),
}

/// Marks the fetch connections of an owner in the `dedicated` map (owners are connection
/// ids, far below this bit).
const FETCH_OWNER: u64 = 1 << 62;

/// Pseudo broker ids for bootstrap addresses, used before the real ids are known.
pub fn bootstrap_id(index: usize) -> i32 {
    -1 - index as i32
}

impl Pool {
    pub fn new(
        settings: &Settings,
        topology: Arc<TopologyHandle>,
        tls: Option<(TlsConnector, Option<String>)>,
        sasl: Option<super::sasl::Login>,
    ) -> Self {
        let up = &settings.raw.upstream;
        Self {
            slots: Mutex::new(HashMap::new()),
            dedicated: Mutex::new(HashMap::new()),
            per_broker: up.connections_per_broker,
            connect_timeout: Duration::from_millis(up.connect_timeout_ms),
            request_timeout: Duration::from_millis(up.request_timeout_ms),
            // Responses can be as large as a fetch asks; Kafka caps fetch.max.bytes at
            // message.max.bytes-ish sizes, so allow generously.
            max_frame: i32::MAX as usize,
            bootstrap: settings.bootstrap.clone(),
            topology,
            tls,
            sasl,
        }
    }

    pub fn bootstrap_len(&self) -> usize {
        self.bootstrap.len()
    }

    fn address(&self, broker: i32) -> Result<HostPort, UpstreamError> {
        if broker < 0 {
            let i = (-1 - broker) as usize;
            return self
                .bootstrap
                .get(i)
                .cloned()
                .ok_or(UpstreamError::UnknownBroker(broker));
        }
        self.topology
            .load()
            .brokers
            .get(&broker)
            .cloned()
            .ok_or(UpstreamError::UnknownBroker(broker))
    }

    /// The connection of slot `pin % connections_per_broker` to `broker`, connecting if needed.
    pub async fn conn(&self, broker: i32, pin: u64) -> Result<Arc<UpstreamConn>, UpstreamError> {
        let key = (broker, (pin % self.per_broker as u64) as usize);
        let slot = {
            let mut slots = self.slots.lock().expect("pool lock");
            slots
                .entry(key)
                .or_insert_with(|| {
                    Arc::new(Slot {
                        conn: ArcSwapOption::empty(),
                        connecting: tokio::sync::Mutex::new(()),
                    })
                })
                .clone()
        };
        if let Some(c) = slot.conn.load_full()
            && c.is_alive()
        {
            return Ok(c);
        }
        // Cold path: one caller connects, the others wait for its result.
        let _guard = slot.connecting.lock().await;
        if let Some(c) = slot.conn.load_full()
            && c.is_alive()
        {
            return Ok(c);
        }
        let addr = self.address(broker)?;
        let tls = self
            .tls
            .as_ref()
            .map(|(c, name)| (c, name.clone().unwrap_or_else(|| addr.host.clone())));
        let started = Instant::now();
        let result = UpstreamConn::connect(
            broker,
            &addr,
            self.connect_timeout,
            self.max_frame,
            tls.as_ref().map(|(c, n)| (*c, n.as_str())),
            self.sasl.as_ref(),
        )
        .await;
        match result {
            Ok(c) => {
                tracing::debug!(broker, %addr, ms = started.elapsed().as_millis() as u64, "upstream connected");
                metrics::counter!("shardgate_upstream_connects_total", "result" => "ok")
                    .increment(1);
                let c = Arc::new(c);
                slot.conn.store(Some(c.clone()));
                Ok(c)
            }
            Err(e) => {
                tracing::warn!(broker, %addr, error = %e, "upstream connect failed");
                metrics::counter!("shardgate_upstream_connects_total", "result" => "error")
                    .increment(1);
                Err(e)
            }
        }
    }

    /// The connection only `owner` (a client connection, a writer lane) uses to `broker`.
    async fn own_conn(&self, broker: i32, owner: u64) -> Result<Arc<UpstreamConn>, UpstreamError> {
        let existing = self
            .dedicated
            .lock()
            .expect("pool lock")
            .get(&(broker, owner))
            .filter(|c| c.is_alive())
            .cloned();
        if let Some(c) = existing {
            return Ok(c);
        }
        let addr = self.address(broker)?;
        let tls = self
            .tls
            .as_ref()
            .map(|(c, name)| (c, name.clone().unwrap_or_else(|| addr.host.clone())));
        let c = Arc::new(
            UpstreamConn::connect(
                broker,
                &addr,
                self.connect_timeout,
                self.max_frame,
                tls.as_ref().map(|(c, n)| (*c, n.as_str())),
                self.sasl.as_ref(),
            )
            .await?,
        );
        metrics::counter!("shardgate_upstream_connects_total", "result" => "own").increment(1);
        self.dedicated
            .lock()
            .expect("pool lock")
            .insert((broker, owner), c.clone());
        Ok(c)
    }

    /// Queues `frame` on `socket`; await the returned future for the response (at most
    /// `timeout`, default the upstream request timeout). Splitting queueing from waiting lets a
    /// caller keep request order without waiting.
    pub async fn send(
        &self,
        broker: i32,
        socket: Socket,
        api: ApiKey,
        frame: Bytes,
        expect_response: bool,
        timeout: Option<Duration>,
    ) -> Result<PendingReply, UpstreamError> {
        let conn = self.connection(broker, socket).await?;
        self.send_on(conn, api, frame, expect_response, timeout)
            .await
    }

    /// The connection a request on `socket` to `broker` would go on now (connecting if
    /// needed). With `send_on`, a caller can see that it changed before sending: the produce
    /// lane must not let a request overtake those in flight on another connection.
    pub async fn connection(
        &self,
        broker: i32,
        socket: Socket,
    ) -> Result<Arc<UpstreamConn>, UpstreamError> {
        match socket {
            Socket::Shared(pin) => self.conn(broker, pin).await,
            Socket::Own(owner) => self.own_conn(broker, owner).await,
            Socket::Fetch(owner) => self.own_conn(broker, owner | FETCH_OWNER).await,
        }
    }

    /// Queues a request on `conn` (from `connection`).
    pub async fn send_on(
        &self,
        conn: Arc<UpstreamConn>,
        api: ApiKey,
        frame: Bytes,
        expect_response: bool,
        timeout: Option<Duration>,
    ) -> Result<PendingReply, UpstreamError> {
        let rx = conn.enqueue(frame, expect_response).await?;
        Ok(PendingReply {
            broker: conn.broker,
            api,
            rx,
            timeout: timeout.unwrap_or(self.request_timeout),
            started: Instant::now(),
            conn,
        })
    }

    /// Sends on the connection dedicated to `owner` (a client connection id) and waits up to
    /// `timeout` for the answer.
    pub async fn call_dedicated(
        &self,
        broker: i32,
        owner: u64,
        api: ApiKey,
        frame: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, UpstreamError> {
        self.send(broker, Socket::Own(owner), api, frame, true, Some(timeout))
            .await?
            .wait()
            .await?
            .ok_or(UpstreamError::Protocol("no response".into()))
    }

    /// Closes the connections dedicated to a client connection that went away.
    pub fn release(&self, owner: u64) {
        self.dedicated
            .lock()
            .expect("pool lock")
            .retain(|(_, o), _| *o != owner && *o != owner | FETCH_OWNER);
    }

    /// Queues `frame` on the pinned connection; await the returned future for the response.
    /// Splitting queueing from waiting lets a caller keep request order without waiting.
    pub async fn send_raw(
        &self,
        broker: i32,
        pin: u64,
        api: ApiKey,
        frame: Bytes,
        expect_response: bool,
    ) -> Result<PendingReply, UpstreamError> {
        self.send(
            broker,
            Socket::Shared(pin),
            api,
            frame,
            expect_response,
            None,
        )
        .await
    }

    /// Sends a raw request frame and waits for the raw response frame.
    pub async fn call_raw(
        &self,
        broker: i32,
        pin: u64,
        api: ApiKey,
        frame: Bytes,
    ) -> Result<Bytes, UpstreamError> {
        let pending = self.send_raw(broker, pin, api, frame, true).await?;
        pending
            .wait()
            .await?
            .ok_or(UpstreamError::Protocol("no response".into()))
    }

    /// Encodes, sends, waits and decodes a typed request on a shared connection.
    pub async fn call<Req, Resp>(
        &self,
        broker: i32,
        pin: u64,
        api: ApiKey,
        version: i16,
        client_id: Option<StrBytes>,
        req: &Req,
    ) -> Result<Resp, UpstreamError>
    where
        Req: Encodable + HeaderVersion,
        Resp: Decodable,
    {
        self.call_on(broker, Socket::Shared(pin), api, version, client_id, req)
            .await
    }

    /// Encodes, sends on `socket`, waits and decodes a typed request.
    pub async fn call_on<Req, Resp>(
        &self,
        broker: i32,
        socket: Socket,
        api: ApiKey,
        version: i16,
        client_id: Option<StrBytes>,
        req: &Req,
    ) -> Result<Resp, UpstreamError>
    where
        Req: Encodable + HeaderVersion,
        Resp: Decodable,
    {
        let frame = encode_request(api, version, client_id, req)?;
        let resp = self
            .send(broker, socket, api, frame, true, None)
            .await?
            .wait()
            .await?
            .ok_or(UpstreamError::Protocol("no response".into()))?;
        Ok(decode_response(api, version, resp)?)
    }
}

pub struct PendingReply {
    broker: i32,
    api: ApiKey,
    rx: Option<tokio::sync::oneshot::Receiver<super::connection::Answer>>,
    timeout: Duration,
    started: Instant,
    /// Closed if the answer does not come in time.
    conn: Arc<UpstreamConn>,
}

impl PendingReply {
    /// `Ok(None)` for a request that gets no response.
    pub async fn wait(self) -> Result<Option<Bytes>, UpstreamError> {
        let Some(rx) = self.rx else {
            return Ok(None);
        };
        let broker = self.broker;
        let result = match tokio::time::timeout(self.timeout, rx).await {
            Err(_) => {
                // The socket is half-open or the broker stuck on it; the late answer is not
                // worth waiting for. Others on it see it closed; the next request reconnects.
                self.conn.close();
                metrics::counter!("shardgate_upstream_timeouts_closed_total").increment(1);
                Err(UpstreamError::Timeout {
                    broker,
                    ms: self.timeout.as_millis() as u64,
                })
            }
            Ok(Err(_)) => Err(UpstreamError::Disconnected {
                broker,
                message: "connection closed before the response".into(),
            }),
            Ok(Ok(r)) => r,
        };
        telemetry::upstream_request(
            self.api,
            broker,
            self.started.elapsed(),
            result.as_ref().err().map(UpstreamError::kind),
        );
        result.map(Some)
    }
}
