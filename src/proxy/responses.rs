//! In-order responses for one client connection. Kafka clients match responses by order as
//! well as correlation id, so replies finished out of order wait here for the ones before them.
//!
//! Why not a channel of per-request oneshots: the writer would be woken once per request just
//! to start waiting on the next oneshot, and that wake-up tends to move the request's own
//! processing to the other worker thread (measured: about one cross-thread hand-off per
//! produce). Here a request takes a numbered slot without waking anybody; the writer is woken
//! only when the reply at the head of the line is ready, and writes every ready reply in one
//! vectored write.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, OwnedSemaphorePermit};

use super::Reply;
use super::budget::{Charge, MemoryBudget};
use crate::protocol::frame::WriteBatch;

pub struct Responses {
    state: Mutex<State>,
    /// The writer waits on it for the head reply.
    head_ready: Notify,
    /// The reader waits on it to learn that the connection is being closed.
    closed: Notify,
    budget: Arc<MemoryBudget>,
}

#[derive(Default)]
struct State {
    next_to_issue: u64,
    next_to_write: u64,
    ready: BTreeMap<u64, Done>,
    /// No more slots will be issued (the reader stopped).
    reader_done: bool,
    /// The writer stopped: the socket is closed or being closed.
    writer_done: bool,
    /// The client went away and its running requests were cancelled: unanswered slots are
    /// expected, not errors.
    abandoned: bool,
}

struct Done {
    reply: Reply,
    /// Request bytes (and, once charged, the response's) held until written.
    _charges: (Option<Charge>, Option<Charge>),
    _permit: Option<OwnedSemaphorePermit>,
}

/// One request's place in the response order. Dropping it unanswered (a task that panicked
/// or was cancelled) closes the connection after the replies before it, as a broker would.
pub struct Slot {
    seq: u64,
    responses: Arc<Responses>,
    charge: Option<Charge>,
    permit: Option<OwnedSemaphorePermit>,
    answered: bool,
}

impl Responses {
    pub fn new(budget: Arc<MemoryBudget>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            head_ready: Notify::new(),
            closed: Notify::new(),
            budget,
        })
    }

    /// The next slot in request order. `charge` (the request's bytes) and `permit` (its
    /// in-flight place) are released once its reply is written.
    pub fn slot(
        self: &Arc<Self>,
        charge: Option<Charge>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Slot {
        let mut st = self.state.lock().expect("responses lock");
        let seq = st.next_to_issue;
        st.next_to_issue += 1;
        Slot {
            seq,
            responses: self.clone(),
            charge,
            permit,
            answered: false,
        }
    }

    /// The reader issues no more slots; the writer ends after writing what was issued.
    pub fn reader_done(&self) {
        self.state.lock().expect("responses lock").reader_done = true;
        self.head_ready.notify_one();
    }

    /// The client is gone; its requests are being cancelled.
    pub fn abandon(&self) {
        self.state.lock().expect("responses lock").abandoned = true;
    }

    fn abandoned(&self) -> bool {
        self.state.lock().expect("responses lock").abandoned
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().expect("responses lock").writer_done
    }

    /// Resolves once the writer stopped (the connection is closing).
    pub async fn wait_closed(&self) {
        loop {
            let n = self.closed.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.is_closed() {
                return;
            }
            n.await;
        }
    }

    fn complete(&self, seq: u64, done: Done) {
        let mut st = self.state.lock().expect("responses lock");
        if st.writer_done {
            return; // nobody will write it; dropping `done` releases its charges
        }
        st.ready.insert(seq, done);
        let head = seq == st.next_to_write;
        drop(st);
        if head {
            self.head_ready.notify_one();
        }
    }

    /// Writes replies in request order until a `Close` reply, a write error, or the reader is
    /// done and everything issued was written. Then shuts the socket's write side.
    pub async fn write_loop<W: AsyncWrite + Unpin>(&self, mut wr: W, conn: u64) {
        let mut batch = WriteBatch::default();
        let mut held = Vec::new();
        'outer: loop {
            let wake = self.head_ready.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            let (close, finished) = {
                let mut guard = self.state.lock().expect("responses lock");
                let st = &mut *guard;
                let mut close = None;
                let next = &mut st.next_to_write;
                while let Some(done) = st
                    .ready
                    .first_entry()
                    .and_then(|e| (*e.key() == *next).then(|| e.remove()))
                {
                    *next += 1;
                    match done.reply {
                        Reply::Frame(bytes) => batch.put_bytes(bytes),
                        Reply::Forwarded {
                            correlation_id,
                            upstream,
                        } => {
                            put_forwarded(&mut batch, correlation_id, upstream);
                        }
                        Reply::Pieces(pieces) => {
                            for p in pieces {
                                batch.put_bytes(p);
                            }
                        }
                        Reply::Nothing => {}
                        Reply::Close(reason) => {
                            close = Some(reason);
                        }
                    }
                    held.push((done._charges, done._permit));
                    if close.is_some() {
                        break;
                    }
                }
                let finished = st.reader_done && st.next_to_write == st.next_to_issue;
                (close, finished)
            };
            if !batch.is_empty() {
                metrics::counter!("shardgate_bytes_out_total").increment(batch.len() as u64);
                if let Err(e) = batch.write_to(&mut wr).await {
                    tracing::debug!(conn, error = %e, "client write failed");
                    break 'outer;
                }
            }
            held.clear();
            if let Some(reason) = close {
                tracing::debug!(conn, %reason, "closing client connection");
                break;
            }
            if finished {
                break;
            }
            wake.await;
        }
        {
            let mut st = self.state.lock().expect("responses lock");
            st.writer_done = true;
            st.ready.clear();
        }
        self.closed.notify_waiters();
        let _ = wr.shutdown().await;
    }
}

