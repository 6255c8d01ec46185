//! The Prometheus exporter behind `/metrics`.
//!
//! The `metrics` recorder is process-global, so it is installed once and
//! shared by every gateway in the process (tests start several). Every
//! metric the server records is listed in [`METRICS`]: at install each is
//! described (`# HELP`, `# TYPE`) and registered at zero for each of its
//! known label values, so a fresh server's page already shows everything an
//! operator can alert on, instead of a metric appearing only once it changes.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// What a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric: name, kind, help text, and its label with every value it takes.
pub type Metric = (&'static str, Kind, &'static str, Option<(&'static str, &'static [&'static str])>);

/// Every metric Skylark records (a new `counter!`/`gauge!`/`histogram!`
/// belongs here too).
pub const METRICS: &[Metric] = &[
    (
        "skylark_connections_total",
        Kind::Counter,
        "Connections opened, by transport (with TLS: tcp+tls, wss, wss-json).",
        Some(("transport", &["tcp", "ws", "ws-json", "tcp+tls", "wss", "wss-json"])),
    ),
    (
        "skylark_connections_open",
        Kind::Gauge,
        "Connections open now, by transport (with TLS: tcp+tls, wss, wss-json).",
        Some(("transport", &["tcp", "ws", "ws-json", "tcp+tls", "wss", "wss-json"])),
    ),
    (
        "skylark_tls_handshakes_total",
        Kind::Counter,
        "TLS handshakes on both listeners, by result (all connections are TLS when TLS is configured).",
        Some(("result", &["ok", "failed", "timed_out"])),
    ),
    (
        "skylark_connections_refused_total",
        Kind::Counter,
        "Connections refused before the handshake, by reason.",
        Some(("reason", &["per_ip"])),
    ),
    (
        "skylark_auth_failures_total",
        Kind::Counter,
        "Failed device authentications, by reason.",
        Some((
            "reason",
            &["unknown_device", "device_removed", "challenge_mismatch", "challenge_expired", "bad_signature", "banned"],
        )),
    ),
    (
        "skylark_auth_signatures_total",
        Kind::Counter,
        "Device signatures verified when connections authenticate: checked=together (in a batch with others that \
         arrived at the same moment, about half the cost each) or checked=alone.",
        Some(("checked", &["together", "alone"])),
    ),
    ("skylark_actors", Kind::Gauge, "Account and group actors running now.", None),
    (
        "skylark_actors_asleep",
        Kind::Gauge,
        "Accounts whose actor stopped while their connected devices were idle; the next message starts it again \
         (sampled every minute).",
        None,
    ),
    (
        "skylark_mailbox_queued",
        Kind::Gauge,
        "Messages waiting in the actors' mailboxes, all together (sampled every minute).",
        None,
    ),
    (
        "skylark_mailbox_fullest",
        Kind::Gauge,
        "Messages waiting in the fullest actor mailbox (of 1,024; sampled every minute).",
        None,
    ),
    (
        "skylark_cluster_members",
        Kind::Gauge,
        "Cluster mode: live nodes taking actors, as this node sees them (0 on one node).",
        None,
    ),
    ("skylark_messages_accepted_total", Kind::Counter, "1:1 messages accepted (durable in the sender's log).", None),
    ("skylark_messages_stored_total", Kind::Counter, "1:1 messages made durable in a recipient's log.", None),
    (
        "skylark_group_messages_accepted_total",
        Kind::Counter,
        "Group posts accepted (durable in the group's log).",
        None,
    ),
    ("skylark_group_events_stored_total", Kind::Counter, "Group events made durable in a member's log.", None),
    ("skylark_accounts_deleted_total", Kind::Counter, "Accounts deleted, by their owner or an operator.", None),
    ("skylark_reports_total", Kind::Counter, "Conversations reported to the operator by their users.", None),
    (
        "skylark_pin_failures_total",
        Kind::Counter,
        "Wrong two-step verification PINs given when registering a locked number.",
        None,
    ),
    (
        "skylark_messages_purged_total",
        Kind::Counter,
        "Stored copies of messages whose payload the server purged: why=deleted (deleted for everyone by \
         their author), why=expired (disappearing messages past their time).",
        None,
    ),
    (
        "skylark_otlp_spans_dropped_total",
        Kind::Counter,
        "Spans not exported to the OpenTelemetry collector ([tracing] otlp_endpoint): its queue was full, or it did not accept a batch.",
        None,
    ),
    (
        "skylark_media_uploads_total",
        Kind::Counter,
        "Attachment uploads, by stage: started (created) and finished (every byte arrived, the blob stored).",
        Some(("stage", &["started", "finished"])),
    ),
    (
        "skylark_media_bytes_total",
        Kind::Counter,
        "Attachment bytes received in uploads (direction=up) and served in downloads (direction=down).",
        Some(("direction", &["up", "down"])),
    ),
    (
        "skylark_media_collected_total",
        Kind::Counter,
        "Deleted by the attachments' collector: blobs past their retention (or unreferenced), and abandoned uploads.",
        Some(("what", &["blobs", "uploads"])),
    ),
    (
        "skylark_messages_blocked_total",
        Kind::Counter,
        "Messages not delivered because their recipient blocked the sender.",
        None,
    ),
    (
        "skylark_encryption_stale_total",
        Kind::Counter,
        "End-to-end encrypted posts a group refused because another member's commit had ended the epoch they \
         were made in: kind=commit (an MLS commit, made again by its client) and kind=message (an encrypted \
         message, encrypted again and resent by its client).",
        Some(("kind", &["commit", "message"])),
    ),
    ("skylark_forward_retries_total", Kind::Counter, "Forwards between actors retried (failed or timed out).", None),
    (
        "skylark_forwards_retrying",
        Kind::Gauge,
        "Forwards between actors that failed and are being retried now (sampled every minute).",
        None,
    ),
    (
        "skylark_forward_oldest_retry_seconds",
        Kind::Gauge,
        "How long the oldest forward being retried has been failing (0 when none; sampled every minute).",
        None,
    ),
    ("skylark_store_commit_batch_writes", Kind::Histogram, "Account writes merged into one store commit.", None),
    (
        "skylark_store_commit_seconds",
        Kind::Histogram,
        "Time of one group commit: the transaction and its fsync (embedded store), or the statement and its commit (PostgreSQL).",
        None,
    ),
    (
        "skylark_store_fsync_seconds",
        Kind::Histogram,
        "Time of one fsync of the embedded store's file, part of each commit (not kept with PostgreSQL, whose commit waits for its own WAL flush).",
        None,
    ),
    (
        "skylark_send_ack_seconds",
        Kind::Histogram,
        "From a send reaching the server to its acknowledgement, which waits for the durable write.",
        None,
    ),
    (
        "skylark_delivery_seconds",
        Kind::Histogram,
        "From a message's acceptance to its delivery to a recipient device that was connected when it was sent (each device).",
        None,
    ),
    ("skylark_store_rows_written_total", Kind::Counter, "Rows written by PostgreSQL group commits.", None),
    (
        "skylark_ephemeral_dropped_total",
        Kind::Counter,
        "Presence and typing events dropped at a full connection queue.",
        None,
    ),
    ("skylark_typing_dropped_total", Kind::Counter, "Typing notifications dropped past the per-device limit.", None),
    (
        "skylark_rate_limited_total",
        Kind::Counter,
        "Requests refused by a rate limit, by limit.",
        Some((
            "limit",
            &[
                "messages_per_device",
                "group_changes_per_device",
                "typing_per_device",
                "sms_per_number",
                "sms_per_ip",
                "sms_per_prefix",
                "checks_per_number",
                "checks_per_ip",
                "links_per_ip",
                "link_approvals_per_account",
                "push_registrations",
                "uploads_per_account",
            ],
        )),
    ),
    ("skylark_sms_total", Kind::Counter, "Verification SMS sends, by result.", Some(("result", &["sent", "failed"]))),
    (
        "skylark_push_total",
        Kind::Counter,
        "Push wake-ups, by result.",
        Some(("result", &["delivered", "gone", "failed"])),
    ),
];

/// Installs the recorder if nobody has installed one yet, and describes and
/// registers every metric.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| match builder().and_then(PrometheusBuilder::install_recorder) {
            Ok(handle) => {
                describe();
                Some(handle)
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics recorder not installed; /metrics will be empty");
                None
            }
        })
        .as_ref()
}

