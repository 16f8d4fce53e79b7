//! Serving the admin router: plain HTTP through axum, or HTTPS (`[admin.tls]`) through a
//! TLS accept loop in front of hyper, the peer address handed to handlers either way.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Extension;
use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// A TLS handshake that takes longer is dropped (a client holding a socket open gets nothing).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's head must arrive within this once the connection is up.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTPS connections served at once; beyond, new ones wait to be accepted (the admin API
/// must not take the process's descriptors or CPU from the client listener).
const MAX_CONNECTIONS: usize = 256;

/// Serves `router` on `listener` until `shutdown` changes.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let Some(acceptor) = tls else {
        return axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = shutdown.changed().await;
        })
        .await;
    };
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return refused(peer, e.to_string()),
                Err(_) => return refused(peer, "handshake timed out".into()),
            };
            let service = hyper_util::service::TowerToHyperService::new(
                router.layer(Extension(ConnectInfo(peer))),
            );
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "admin HTTPS connection ended");
            }
        });
    }
}

fn refused(peer: SocketAddr, message: String) {
    metrics::counter!("shardgate_admin_tls_failures_total").increment(1);
    tracing::info!(%peer, error = %message, "admin TLS handshake failed");
}
