//! Spans exported to an OpenTelemetry collector, over OTLP/HTTP with JSON
//! encoding (`POST {endpoint}/v1/traces`), when `[tracing] otlp_endpoint`
//! is set.
//!
//! A `tracing` layer gives each span a trace id (its parent's, or a new
//! random one for a root) and a span id, keeps its fields, and when the
//! span closes hands it to a background task that posts batches (every
//! second, or 512 spans). Spans are exported, log events are not. The
//! queue is bounded: when the collector is slow or gone, spans past it are
//! dropped and counted (`skylark_otlp_spans_dropped_total`), never waited
//! for. With no endpoint the layer is not installed, and the debug-level
//! spans it would export cost nothing.

use serde_json::{Value, json};
use skylark_server::http_client;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Subscriber, span};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// Spans waiting to be posted, at most.
const QUEUE: usize = 8_192;
/// Spans in one request, at most.
const BATCH: usize = 512;

/// A finished span, ready to encode.
#[derive(Debug, Clone)]
struct Finished {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    name: &'static str,
    target: &'static str,
    start_ns: u64,
    end_ns: u64,
    fields: Vec<(&'static str, Value)>,
}

/// What the layer keeps in an open span's extensions.
struct Open {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    start_ns: u64,
    fields: Vec<(&'static str, Value)>,
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut out);
    out
}

/// Collects a span's fields as OTLP attribute values.
struct Fields<'a>(&'a mut Vec<(&'static str, Value)>);

impl Fields<'_> {
    fn set(&mut self, field: &Field, value: Value) {
        match self.0.iter_mut().find(|(k, _)| *k == field.name()) {
            Some(slot) => slot.1 = value,
            None => self.0.push((field.name(), value)),
        }
    }
}

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.set(field, json!({ "stringValue": format!("{value:?}") }));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field, json!({ "stringValue": value }));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        // OTLP's JSON writes 64-bit integers as strings.
        self.set(field, json!({ "intValue": value.to_string() }));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.set(field, json!({ "intValue": value.to_string() }));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.set(field, json!({ "boolValue": value }));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.set(field, json!({ "doubleValue": value }));
    }
}

/// The layer: turns closed spans into [`Finished`] ones on a queue.
pub struct OtlpLayer {
    queue: mpsc::Sender<Finished>,
}

