//! The receiver's metrics, served as OpenMetrics text at `http://ADDR/metrics`
//! (prometheus-client for the encoding, axum for the HTTP). The receiver is not on a per-core
//! hot path, so shared counters are fine here.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct StageLabel {
    stage: &'static str,
}

type Latency = Family<StageLabel, Histogram, fn() -> Histogram>;

/// Who was refused and why: the certificate's names (as the audit trail gives them) and the
/// error code. Bounded by the certificates the CA issued.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RefusedLabel {
    pub(super) identity: String,
    pub(super) code: String,
}

pub(super) struct Metrics {
    registry: Registry,
    pub(super) bytes_received: Counter,
    pub(super) packs_stored: Counter,
    pub(super) sessions_total: Counter,
    pub(super) sessions_active: Gauge,
    pub(super) sessions_refused: Counter,
    pub(super) commits: Counter,
    pub(super) errors: Counter,
    pub(super) have_ids: Counter,
    pub(super) blobs_sent: Counter,
    pub(super) refused: Family<RefusedLabel, Counter>,
    latency: Latency,
}

/// 100 µs to ~7 min, a factor of 4 apart.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-4, 4.0, 12))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cbcr_receiver");
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let bytes_received = counter(&mut registry, "bytes_received", "Pack bytes received.");
        let packs_stored = counter(&mut registry, "packs_stored", "Packs made durable and indexed.");
        let sessions_total = counter(&mut registry, "sessions", "Sessions opened.");
        let sessions_refused = counter(&mut registry, "sessions_refused", "Connections refused (handshake or limit).");
        let commits = counter(&mut registry, "commits", "Snapshots committed.");
        let errors = counter(&mut registry, "errors", "Requests that failed.");
        let have_ids = counter(&mut registry, "have_ids", "Chunk ids asked about.");
        let blobs_sent = counter(&mut registry, "blobs_sent", "Blobs sent to restoring clients.");
        let refused = Family::<RefusedLabel, Counter>::default();
        registry.register(
            "refused",
            "Requests and sessions refused, by client identity and error code.",
            refused.clone(),
        );
        let sessions_active = Gauge::default();
        registry.register("sessions_active", "Sessions open now.", sessions_active.clone());
        let latency = Latency::new_with_constructor(latency_histogram);
        registry.register("request_seconds", "Request latency by stage.", latency.clone());
        Self {
            registry,
            bytes_received,
            packs_stored,
            sessions_total,
            sessions_active,
            sessions_refused,
            commits,
            errors,
            have_ids,
            blobs_sent,
            refused,
            latency,
        }
    }
}

impl Metrics {
    /// Counts a refusal of the certificate known as `identity`.
    pub(super) fn refused(&self, identity: &str, code: wire::frame::ErrorCode) {
        let identity = if identity.is_empty() { "(no name)".to_owned() } else { identity.to_owned() };
        self.refused.get_or_create(&RefusedLabel { identity, code: format!("{code:?}") }).inc();
    }

    pub(super) fn observe(&self, stage: &'static str, took: Duration) {
        self.latency.get_or_create(&StageLabel { stage }).observe(took.as_secs_f64());
    }

    pub(super) fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Serves `/metrics` on `listener` until the runtime stops.
pub(super) async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    use axum::http::header::CONTENT_TYPE;
    let app =
        axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = Arc::clone(&metrics);
                async move {
                    ([(CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics.render())
                }
            }),
        );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!("metrics server stopped: {e}");
    }
}