/// A response forwarded from upstream as it came, under the client's correlation id: the
/// length and id are written fresh, the body is the upstream frame's bytes (not copied).
fn put_forwarded(batch: &mut WriteBatch, correlation_id: i32, upstream: Bytes) {
    let body = upstream.slice(4.min(upstream.len())..);
    let mut head = [0u8; 8];
    head[..4].copy_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    head[4..].copy_from_slice(&correlation_id.to_be_bytes());
    batch.put_slice(&head);
    batch.put_bytes(body);
}

impl Slot {
    pub fn complete(mut self, reply: Reply) {
        self.answered = true;
        let response_charge = match &reply {
            Reply::Frame(b) => Some(self.responses.budget.charge(b.len())),
            Reply::Forwarded { upstream, .. } => Some(self.responses.budget.charge(upstream.len())),
            Reply::Pieces(p) => Some(
                self.responses
                    .budget
                    .charge(p.iter().map(|b| b.len()).sum()),
            ),
            _ => None,
        };
        let done = Done {
            reply,
            _charges: (self.charge.take(), response_charge),
            _permit: self.permit.take(),
        };
        self.responses.complete(self.seq, done);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.answered {
            if self.responses.abandoned() {
                tracing::debug!(seq = self.seq, "request cancelled: its client went away");
            } else {
                tracing::error!(
                    seq = self.seq,
                    "request task ended without a reply; closing the connection"
                );
            }
            let done = Done {
                reply: Reply::Close("request task ended without a reply".into()),
                _charges: (self.charge.take(), None),
                _permit: self.permit.take(),
            };
            self.responses.complete(self.seq, done);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8) -> Reply {
        Reply::Frame(Bytes::from(vec![0, 0, 0, 1, tag]))
    }

    #[tokio::test]
    async fn replies_are_written_in_request_order() {
        let r = Responses::new(MemoryBudget::new(1 << 20));
        let (a, b, c) = (r.slot(None, None), r.slot(None, None), r.slot(None, None));
        let (client, mut server) = tokio::io::duplex(1024);
        let writer = tokio::spawn({
            let r = r.clone();
            async move { r.write_loop(client, 1).await }
        });
        c.complete(frame(3));
        b.complete(frame(2));
        a.complete(frame(1));
        r.reader_done();
        writer.await.unwrap();
        let mut out = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut server, &mut out)
            .await
            .unwrap();
        assert_eq!(out, vec![0, 0, 0, 1, 1, 0, 0, 0, 1, 2, 0, 0, 0, 1, 3]);
    }

    #[tokio::test]
    async fn a_dropped_slot_closes_after_the_replies_before_it() {
        let r = Responses::new(MemoryBudget::new(1 << 20));
        let (a, b, c) = (r.slot(None, None), r.slot(None, None), r.slot(None, None));
        let (client, mut server) = tokio::io::duplex(1024);
        let writer = tokio::spawn({
            let r = r.clone();
            async move { r.write_loop(client, 1).await }
        });
        c.complete(frame(3));
        drop(b);
        a.complete(frame(1));
        writer.await.unwrap();
        assert!(r.is_closed());
        let mut out = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut server, &mut out)
            .await
            .unwrap();
        assert_eq!(
            out,
            vec![0, 0, 0, 1, 1],
            "nothing after the unanswered request"
        );
    }

    #[tokio::test]
    async fn forwarded_replies_get_the_clients_correlation_id() {
        let r = Responses::new(MemoryBudget::new(1 << 20));
        let s = r.slot(None, None);
        let (client, mut server) = tokio::io::duplex(1024);
        let writer = tokio::spawn({
            let r = r.clone();
            async move { r.write_loop(client, 1).await }
        });
        // Upstream frame: correlation id 99 then a 2-byte body.
        s.complete(Reply::Forwarded {
            correlation_id: 7,
            upstream: Bytes::from_static(&[0, 0, 0, 99, 0xAB, 0xCD]),
        });
        r.reader_done();
        writer.await.unwrap();
        let mut out = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut server, &mut out)
            .await
            .unwrap();
        assert_eq!(out, vec![0, 0, 0, 6, 0, 0, 0, 7, 0xAB, 0xCD]);
    }

    #[tokio::test]
    async fn charges_are_released_once_written() {
        let budget = MemoryBudget::new(1 << 20);
        let r = Responses::new(budget.clone());
        let s = r.slot(Some(budget.charge(100)), None);
        assert_eq!(budget.used(), 100);
        let (client, _server) = tokio::io::duplex(1024);
        s.complete(frame(1));
        assert_eq!(
            budget.used(),
            105,
            "request and response bytes are both held"
        );
        r.reader_done();
        r.write_loop(client, 1).await;
        assert_eq!(budget.used(), 0);
    }
}
