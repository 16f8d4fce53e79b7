//! Accept loop: connection limits (total and per source address), optional TLS with a
//! handshake deadline, and a graceful shutdown that answers what was already read.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use super::Ctx;
use super::connection::{ClientConn, serve};

/// Open connections per source address, for `limits.max_connections_per_source`.
#[derive(Default)]
struct PerSource(Mutex<HashMap<IpAddr, usize>>);

impl PerSource {
    /// Counts a new connection from `ip` unless `max` (0 = no limit) are already open.
    fn try_take(&self, ip: IpAddr, max: usize) -> bool {
        let mut m = self.0.lock().expect("per-source lock");
        let n = m.entry(ip).or_insert(0);
        if max != 0 && *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    fn release(&self, ip: IpAddr) {
        let mut m = self.0.lock().expect("per-source lock");
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}

pub async fn run(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    tls: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = ctx.settings.raw.limits.clone();
    let limit = Arc::new(Semaphore::new(limits.max_connections));
    let per_source = Arc::new(PerSource::default());
    let handshake = Duration::from_millis(limits.handshake_timeout_ms);
    let next_id = AtomicU64::new(1);
    let peak = Arc::new(AtomicUsize::new(0));
    let trimmer = tokio::spawn(trim_after_departures(
        limit.clone(),
        limits.max_connections,
        peak.clone(),
        ctx.budget.clone(),
    ));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Typically EMFILE: keep serving existing connections.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            metrics::counter!("shardgate_connections_rejected_total", "reason" => "max_connections").increment(1);
            tracing::warn!(%peer, "limits.max_connections reached; refusing connection");
            drop(tcp);
            continue;
        };
        peak.fetch_max(
            limits.max_connections - limit.available_permits(),
            Ordering::Relaxed,
        );
        if !per_source.try_take(peer.ip(), limits.max_connections_per_source) {
            metrics::counter!("shardgate_connections_rejected_total", "reason" => "per_source")
                .increment(1);
            tracing::warn!(%peer, "limits.max_connections_per_source reached; refusing connection");
            drop(tcp);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        let client = ClientConn::new(
            next_id.fetch_add(1, Ordering::Relaxed),
            peer,
            ctx.pool.clone(),
        );
        let ctx = ctx.clone();
        let tls = tls.clone();
        let per_source = per_source.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _source = SourceSlot(per_source, peer.ip());
            metrics::counter!("shardgate_connections_total").increment(1);
            metrics::gauge!("shardgate_connections").increment(1.0);
            tracing::debug!(conn = client.id, %peer, "client connected");
            match tls {
                None => serve(tcp, client.clone(), ctx, shutdown).await,
                Some(acceptor) => match tokio::time::timeout(handshake, acceptor.accept(tcp)).await
                {
                    Ok(Ok(s)) => {
                        if certificate_principal(&ctx, &client, &s) {
                            serve(s, client.clone(), ctx, shutdown).await
                        }
                    }
                    Ok(Err(e)) => {
                        crate::telemetry::frame_error("tls_handshake");
                        tracing::warn!(%peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        crate::telemetry::frame_error("tls_handshake_timeout");
                        tracing::info!(%peer, "TLS handshake not finished within limits.handshake_timeout_ms; closing");
                    }
                },
            }
            metrics::gauge!("shardgate_connections").decrement(1.0);
            tracing::debug!(conn = client.id, %peer, "client disconnected");
            drop(permit);
        });
    }
    drop(listener);
    trimmer.abort();
    // Drain: every connection stops reading and writes the answers to what it read; wait for
    // them (all connection permits back) up to the drain timeout.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let drain = Duration::from_millis(limits.drain_timeout_ms);
    let open = limits.max_connections - limit.available_permits();
    tracing::info!(open, "draining client connections");
    match tokio::time::timeout(drain, limit.acquire_many(all)).await {
        Ok(_) => tracing::info!("all client connections answered and closed"),
        Err(_) => {
            let left = limits.max_connections - limit.available_permits();
            tracing::warn!(
                left,
                "limits.drain_timeout_ms passed with connections still open; exiting anyway"
            );
        }
    }
}

