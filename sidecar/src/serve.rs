//! Serving a router over HTTP/1.1 and h2c with timeouts `axum::serve` does
//! not set: a client that sends its request head slowly (slowloris) is cut
//! off after `--header-read-timeout` instead of holding a connection for
//! ever. Hyper starts that timer when it waits for a request head, so it is
//! also the idle keep-alive timeout: the default (30 s) is long enough that
//! pooling clients see idle connections closed rarely, and retry them.

use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Longest in-flight requests may take to finish once stopping.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// How long accepting pauses after a failed accept.
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// Serves `router` on `listener` until `stop` turns true, then lets open
/// requests finish (up to [`SHUTDOWN_WAIT`]).
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    header_read_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most likely: pause rather than
                // spin on a listener that stays readable.
                tracing::warn!(error = %e, "could not accept a connection");
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_PAUSE) => continue,
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // A broken or timed-out connection is the client's business.
            let _ = conn.await;
        });
    }
    let _ = tokio::time::timeout(SHUTDOWN_WAIT, graceful.shutdown()).await;
}
