//! Logging (tracing) setup and the Prometheus metrics the host exports at `/metrics`.
//!
//! Metric names are `wisp_<noun>_<unit>`; labels are the model id and route, both bounded
//! by configuration, never by client input. Latency buckets follow vLLM's, which suit LLM
//! serving (milliseconds for inter-token latency, up to minutes end to end).

use prometheus::proto::MetricFamily;
use prometheus::{Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::config::{LogFormat, TelemetryConfig};

/// Installs the global tracing subscriber. `RUST_LOG` wins over the configured level.
/// Closing spans are logged with their duration: per request `queue`, `prefill`, `decode`
/// (info) and each plugin hook (debug), all inside the `request` span with its id. Prompts,
/// replies and keys are never fields of any span or event.
pub fn init_tracing(config: &TelemetryConfig) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE);
    let _ = match config.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

const TTFT_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const ITL_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const E2E_BUCKETS: &[f64] = &[0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0];

const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0];

/// Plugin hooks take microseconds; a timeout ends them at tens of milliseconds.
const PLUGIN_BUCKETS: &[f64] = &[0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5];

/// Every metric handle, registered in one registry.
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub errors: IntCounterVec,
    pub ttft_seconds: HistogramVec,
    pub itl_seconds: HistogramVec,
    pub queue_seconds: HistogramVec,
    pub prompt_tokens: IntCounterVec,
    pub generation_tokens: IntCounterVec,
    pub batch_size: HistogramVec,
    pub prefix_hit_tokens: IntCounterVec,
    pub requests_running: IntGaugeVec,
    pub requests_waiting: IntGaugeVec,
    pub model_load_seconds: GaugeVec,
    pub plugin_hook_seconds: HistogramVec,
    pub plugin_verdicts: IntCounterVec,
    pub plugin_failures: IntCounterVec,
    pub grammar_mask_seconds: HistogramVec,
    /// KV cache in use by running sequences, as a fraction of the model's capacity
    /// (`max_batch` sequences of its whole context).
    pub kv_cache_usage: GaugeVec,
    pub kv_cache_bytes: IntGaugeVec,
    pub prefix_cache_bytes: IntGaugeVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    pub upstream_request_seconds: HistogramVec,
    pub upstream_first_event_seconds: HistogramVec,
    pub upstream_in_flight: IntGaugeVec,
    pub upstream_healthy: IntGaugeVec,
    /// The error codes `wisp_errors_total` has a series for.
    error_codes: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Distinct error codes `wisp_errors_total` keeps series for; later new codes (a plugin can
/// invent denial codes) are counted under `other`, so the series stay bounded.
pub const MAX_ERROR_CODES: usize = 64;

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric definition is valid; this is a bug");
            registry.register(Box::new(c.clone())).expect("metric names are unique; this is a bug");
            c
        };
        let histogram = |name: &str, help: &str, buckets: &[f64], labels: &[&str]| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)
                .expect("metric definition is valid; this is a bug");
            registry.register(Box::new(h.clone())).expect("metric names are unique; this is a bug");
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["model"]).expect("metric definition is valid; this is a bug");
            registry.register(Box::new(g.clone())).expect("metric names are unique; this is a bug");
            g
        };
        let float_gauge = |name: &str, help: &str| {
            let g = GaugeVec::new(Opts::new(name, help), &["model"]).expect("metric definition is valid; this is a bug");
            registry.register(Box::new(g.clone())).expect("metric names are unique; this is a bug");
            g
        };
        let upstream_gauge = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["model", "upstream"]).expect("metric definition is valid; this is a bug");
            registry.register(Box::new(g.clone())).expect("metric names are unique; this is a bug");
            g
        };
        Metrics {
            requests: counter("wisp_requests_total", "HTTP requests by route and status", &["route", "status"]),
            request_seconds: histogram("wisp_request_duration_seconds", "End-to-end request latency", E2E_BUCKETS, &["route"]),
            errors: counter("wisp_errors_total", "Errors by type", &["type"]),
            ttft_seconds: histogram("wisp_time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS, &["model"]),
            itl_seconds: histogram("wisp_inter_token_latency_seconds", "Time between tokens", ITL_BUCKETS, &["model"]),
            queue_seconds: histogram("wisp_queue_time_seconds", "Time waiting for the engine", TTFT_BUCKETS, &["model"]),
            prompt_tokens: counter("wisp_prompt_tokens_total", "Prompt tokens processed", &["model"]),
            generation_tokens: counter("wisp_generation_tokens_total", "Tokens generated", &["model"]),
            prefix_hit_tokens: counter(
                "wisp_prefix_cache_hit_tokens_total",
                "Prompt tokens whose KV was reused from an earlier sequence instead of prefilled",
                &["model"],
            ),
            batch_size: histogram("wisp_batch_size", "Sequences in one engine step (continuous batching)", BATCH_BUCKETS, &["model"]),
            requests_running: gauge("wisp_requests_running", "Requests being generated"),
            requests_waiting: gauge("wisp_requests_waiting", "Requests queued for the engine"),
            model_load_seconds: float_gauge("wisp_model_load_seconds", "Time the model took to load"),
            kv_cache_usage: float_gauge(
                "wisp_kv_cache_usage_ratio",
                "KV cache held by running sequences, as a fraction of max_batch sequences of the whole context",
            ),
            kv_cache_bytes: gauge(
                "wisp_kv_cache_bytes",
                "Bytes of KV cache (and recurrent state, with its checkpoints) allocated to running sequences",
            ),
            prefix_cache_bytes: gauge(
                "wisp_prefix_cache_bytes",
                "Bytes of KV cache and recurrent state kept from finished sequences for prefix reuse (within limits.prefix_cache_mb)",
            ),
            upstream_requests: counter(
                "wisp_upstream_requests_total",
                "Proxied requests by upstream and outcome (ok, error, cancelled, refused)",
                &["model", "upstream", "outcome"],
            ),
            upstream_errors: counter(
                "wisp_upstream_errors_total",
                "Upstream failures by kind (connect, timeout, status, overloaded, rejected, stream, upstream_error)",
                &["model", "upstream", "kind"],
            ),
            upstream_request_seconds: histogram(
                "wisp_upstream_request_duration_seconds",
                "Proxied request duration on its upstream",
                E2E_BUCKETS,
                &["model", "upstream"],
            ),
            upstream_first_event_seconds: histogram(
                "wisp_upstream_first_event_seconds",
                "Time from sending a proxied request to its upstream's first event",
                TTFT_BUCKETS,
                &["model", "upstream"],
            ),
            upstream_in_flight: upstream_gauge("wisp_upstream_in_flight", "Proxied requests open on the upstream"),
            upstream_healthy: upstream_gauge("wisp_upstream_healthy", "1 while the upstream is not cooling down after a failure"),
            plugin_hook_seconds: histogram(
                "wisp_plugin_hook_duration_seconds",
                "Plugin hook call duration",
                PLUGIN_BUCKETS,
                &["plugin", "hook"],
            ),
            plugin_verdicts: counter("wisp_plugin_verdicts_total", "Plugin on-request verdicts", &["plugin", "verdict"]),
            plugin_failures: counter("wisp_plugin_failures_total", "Plugin failures by kind", &["plugin", "kind"]),
            grammar_mask_seconds: histogram(
                "wisp_grammar_mask_seconds",
                "Time to compute one constrained token's mask (on its own thread, overlapped with the forward pass)",
                PLUGIN_BUCKETS,
                &["model"],
            ),
            error_codes: Default::default(),
            registry,
        }
    }

    /// Counts an error under its code, within [`MAX_ERROR_CODES`] series.
    pub fn count_error(&self, code: &str) {
        let mut codes = self.error_codes.lock().unwrap_or_else(|e| e.into_inner());
        let label = match codes.contains(code) || codes.len() < MAX_ERROR_CODES {
            true => {
                codes.insert(code.to_string());
                code
            }
            false => "other",
        };
        self.errors.with_label_values(&[label]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut families = self.registry.gather();
        let aliases: Vec<MetricFamily> = families
            .iter()
            .filter_map(|f| VLLM_ALIASES.iter().find(|(ours, _)| *ours == f.name()).map(|(_, theirs)| vllm_alias(f, theirs)))
            .collect();
        families.extend(aliases);
        let mut out = Vec::new();
        TextEncoder::new().encode(&families, &mut out).expect("encoding to a Vec cannot fail; this is a bug");
        String::from_utf8(out).expect("the text encoder writes UTF-8; this is a bug")
    }
}

