//! The Consul store, for several shardgate instances forming one virtual cluster.
//!
//! Keys (under `shardgate/<cluster>/`): `topics/<topic>` (a versioned document: config + map
//! JSON, written with check-and-set on ModifyIndex), `instances/<node id>` (address and applied epochs, acquired by
//! the instance's session so it disappears when the instance does), `leader` (a lock acquired by
//! the leader's session). Blocking queries on `topics/` carry new maps to every instance.
//!
//! Client: rs-consul (maintained, rustls-only; consulrs has had one release, in 2021, and pulls
//! OpenSSL) for KV. rs-consul keeps its session API private, so session create/renew, the only
//! other calls needed, are two small PUTs made here with hyper-util.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rs_consul::{ConsistencyMode, Consul, ConsulError, CreateOrUpdateKeyRequest, ReadKeyRequest};

use super::{Document, InstanceInfo, ShardStore, StoreError};
use crate::config::StoreConfig;

/// Session TTL: an instance that stops renewing is gone from the registry (and loses the
/// leader lock) this long after its last renewal.
const SESSION_TTL: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub struct ConsulStore {
    kv: Consul,
    http: Client<HttpConnector, Full<Bytes>>,
    addr: String,
    prefix: String,
    session: Mutex<Option<String>>,
    /// Sessions created so far (see `ShardStore::session_generation`).
    sessions: std::sync::atomic::AtomicU64,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("consul: {e}"))
}

fn not_found(e: &ConsulError) -> bool {
    matches!(e, ConsulError::UnexpectedResponseCode(s, _) if s.as_u16() == 404)
}