impl<S> Layer<S> for OtlpLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let parent = span.parent().and_then(|p| p.extensions().get::<Open>().map(|o| (o.trace_id, o.span_id)));
        let mut fields = Vec::new();
        attrs.record(&mut Fields(&mut fields));
        span.extensions_mut().insert(Open {
            trace_id: parent.map_or_else(random, |(trace, _)| trace),
            span_id: random(),
            parent: parent.map(|(_, id)| id),
            start_ns: now_ns(),
            fields,
        });
    }

    fn on_record(&self, id: &span::Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(open) = span.extensions_mut().get_mut::<Open>()
        {
            values.record(&mut Fields(&mut open.fields));
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(open) = span.extensions_mut().remove::<Open>() else { return };
        let finished = Finished {
            trace_id: open.trace_id,
            span_id: open.span_id,
            parent: open.parent,
            name: span.metadata().name(),
            target: span.metadata().target(),
            start_ns: open.start_ns,
            end_ns: now_ns(),
            fields: open.fields,
        };
        if self.queue.try_send(finished).is_err() {
            metrics::counter!("skylark_otlp_spans_dropped_total").increment(1);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One OTLP/JSON `ExportTraceServiceRequest` for `spans`.
fn encode(service: &str, spans: &[Finished]) -> Value {
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let mut attributes: Vec<Value> = s.fields.iter().map(|(k, v)| json!({ "key": k, "value": v })).collect();
            attributes.push(json!({ "key": "code.namespace", "value": { "stringValue": s.target } }));
            let mut span = json!({
                "traceId": hex(&s.trace_id),
                "spanId": hex(&s.span_id),
                "name": s.name,
                "kind": 1,
                "startTimeUnixNano": s.start_ns.to_string(),
                "endTimeUnixNano": s.end_ns.to_string(),
                "attributes": attributes,
            });
            if let Some(parent) = s.parent {
                span["parentSpanId"] = json!(hex(&parent));
            }
            span
        })
        .collect();
    json!({
        "resourceSpans": [{
            "resource": { "attributes": [
                { "key": "service.name", "value": { "stringValue": service } },
                { "key": "service.version", "value": { "stringValue": env!("CARGO_PKG_VERSION") } },
            ] },
            "scopeSpans": [{ "scope": { "name": "skylark" }, "spans": spans }],
        }]
    })
}

/// Starts the exporter: the layer to install, and the task (on the current
/// runtime) that posts its spans to `endpoint` every `every`.
pub fn start(endpoint: &str, service: &str, every: Duration) -> Result<OtlpLayer, String> {
    let url = http_client::parse_url(&format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .map_err(|e| format!("[tracing] otlp_endpoint: {e}"))?;
    let (queue, mut spans) = mpsc::channel::<Finished>(QUEUE);
    let service = service.to_owned();
    tokio::spawn(async move {
        let client = http_client::new_client();
        let headers = [("content-type".to_owned(), "application/json".to_owned())];
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            // Wait for the first span, then gather for up to `every`.
            let Some(first) = spans.recv().await else { return };
            batch.push(first);
            let deadline = tokio::time::Instant::now() + every;
            while batch.len() < BATCH {
                match tokio::time::timeout_at(deadline, spans.recv()).await {
                    Ok(Some(span)) => batch.push(span),
                    Ok(None) | Err(_) => break,
                }
            }
            let body = encode(&service, &batch).to_string().into_bytes();
            let outcome = http_client::post(&client, &url, &headers, body, Duration::from_secs(10)).await;
            if !matches!(outcome, http_client::Outcome::Status(200..=299)) {
                metrics::counter!("skylark_otlp_spans_dropped_total").increment(batch.len() as u64);
            }
            batch.clear();
        }
    });
    Ok(OtlpLayer { queue })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    #[tokio::test]
    async fn closed_spans_reach_the_collector_as_otlp_json_with_their_parents_and_fields() {
        let received: Arc<Mutex<Vec<Value>>> = Arc::default();
        let kept = received.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let kept = kept.clone();
                async move {
                    kept.lock().unwrap().push(serde_json::from_slice::<Value>(&body).unwrap());
                    "{}"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let layer = start(&endpoint, "skylark-test", Duration::from_millis(50)).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer);
        {
            let _guard = tracing::subscriber::set_default(subscriber);
            let outer = tracing::debug_span!("connection", device = 7u64, transport = "ws");
            let _in = outer.enter();
            let inner = tracing::debug_span!("message.send", bytes = 5u64, seq = tracing::field::Empty);
            inner.record("seq", 3u64);
            drop(inner);
        }
        let spans = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let all: Vec<Value> = received
                    .lock()
                    .unwrap()
                    .iter()
                    .flat_map(|r| {
                        r["resourceSpans"][0]["scopeSpans"][0]["spans"].as_array().cloned().unwrap_or_default()
                    })
                    .collect();
                if all.len() >= 2 {
                    return all;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("both spans were posted");
        let first = received.lock().unwrap()[0].clone();
        assert_eq!(first["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"], "skylark-test");
        let by_name = |name: &str| spans.iter().find(|s| s["name"] == name).cloned().unwrap();
        let (outer, inner) = (by_name("connection"), by_name("message.send"));
        assert_eq!(inner["traceId"], outer["traceId"], "one trace");
        assert_eq!(inner["parentSpanId"], outer["spanId"], "the message's span is inside the connection's");
        assert!(outer.get("parentSpanId").is_none(), "the connection's span is a root");
        assert_eq!(outer["traceId"].as_str().unwrap().len(), 32);
        assert_eq!(inner["spanId"].as_str().unwrap().len(), 16);
        let attribute = |span: &Value, key: &str| {
            span["attributes"].as_array().unwrap().iter().find(|a| a["key"] == key).map(|a| a["value"].clone())
        };
        assert_eq!(attribute(&inner, "seq"), Some(json!({ "intValue": "3" })), "a field recorded later is kept");
        assert_eq!(attribute(&inner, "bytes"), Some(json!({ "intValue": "5" })));
        assert_eq!(attribute(&outer, "transport"), Some(json!({ "stringValue": "ws" })));
        let (start, end): (u64, u64) = (
            inner["startTimeUnixNano"].as_str().unwrap().parse().unwrap(),
            inner["endTimeUnixNano"].as_str().unwrap().parse().unwrap(),
        );
        assert!(start > 0 && start <= end);
    }
}