/// wisp's per-model gauges under the names vLLM exports, which Kubernetes' Gateway API
/// Inference Extension's endpoint picker reads by default (its model server protocol):
/// queued and running requests, and the KV cache in use as a 0..1 fraction.
const VLLM_ALIASES: &[(&str, &str)] = &[
    ("wisp_requests_waiting", "vllm:num_requests_waiting"),
    ("wisp_requests_running", "vllm:num_requests_running"),
    ("wisp_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc"),
];

/// `family` renamed to `name`, its `model` label named `model_name` as vLLM's are.
fn vllm_alias(family: &MetricFamily, name: &str) -> MetricFamily {
    let mut alias = family.clone();
    alias.set_name(name.to_string());
    alias.set_help(format!("{} (vLLM's name, for the inference gateway's endpoint picker)", family.help()));
    for metric in alias.mut_metric() {
        for label in metric.mut_label() {
            if label.name() == "model" {
                label.set_name("model_name".into());
            }
        }
    }
    alias
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_get_a_bounded_number_of_series() {
        let metrics = Metrics::new();
        for i in 0..MAX_ERROR_CODES * 3 {
            metrics.count_error(&format!("code_{i}"));
        }
        metrics.count_error("code_0");
        let text = metrics.render();
        let series = text.lines().filter(|l| l.starts_with("wisp_errors_total{")).count();
        assert_eq!(series, MAX_ERROR_CODES + 1, "{text}");
        assert!(text.contains("wisp_errors_total{type=\"other\"} 128"), "{text}");
        assert!(text.contains("wisp_errors_total{type=\"code_0\"} 2"), "{text}");
    }

    #[test]
    fn the_engine_gauges_are_also_exported_under_vllm_names() {
        let metrics = Metrics::new();
        metrics.requests_waiting.with_label_values(&["m"]).set(3);
        metrics.requests_running.with_label_values(&["m"]).set(2);
        metrics.kv_cache_usage.with_label_values(&["m"]).set(0.25);
        let text = metrics.render();
        for line in [
            "vllm:num_requests_waiting{model_name=\"m\"} 3",
            "vllm:num_requests_running{model_name=\"m\"} 2",
            "vllm:kv_cache_usage_perc{model_name=\"m\"} 0.25",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing: {text}");
        }
        assert!(text.contains("wisp_requests_waiting{model=\"m\"} 3"), "the own names stay: {text}");
    }
}
