//! What an operator sees of a running daemon: Prometheus metrics on `/metrics` and a health
//! verdict on `/healthz`, served on the address of the daemon's `[metrics]` section.
//!
//! Metrics go through the `metrics` facade: code anywhere records with `metrics::counter!`,
//! `gauge!` and `histogram!`, which cost nothing until [`serve`] installs the Prometheus recorder.
//! Names start with `pwsync_` and labels are agent ids, group and target names, reasons: never a
//! user name, never a value. `/healthz` answers 200 when every check of the daemon passes and 503
//! otherwise, one line per check, so a load balancer, systemd or a person can read it.
//! A daemon never fails to start for its metrics: an address in use is logged and skipped.

use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where to serve /metrics and /healthz (HTTP). None: not served.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// One health check: its name, whether it passes, and what it found.
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

impl Check {
    pub fn new(name: &'static str, ok: bool, detail: impl Into<String>) -> Check {
        Check {
            name,
            ok,
            detail: detail.into(),
        }
    }
}

/// The daemon's checks, run on every `/healthz` request.
pub type HealthChecks = Arc<dyn Fn() -> Vec<Check> + Send + Sync>;

/// The `/healthz` answer: status code and body.
pub fn health_report(checks: &[Check]) -> (u16, String) {
    let ok = checks.iter().all(|c| c.ok);
    let mut body = String::from(if ok { "ok\n" } else { "unhealthy\n" });
    for c in checks {
        body += &format!(
            "{} {}: {}\n",
            if c.ok { "ok  " } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    (if ok { 200 } else { 503 }, body)
}

/// Installs the Prometheus recorder and serves `/metrics` and `/healthz` on `listen` from a
/// thread of its own. Problems are logged, never fatal.
pub fn serve(listen: SocketAddr, health: HealthChecks) {
    let handle = match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "cannot install the metrics recorder; /metrics is off");
            return;
        }
    };
    let server = match tiny_http::Server::http(listen) {
        Ok(s) => s,
        Err(e) => {
            // Two daemons of one kind on a host both default to the same port: say which key
            // moves it.
            tracing::warn!(%listen, error = %e, "cannot serve /metrics and /healthz on {listen} (another process holds it? two relays or agents on one host each need their own: set [metrics] listen = \"127.0.0.1:PORT\" in this daemon's config); going on without");
            return;
        }
    };
    tracing::info!(%listen, "serving /metrics and /healthz");
    let spawned = std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let (code, body, kind) = match (request.method(), request.url()) {
                    (tiny_http::Method::Get, "/metrics") => {
                        (200, handle.render(), "text/plain; version=0.0.4")
                    }
                    (tiny_http::Method::Get, "/healthz") => {
                        let (code, body) = health_report(&health());
                        (code, body, "text/plain")
                    }
                    _ => (404, "try /metrics or /healthz\n".into(), "text/plain"),
                };
                let mut response = tiny_http::Response::from_string(body).with_status_code(code);
                if let Ok(h) = tiny_http::Header::from_bytes(&b"Content-Type"[..], kind.as_bytes())
                {
                    response = response.with_header(h);
                }
                let _ = request.respond(response);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the metrics thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_fails_when_any_check_fails_and_names_it() {
        let (code, body) = health_report(&[Check::new("spool", true, "12 records")]);
        assert_eq!(code, 200);
        assert!(body.starts_with("ok\n") && body.contains("spool: 12 records"));
        let (code, body) = health_report(&[
            Check::new("spool", true, "12 records"),
            Check::new("relay", false, "not connected"),
        ]);
        assert_eq!(code, 503);
        assert!(body.contains("FAIL relay: not connected"), "{body}");
    }
}