/// Latencies and batch sizes as histograms with fixed buckets (not
/// summaries), so that Prometheus can add them up across servers and
/// compute quantiles over any window (the alert rules in `ops/` do).
fn builder() -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    use metrics_exporter_prometheus::Matcher;
    const SECONDS: &[f64] =
        &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
    const WRITES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)?
        .set_buckets_for_metric(Matcher::Full("skylark_store_commit_batch_writes".into()), WRITES)
}

fn describe() {
    for (name, kind, help, label) in METRICS {
        let values: Vec<Vec<(&'static str, &'static str)>> = match label {
            Some((key, values)) => values.iter().map(|v| vec![(*key, *v)]).collect(),
            None => vec![Vec::new()],
        };
        match kind {
            Kind::Counter => {
                metrics::describe_counter!(*name, *help);
                for labels in &values {
                    // Registering is enough: a counter starts at zero.
                    let _ = metrics::counter!(*name, labels);
                }
            }
            Kind::Gauge => {
                metrics::describe_gauge!(*name, *help);
                for labels in &values {
                    let _ = metrics::gauge!(*name, labels);
                }
            }
            Kind::Histogram => {
                metrics::describe_histogram!(*name, *help);
                for labels in &values {
                    let _ = metrics::histogram!(*name, labels);
                }
            }
        }
    }
}

