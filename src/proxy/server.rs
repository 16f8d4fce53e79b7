//! Accept loop: connection limit, optional TLS, graceful shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use super::Ctx;
use super::connection::{ClientConn, serve};

pub async fn run(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    tls: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(ctx.settings.raw.limits.max_connections));
    let next_id = AtomicU64::new(1);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Typically EMFILE: keep serving existing connections.
                tracing::warn!(error = %e, "accept failed");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            metrics::counter!("shardgate_connections_rejected_total").increment(1);
            tracing::warn!(%peer, "connection limit reached; refusing connection");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let client = ClientConn::new(
            next_id.fetch_add(1, Ordering::Relaxed),
            peer,
            ctx.pool.clone(),
        );
        let ctx = ctx.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            metrics::counter!("shardgate_connections_total").increment(1);
            metrics::gauge!("shardgate_connections").increment(1.0);
            tracing::debug!(conn = client.id, %peer, "client connected");
            match tls {
                None => serve(tcp, client.clone(), ctx).await,
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(s) => serve(s, client.clone(), ctx).await,
                    Err(e) => {
                        crate::telemetry::frame_error("tls_handshake");
                        tracing::warn!(%peer, error = %e, "TLS handshake failed");
                    }
                },
            }
            metrics::gauge!("shardgate_connections").decrement(1.0);
            tracing::debug!(conn = client.id, %peer, "client disconnected");
            drop(permit);
        });
    }
}
