//! One multiplexed connection to one broker. Many callers share it: each request gets the
//! connection's own correlation id, and responses are matched back by it. Writes are batched
//! by a writer task; a reader task completes the waiting callers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::UpstreamError;
use crate::config::HostPort;
use crate::protocol::frame::{FrameReader, WriteBatch};

/// What a caller of one upstream request gets back: the response frame or why not.
pub type Answer = Result<Bytes, UpstreamError>;

struct Outgoing {
    /// Request frame without length prefix; its correlation id field is overwritten.
    frame: Bytes,
    reply: Option<oneshot::Sender<Answer>>,
}

type Pending = Arc<Mutex<HashMap<i32, oneshot::Sender<Answer>>>>;

/// How long a connection nobody holds waits for the answers still due before it closes.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

pub struct UpstreamConn {
    pub broker: i32,
    /// Tells connections apart (a replaced connection gets a new one).
    pub id: u64,
    tx: mpsc::Sender<Outgoing>,
    alive: Arc<AtomicBool>,
    /// When new requests must go elsewhere: the broker's SASL session (KIP-368) ends soon
    /// after. The connection finishes what it carries and closes once nobody holds it.
    retire_at: Option<std::time::Instant>,
    /// Tells the writer and reader to stop (a request timed out on this socket).
    closing: tokio::sync::watch::Sender<bool>,
}

pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

pub type TlsConnector = tokio_rustls::TlsConnector;

/// A token endpoint that has not answered within this fails the connection attempt (retried
/// like any other), whatever its socket does byte by byte.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(15);