/// Connections that must have left since the peak before the allocator is trimmed (each
/// held some tens of KiB: task, TLS state, read-ahead).
const TRIM_AFTER_DEPARTURES: usize = 64;

/// Budget bytes (buffered frames) that must have been released since the peak before the
/// allocator is trimmed: freed frames stay in the allocator's heaps for reuse (see
/// `tune_allocator`) until then.
const TRIM_AFTER_RELEASED: usize = 64 * 1024 * 1024;

/// glibc gives memory freed inside its per-thread arenas back to the system only from the top
/// of a heap: after 2,000 hostile connections left, RSS stayed ~85 MiB above the baseline until
/// `malloc_trim(0)` (`memory` test). Trims once the open connections fell well below their
/// peak since the last trim, or the bytes buffered for clients did, checked every few seconds.
async fn trim_after_departures(
    limit: Arc<Semaphore>,
    max: usize,
    peak: Arc<AtomicUsize>,
    budget: Arc<super::budget::MemoryBudget>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(3));
    let mut peak_bytes = 0usize;
    loop {
        tick.tick().await;
        let open = max - limit.available_permits();
        let used = budget.used();
        peak_bytes = peak_bytes.max(used);
        let departed = peak.load(Ordering::Relaxed) >= open + TRIM_AFTER_DEPARTURES;
        if departed || peak_bytes >= used + TRIM_AFTER_RELEASED {
            peak.store(open, Ordering::Relaxed);
            peak_bytes = used;
            // Walks every arena (milliseconds for ~100 MiB): off the worker threads.
            let _ = tokio::task::spawn_blocking(release_freed_memory).await;
            metrics::counter!("shardgate_allocator_trims_total").increment(1);
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_freed_memory() {
    // SAFETY: malloc_trim only returns free pages of the allocator's own heaps to the system.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_freed_memory() {}

/// Frames (produce requests of hundreds of KiB, fetch answers of megabytes) are allocated
/// and freed thousands of times a second. Above glibc's mmap threshold each one was a fresh
/// mapping: page faults and zeroing of every page, then an unmap, about 9 % of shardgate's
/// CPU while producing (`bench/produce --perf`). With a fixed threshold of 32 MiB (glibc's
/// maximum) and a high trim threshold they are served from the heaps and reused; what stays
/// cached is given back by `trim_after_departures`. Call before any thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune_allocator() {
    // SAFETY: mallopt only sets allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 * 1024 * 1024);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_allocator() {}

/// The per-source count of one connection, released when its task ends.
struct SourceSlot(Arc<PerSource>, IpAddr);

impl Drop for SourceSlot {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

/// On a listener with client certificates and without SASL, the certificate's subject is the
/// client's principal (Kafka's SSL principal). With SASL the SASL user is, as in Kafka. False
/// (the connection is closed) when a certificate names no principal shardgate can read: two
/// such clients must not share one by accident.
fn certificate_principal(
    ctx: &Ctx,
    client: &ClientConn,
    s: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
) -> bool {
    let Some(tls) = ctx.settings.raw.listener.tls.as_ref() else {
        return true;
    };
    if tls.client_ca.is_none() || ctx.sasl.is_some() {
        return true;
    }
    let Some(cert) = s.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
        return true;
    };
    let cn_only = tls.principal == crate::config::PrincipalFrom::Cn;
    match crate::tls::certificate_principal(cert.as_ref(), cn_only) {
        Some(name) => {
            tracing::debug!(conn = client.id, principal = %name, "client certificate principal");
            client.set_principal(name);
            true
        }
        None => {
            crate::telemetry::frame_error("certificate_principal");
            tracing::warn!(conn = client.id, peer = %client.peer, "client certificate names no principal shardgate can read; closing");
            false
        }
    }
}