impl ConsulStore {
    pub fn new(cfg: &StoreConfig) -> Self {
        let addr = cfg.consul_addr.trim_end_matches('/').to_string();
        Self {
            kv: Consul::new(rs_consul::Config {
                address: addr.clone(),
                token: None,
                ..Default::default()
            }),
            http: Client::builder(TokioExecutor::new()).build_http(),
            prefix: format!("shardgate/{}", cfg.cluster),
            addr,
            session: Mutex::new(None),
            sessions: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    async fn put_raw(&self, path: &str, body: &str) -> Result<(u16, String), StoreError> {
        let req = hyper::Request::put(format!("{}{path}", self.addr))
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(unavailable)?;
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, self.http.request(req))
            .await
            .map_err(|_| unavailable("request timed out"))?
            .map_err(unavailable)?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(unavailable)?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// This instance's session, created on first use and renewed; recreated if Consul forgot
    /// it (after an outage longer than the TTL).
    async fn session(&self) -> Result<String, StoreError> {
        let existing = self.session.lock().expect("session lock").clone();
        if let Some(id) = existing {
            let (status, _) = self.put_raw(&format!("/v1/session/renew/{id}"), "").await?;
            if status == 200 {
                return Ok(id);
            }
            tracing::warn!(session = %id, status, "consul session lost; creating a new one");
        }
        let body = serde_json::json!({
            "Name": format!("{}-instance", self.prefix),
            "TTL": format!("{}s", SESSION_TTL.as_secs()),
            "Behavior": "delete",
            "LockDelay": "1s",
        });
        let (status, text) = self
            .put_raw("/v1/session/create", &body.to_string())
            .await?;
        if status != 200 {
            return Err(unavailable(format!(
                "session create answered {status}: {text}"
            )));
        }
        let v: serde_json::Value = serde_json::from_str(&text).map_err(unavailable)?;
        let id = v["ID"]
            .as_str()
            .ok_or_else(|| unavailable("session create without ID"))?
            .to_string();
        *self.session.lock().expect("session lock") = Some(id.clone());
        self.sessions
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(id)
    }

    async fn read(
        &self,
        key: &str,
        recurse: bool,
        index: Option<u64>,
        wait: Duration,
    ) -> Result<(u64, Vec<rs_consul::ReadKeyResponse>), StoreError> {
        let req = ReadKeyRequest {
            key,
            recurse,
            index,
            wait,
            consistency: ConsistencyMode::Consistent,
            ..Default::default()
        };
        match tokio::time::timeout(wait + REQUEST_TIMEOUT, self.kv.read_key(req)).await {
            Err(_) => Err(unavailable("read timed out")),
            Ok(Ok(r)) => Ok((r.index, r.response)),
            Ok(Err(e)) if not_found(&e) => Ok((index.unwrap_or(0), Vec::new())),
            Ok(Err(e)) => Err(unavailable(e)),
        }
    }

    /// Writes `me` to `key` bound to this instance's session; false if another session holds it.
    async fn acquire(&self, key: &str, me: &InstanceInfo) -> Result<bool, StoreError> {
        let session = self.session().await?;
        let value = serde_json::to_vec(me).map_err(unavailable)?;
        let req = CreateOrUpdateKeyRequest {
            key,
            acquire: &session,
            ..Default::default()
        };
        let (ok, _) =
            tokio::time::timeout(REQUEST_TIMEOUT, self.kv.create_or_update_key(req, value))
                .await
                .map_err(|_| unavailable(format!("write of {key} timed out")))?
                .map_err(unavailable)?;
        Ok(ok)
    }

    fn parse_topics(
        &self,
        entries: Vec<rs_consul::ReadKeyResponse>,
    ) -> Result<Vec<Document>, StoreError> {
        let mut out = Vec::new();
        for e in entries {
            let Some(v) = e.value else { continue };
            let t: Document = serde_json::from_str(&v).map_err(|err| StoreError::Corrupt {
                key: e.key.clone(),
                message: err.to_string(),
            })?;
            out.push(t);
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

impl ShardStore for ConsulStore {
    fn load_all(&self) -> BoxFuture<'_, Result<Vec<Document>, StoreError>> {
        async move {
            let (_, entries) = self
                .read(&self.key("topics/"), true, None, Duration::ZERO)
                .await?;
            self.parse_topics(entries)
        }
        .boxed()
    }

    fn put<'a>(
        &'a self,
        doc: &'a Document,
        expected: Option<u64>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            let key = self.key(&format!("topics/{}", doc.key));
            let (_, entries) = self.read(&key, false, None, Duration::ZERO).await?;
            let current = entries.into_iter().next();
            let found = match &current {
                Some(e) => e
                    .value
                    .as_deref()
                    .and_then(|v| serde_json::from_str::<Document>(v).ok())
                    .map(|d| d.version),
                None => None,
            };
            if found != expected {
                return Err(StoreError::Conflict {
                    key: doc.key.clone(),
                    expected,
                    found,
                });
            }
            // Check-and-set on the ModifyIndex we read (0: create only if absent), so a
            // concurrent writer between our read and write makes this write fail.
            let cas = current.map(|e| e.modify_index).unwrap_or(0);
            let value = serde_json::to_vec(doc).map_err(|e| StoreError::Corrupt {
                key: doc.key.clone(),
                message: e.to_string(),
            })?;
            let req = CreateOrUpdateKeyRequest {
                key: &key,
                check_and_set: Some(cas),
                ..Default::default()
            };
            let (ok, _) =
                tokio::time::timeout(REQUEST_TIMEOUT, self.kv.create_or_update_key(req, value))
                    .await
                    .map_err(|_| unavailable("write timed out"))?
                    .map_err(unavailable)?;
            if !ok {
                return Err(StoreError::Conflict {
                    key: doc.key.clone(),
                    expected,
                    found: None,
                });
            }
            Ok(())
        }
        .boxed()
    }

    fn describe(&self) -> String {
        format!("consul at {} under {}/", self.addr, self.prefix)
    }

    fn watch(&self, index: u64) -> BoxFuture<'_, Result<(u64, Vec<Document>), StoreError>> {
        async move {
            let (new_index, entries) = self
                .read(
                    &self.key("topics/"),
                    true,
                    Some(index),
                    Duration::from_secs(20),
                )
                .await?;
            if entries.is_empty() && new_index == index {
                // Nothing stored yet: a missing prefix cannot be blocked on.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok((new_index, self.parse_topics(entries)?))
        }
        .boxed()
    }

    fn watch_text<'a>(
        &'a self,
        key: &'a str,
        index: u64,
    ) -> BoxFuture<'a, Result<(u64, Option<String>), StoreError>> {
        async move {
            let wait = if index == 0 {
                Duration::ZERO
            } else {
                Duration::from_secs(20)
            };
            let (new_index, entries) = self
                .read(&self.key(key), false, (index > 0).then_some(index), wait)
                .await?;
            if entries.is_empty() && new_index == index {
                // A missing key answers at once: do not spin on it.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok((new_index, entries.into_iter().next().and_then(|e| e.value)))
        }
        .boxed()
    }

    fn elects(&self) -> bool {
        true
    }

    fn session_ttl(&self) -> Option<Duration> {
        Some(SESSION_TTL)
    }

    fn session_generation(&self) -> u64 {
        self.sessions.load(std::sync::atomic::Ordering::Acquire)
    }

    fn campaign<'a>(&'a self, me: &'a InstanceInfo) -> BoxFuture<'a, Result<bool, StoreError>> {
        async move { self.acquire(&self.key("leader"), me).await }.boxed()
    }

    fn report<'a>(&'a self, me: &'a InstanceInfo) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            let key = self.key(&format!("instances/{}", me.node_id));
            if !self.acquire(&key, me).await? {
                return Err(unavailable(format!(
                    "instance key {key} is held by another session (duplicate node_id?)"
                )));
            }
            Ok(())
        }
        .boxed()
    }

    fn instances(&self) -> BoxFuture<'_, Result<Option<Vec<InstanceInfo>>, StoreError>> {
        async move {
            let (_, entries) = self
                .read(&self.key("instances/"), true, None, Duration::ZERO)
                .await?;
            let live = entries
                .into_iter()
                .filter(|e| e.session.as_deref().is_some_and(|s| !s.is_empty()))
                .filter_map(|e| e.value.and_then(|v| serde_json::from_str(&v).ok()))
                .collect();
            Ok(Some(live))
        }
        .boxed()
    }

    fn leader(&self) -> BoxFuture<'_, Result<Option<InstanceInfo>, StoreError>> {
        async move {
            let (_, entries) = self
                .read(&self.key("leader"), false, None, Duration::ZERO)
                .await?;
            Ok(entries
                .into_iter()
                .find(|e| e.session.as_deref().is_some_and(|s| !s.is_empty()))
                .and_then(|e| e.value.and_then(|v| serde_json::from_str(&v).ok())))
        }
        .boxed()
    }
}