impl UpstreamConn {
    pub async fn connect(
        broker: i32,
        addr: &HostPort,
        connect_timeout: Duration,
        max_frame: usize,
        tls: Option<(&TlsConnector, &str)>,
        sasl: Option<&super::sasl::Login>,
    ) -> Result<Self, UpstreamError> {
        let err = |message: String| UpstreamError::Connect {
            broker,
            addr: addr.to_string(),
            message,
        };
        // An OAuth token is fetched before connecting: its endpoint has a timeout of its own.
        let token = match sasl {
            Some(login) => tokio::time::timeout(TOKEN_TIMEOUT, login.token(broker))
                .await
                .map_err(|_| UpstreamError::Sasl {
                    broker,
                    message: format!("no OAuth token within {} s", TOKEN_TIMEOUT.as_secs()),
                })??,
            None => None,
        };
        let tcp = tokio::time::timeout(
            connect_timeout,
            TcpStream::connect((addr.host.as_str(), addr.port)),
        )
        .await
        .map_err(|_| {
            err(format!(
                "timed out after {} ms",
                connect_timeout.as_millis()
            ))
        })?
        .map_err(|e| err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        // A broker that vanished without a FIN (host down, network cut) is noticed within about
        // a minute even on a socket nobody writes to.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(30))
            .with_interval(Duration::from_secs(10))
            .with_retries(3);
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
        let mut stream: Box<dyn Stream> = match tls {
            None => Box::new(tcp),
            Some((connector, name)) => {
                let server_name =
                    tokio_rustls::rustls::pki_types::ServerName::try_from(name.to_string())
                        .map_err(|e| err(format!("bad TLS server name {name}: {e}")))?;
                let s = tokio::time::timeout(connect_timeout, connector.connect(server_name, tcp))
                    .await
                    .map_err(|_| err("TLS handshake timed out".into()))?
                    .map_err(|e| err(format!("TLS handshake: {e}")))?;
                Box::new(s)
            }
        };
        let mut retire_at = None;
        if let Some(sasl) = sasl {
            let result = tokio::time::timeout(
                connect_timeout,
                super::sasl::authenticate(&mut stream, sasl, token.as_deref(), broker),
            )
            .await
            .unwrap_or_else(|_| {
                Err(UpstreamError::Sasl {
                    broker,
                    message: format!("no answer within {} ms", connect_timeout.as_millis()),
                })
            });
            let label = if result.is_ok() { "ok" } else { "failed" };
            metrics::counter!("shardgate_upstream_sasl_authentications_total", "result" => label)
                .increment(1);
            // New requests move to a fresh connection at 80 % of the session, so what this one
            // carries ends well before the broker would refuse its next request.
            retire_at = result?.map(|lifetime| std::time::Instant::now() + lifetime.mul_f64(0.8));
        }
        let mut conn = Self::start(broker, stream, max_frame);
        conn.retire_at = retire_at;
        Ok(conn)
    }

    fn start(broker: i32, stream: Box<dyn Stream>, max_frame: usize) -> Self {
        let (rd, wr) = tokio::io::split(stream);
        let (tx, rx) = mpsc::channel(1024);
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let alive = Arc::new(AtomicBool::new(true));
        let (closing, closed) = tokio::sync::watch::channel(false);
        tokio::spawn(write_loop(
            broker,
            wr,
            rx,
            pending.clone(),
            alive.clone(),
            closed.clone(),
        ));
        tokio::spawn(read_loop(
            broker,
            FrameReader::new(rd, max_frame),
            pending,
            alive.clone(),
            closed,
        ));
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self {
            broker,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            tx,
            alive,
            retire_at: None,
            closing,
        }
    }

    /// Takes the connection out of service: a request on it went unanswered past its
    /// timeout, so the socket may be half-open or the broker stuck on it. Its late answers
    /// must not be waited for; the next request connects afresh.
    pub fn close(&self) {
        self.alive.store(false, Ordering::Release);
        self.closing.send_replace(true);
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
            && !self.tx.is_closed()
            && self.retire_at.is_none_or(|t| std::time::Instant::now() < t)
    }

    /// Queues a request. Requests queued by one caller are written in the order queued, which
    /// is what keeps a client's pipelined produce requests in order upstream. Returns the
    /// receiver of the response, or `None` for requests that get no response (acks=0).
    pub async fn enqueue(
        &self,
        frame: Bytes,
        expect_response: bool,
    ) -> Result<Option<oneshot::Receiver<Answer>>, UpstreamError> {
        let (reply, rx) = if expect_response {
            let (t, r) = oneshot::channel();
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        self.tx
            .send(Outgoing { frame, reply })
            .await
            .map_err(|_| UpstreamError::Disconnected {
                broker: self.broker,
                message: "connection closed".into(),
            })?;
        Ok(rx)
    }
}

/// Resolves when the connection is closed by `UpstreamConn::close`, never because the
/// `UpstreamConn` itself was dropped (its answers still due are awaited then).
async fn closing(closed: &mut tokio::sync::watch::Receiver<bool>) {
    if closed.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn fail_all(pending: &Pending, broker: i32, message: &str) {
    let drained: Vec<_> = pending.lock().expect("pending lock").drain().collect();
    for (_, tx) in drained {
        let _ = tx.send(Err(UpstreamError::Disconnected {
            broker,
            message: message.to_string(),
        }));
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    broker: i32,
    mut wr: W,
    mut rx: mpsc::Receiver<Outgoing>,
    pending: Pending,
    alive: Arc<AtomicBool>,
    mut closed: tokio::sync::watch::Receiver<bool>,
) {
    let mut next_id: i32 = 1;
    let mut buf = WriteBatch::default();
    let mut batch = Vec::with_capacity(64);
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, 64) => n,
            _ = closing(&mut closed) => 0,
        };
        if n == 0 {
            if !*closed.borrow() {
                // Nobody holds the connection any more (retired, replaced): the answers of
                // what it carries are still to come; closing the socket now would lose them.
                let drained = async {
                    while !pending.lock().expect("pending lock").is_empty() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                };
                tokio::select! {
                    _ = tokio::time::timeout(DRAIN_LIMIT, drained) => {}
                    _ = closing(&mut closed) => {}
                }
            }
            break;
        }
        if !alive.load(Ordering::Acquire) {
            break;
        }
        for out in batch.drain(..) {
            if out.frame.len() < 8 {
                if let Some(r) = out.reply {
                    let _ = r.send(Err(UpstreamError::Protocol(
                        "request frame too short".into(),
                    )));
                }
                continue;
            }
            let id = next_id;
            next_id = next_id.checked_add(1).unwrap_or(1);
            if let Some(r) = out.reply {
                pending.lock().expect("pending lock").insert(id, r);
            }
            // Header with our correlation id, then the client's bytes as they came (record
            // data is not copied).
            let mut head = [0u8; 12];
            head[..4].copy_from_slice(&(out.frame.len() as u32).to_be_bytes());
            head[4..8].copy_from_slice(&out.frame[..4]);
            head[8..].copy_from_slice(&id.to_be_bytes());
            buf.put_slice(&head);
            buf.put_bytes(out.frame.slice(8..));
        }
        // A broker that stopped reading blocks the write; closing must still interrupt it.
        let written = tokio::select! {
            r = buf.write_to(&mut wr) => r,
            _ = closing(&mut closed) => break,
        };
        if let Err(e) = written {
            tracing::warn!(broker, error = %e, "upstream write failed");
            alive.store(false, Ordering::Release);
            fail_all(&pending, broker, &e.to_string());
            break;
        }
    }
    alive.store(false, Ordering::Release);
    let _ = wr.shutdown().await;
}

async fn read_loop<R: AsyncRead + Unpin>(
    broker: i32,
    mut reader: FrameReader<R>,
    pending: Pending,
    alive: Arc<AtomicBool>,
    mut closed: tokio::sync::watch::Receiver<bool>,
) {
    let reason = loop {
        let next = tokio::select! {
            next = reader.next() => next,
            _ = closing(&mut closed) => break "closed by shardgate (a request timed out)".to_string(),
        };
        match next {
            Ok(Some(frame)) => {
                if frame.len() < 4 {
                    break "response frame shorter than a header".to_string();
                }
                let id = i32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]);
                let waiter = pending.lock().expect("pending lock").remove(&id);
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(Ok(frame));
                    }
                    None => {
                        tracing::warn!(broker, correlation_id = id, "response for unknown request");
                    }
                }
            }
            Ok(None) => break "closed by broker".to_string(),
            Err(e) => break e.to_string(),
        }
    };
    tracing::debug!(broker, %reason, "upstream connection ended");
    alive.store(false, Ordering::Release);
    fail_all(&pending, broker, &reason);
}