/// The current metrics in Prometheus text format.
pub fn render() -> String {
    install().map(PrometheusHandle::render).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `.rs` file under `dir`.
    fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The alert rules and the dashboard (in `ops/`) name only metrics
    /// that exist, with their histogram suffixes where they are histograms.
    #[test]
    fn the_alerts_and_the_dashboard_name_only_metrics_the_server_has() {
        let ops = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ops");
        let mut named = 0;
        for file in ["prometheus/skylark-alerts.yml", "grafana/skylark-dashboard.json"] {
            let text = std::fs::read_to_string(ops.join(file)).unwrap();
            for (at, _) in text.match_indices("skylark_") {
                let name: String = text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
                    .collect();
                let known = METRICS.iter().any(|(metric, kind, _, _)| {
                    name == *metric
                        || (*kind == Kind::Histogram
                            && ["_bucket", "_sum", "_count"].iter().any(|suffix| name == format!("{metric}{suffix}")))
                });
                assert!(known, "{file} names {name}, which the server does not record");
                named += 1;
            }
        }
        assert!(named > 20, "the files name the server's metrics ({named} found)");
    }

    #[test]
    fn the_table_lists_every_metric_the_code_records() {
        let crates = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = Vec::new();
        sources(&crates, &mut files);
        let mut recorded = std::collections::BTreeSet::new();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            for macro_name in ["metrics::counter!(\"", "metrics::gauge!(\"", "metrics::histogram!(\""] {
                for (at, _) in text.match_indices(macro_name) {
                    let rest = &text[at + macro_name.len()..];
                    if let Some(end) = rest.find('"') {
                        recorded.insert(rest[..end].to_owned());
                    }
                }
            }
        }
        assert!(recorded.len() >= 10, "the scan found the metrics: {recorded:?}");
        let listed: std::collections::BTreeSet<String> = METRICS.iter().map(|m| m.0.to_owned()).collect();
        let missing: Vec<&String> = recorded.difference(&listed).collect();
        assert!(missing.is_empty(), "recorded but not in METRICS: {missing:?}");
    }

    #[test]
    fn every_metric_is_on_the_page_from_the_start() {
        let page = render();
        for (name, kind, _, label) in METRICS {
            let kind = match kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            assert!(page.contains(&format!("# HELP {name} ")), "no help for {name}:\n{page}");
            assert!(page.contains(&format!("# TYPE {name} {kind}")), "no type for {name}:\n{page}");
            if let Some((key, values)) = label {
                for value in *values {
                    assert!(
                        page.contains(&format!("{name}{{{key}=\"{value}\"}}")),
                        "no {name}{{{key}={value}}}:\n{page}"
                    );
                }
            } else if kind == "histogram" {
                let bucket = format!("{name}_bucket{{le=\"+Inf\"}}");
                assert!(page.contains(&bucket), "no buckets of {name} (a histogram, not a summary):\n{page}");
            } else {
                assert!(page.lines().any(|l| l.starts_with(&format!("{name} "))), "no sample of {name}:\n{page}");
            }
        }
    }
}
