//! `GET /metrics`: Prometheus text, from one store query per scrape, the
//! pollers' failure counts and the store's faults.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::AppState;

pub(super) fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `/metrics`: Prometheus text format.
pub(super) async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    use std::fmt::Write as _;
    let started = std::time::Instant::now();
    let m = match st.store.metrics().await {
        Ok(m) => m,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read the store: {e:#}\n"),
            )
                .into_response()
        }
    };
    let store_seconds = started.elapsed().as_secs_f64();
    let mut text = String::new();
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        &mut text,
        "kiln_builds_total",
        "counter",
        "Builds by builder and result (\"running\" while they run).",
    );
    for (builder, results, n) in &m.builds {
        let result = results
            .and_then(crate::config::Results::from_code)
            .map_or("running", |r| r.name());
        let _ = writeln!(
            text,
            "kiln_builds_total{{builder=\"{}\",result=\"{result}\"}} {n}",
            label(builder)
        );
    }
    family(
        &mut text,
        "kiln_build_requests_pending",
        "gauge",
        "Build requests waiting for a worker, by builder.",
    );
    for (builder, n) in &m.pending {
        let _ = writeln!(
            text,
            "kiln_build_requests_pending{{builder=\"{}\"}} {n}",
            label(builder)
        );
    }
    family(
        &mut text,
        "kiln_request_wait_seconds",
        "summary",
        "Time from a build request to its build's start.",
    );
    let _ = writeln!(text, "kiln_request_wait_seconds_sum {}", m.wait_sum);
    let _ = writeln!(text, "kiln_request_wait_seconds_count {}", m.wait_count);
    family(
        &mut text,
        "kiln_workers_connected",
        "gauge",
        "Workers connected to this master.",
    );
    let _ = writeln!(text, "kiln_workers_connected {}", m.workers_connected);
    family(
        &mut text,
        "kiln_poll_errors_total",
        "counter",
        "Failed polls by change source since the master started.",
    );
    for (source, h) in st.poll_health.snapshot() {
        let n = h.errors_total;
        let _ = writeln!(
            text,
            "kiln_poll_errors_total{{source=\"{}\"}} {n}",
            label(&source)
        );
    }
    let faults = st.store.faults().snapshot();
    family(
        &mut text,
        "kiln_store_faults_total",
        "counter",
        "Database writes that failed and wait to be tried again, by kind (full: no space; locked: another program holds the database; io: an I/O error).",
    );
    for (kind, n) in [
        ("full", faults.full),
        ("locked", faults.locked),
        ("io", faults.io),
    ] {
        let _ = writeln!(text, "kiln_store_faults_total{{kind=\"{kind}\"}} {n}");
    }
    family(
        &mut text,
        "kiln_store_waiting",
        "gauge",
        "Calls waiting for the database to take a write again.",
    );
    let _ = writeln!(text, "kiln_store_waiting {}", faults.waiting);
    family(
        &mut text,
        "kiln_store_failing_seconds",
        "gauge",
        "How long the database has failed writes (0 when it takes them).",
    );
    let _ = writeln!(
        text,
        "kiln_store_failing_seconds {}",
        faults.failing_for_s.unwrap_or(0)
    );
    family(
        &mut text,
        "kiln_reloads_total",
        "counter",
        "Config reloads, applied or failed.",
    );
    for (applied, n, _) in &m.reloads {
        let _ = writeln!(text, "kiln_reloads_total{{applied=\"{applied}\"}} {n}");
    }
    family(
        &mut text,
        "kiln_reload_duration_seconds",
        "summary",
        "Time each reload took.",
    );
    let (count, ms) = m
        .reloads
        .iter()
        .fold((0i64, 0.0f64), |(c, s), r| (c + r.1, s + r.2));
    let _ = writeln!(text, "kiln_reload_duration_seconds_sum {}", ms / 1000.0);
    let _ = writeln!(text, "kiln_reload_duration_seconds_count {count}");
    family(
        &mut text,
        "kiln_dispatch_rounds_total",
        "counter",
        "Times the distributor looked at the queue (each when something that can start a build happened).",
    );
    let _ = writeln!(
        text,
        "kiln_dispatch_rounds_total {}",
        st.builds.rounds.load(std::sync::atomic::Ordering::Relaxed)
    );
    let latent = &st.builds.latent;
    if latent.is_configured() {
        use std::sync::atomic::Ordering::Relaxed;
        family(
            &mut text,
            "kiln_latent_workers",
            "gauge",
            "Latent workers by state.",
        );
        for (state, n) in latent.counts() {
            let _ = writeln!(text, "kiln_latent_workers{{state=\"{state}\"}} {n}");
        }
        let c = &latent.counters;
        for (name, kind, help, value) in [
            (
                "kiln_latent_starts_total",
                "counter",
                "Latent worker starts.",
                c.starts.load(Relaxed) as f64,
            ),
            (
                "kiln_latent_failed_starts_total",
                "counter",
                "Latent worker starts that failed (an error, a refusal, missing_timeout).",
                c.failed_starts.load(Relaxed) as f64,
            ),
        ] {
            family(&mut text, name, kind, help);
            let _ = writeln!(text, "{name} {value}");
        }
        family(
            &mut text,
            "kiln_latent_start_seconds",
            "summary",
            "Time from a latent worker's start to its connection.",
        );
        let _ = writeln!(
            text,
            "kiln_latent_start_seconds_sum {}\nkiln_latent_start_seconds_count {}",
            c.start_ms.load(Relaxed) as f64 / 1000.0,
            c.connected_starts.load(Relaxed)
        );
    }
    family(
        &mut text,
        "kiln_store_query_seconds",
        "gauge",
        "Time the store took to answer this scrape's queries.",
    );
    let _ = writeln!(text, "kiln_store_query_seconds {store_seconds}");
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response()
}
