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
//!
//! **One trace per message, across actors and nodes.** A span with a
//! `message` field (the message's id, `SENDER:SEQ`) belongs to that
//! message's trace, whatever task or node it runs on: its trace id is
//! derived from the id (the first 16 bytes of SHA-256 of `trace:ID`), and
//! so is the span id of the message's root, the span named
//! `message.send` (`send:ID`). Every other span of the message
//! (`message.forward` in the sender's actor, `message.deliver` for each
//! device, on whichever node holds it) is made a child of that root, and
//! keeps a link to the span it ran inside (its connection or its
//! forward) so nothing is lost. Nothing travels on the wire for it: the
//! id every hop already knows is the context. A `message.send` span learns
//! its id only at the ack, so its trace is settled when it closes.

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
    /// A span of another trace this one ran inside (trace, span).
    link: Option<([u8; 16], [u8; 8])>,
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
    /// The span it was opened inside: its trace and span ids.
    parent: Option<([u8; 16], [u8; 8])>,
    start_ns: u64,
    fields: Vec<(&'static str, Value)>,
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// The name of a message's root span.
const MESSAGE_ROOT: &str = "message.send";

/// The first `N` bytes of SHA-256 of `what:message`.
fn derived<const N: usize>(what: &str, message: &str) -> [u8; N] {
    use sha2::Digest;
    let digest = sha2::Sha256::new().chain_update(what).chain_update(b":").chain_update(message).finalize();
    let mut out = [0u8; N];
    out.copy_from_slice(&digest[..N]);
    out
}

/// The message a span belongs to: its `message` field, when it has one.
fn message_of<'a>(fields: &'a [(&'static str, Value)]) -> Option<&'a str> {
    fields.iter().find(|(k, _)| *k == "message").and_then(|(_, v)| v["stringValue"].as_str())
}

/// Where a span sits: its trace id, span id, parent span id, and a span of
/// another trace it links to (trace and span ids).
type Placed = ([u8; 16], [u8; 8], Option<[u8; 8]>, Option<([u8; 16], [u8; 8])>);

/// A span of message `message` named `name`, once in the message's trace:
/// its trace id, span id, parent, and the span of another trace it ran
/// inside (its link).
fn in_message_trace(message: &str, name: &str, open: &Open) -> Placed {
    let trace = derived::<16>("trace", message);
    let root = derived::<8>("send", message);
    match open.parent {
        // Opened inside another span of the same message: keep that parent.
        Some((parent_trace, parent)) if parent_trace == trace && name != MESSAGE_ROOT => {
            (trace, open.span_id, Some(parent), None)
        }
        inside if name == MESSAGE_ROOT => (trace, root, None, inside),
        inside => (trace, open.span_id, Some(root), inside),
    }
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
        // A span that knows its message at the start is in that message's
        // trace from the start, so spans inside it are too.
        let trace_id = match message_of(&fields) {
            Some(message) => derived("trace", message),
            None => parent.map_or_else(random, |(trace, _)| trace),
        };
        span.extensions_mut().insert(Open { trace_id, span_id: random(), parent, start_ns: now_ns(), fields });
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
        let name = span.metadata().name();
        let (trace_id, span_id, parent, link) = match message_of(&open.fields) {
            Some(message) => in_message_trace(message, name, &open),
            None => (open.trace_id, open.span_id, open.parent.map(|(_, id)| id), None),
        };
        let finished = Finished {
            trace_id,
            span_id,
            parent,
            link,
            name,
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
            if let Some((trace, inside)) = s.link {
                span["links"] = json!([{ "traceId": hex(&trace), "spanId": hex(&inside) }]);
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

    /// The spans of the requests a collector received.
    fn spans_of(requests: &[Value]) -> Vec<Value> {
        requests
            .iter()
            .flat_map(|r| r["resourceSpans"][0]["scopeSpans"][0]["spans"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Runs `body` under a subscriber with the layer, and returns the
    /// requests posted to a collector once they hold `count` spans.
    async fn collect(count: usize, body: impl FnOnce()) -> Vec<Value> {
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
        tracing::subscriber::with_default(subscriber, body);
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let requests = received.lock().unwrap().clone();
                if spans_of(&requests).len() >= count {
                    return requests;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the spans were posted")
    }

    #[tokio::test]
    async fn every_span_of_a_message_joins_the_trace_named_by_its_id_wherever_it_ran() {
        let requests = collect(6, || {
            // The sender's connection: the message learns its id at the ack.
            let sender = tracing::debug_span!("connection", device = 1u64);
            sender.in_scope(|| {
                let send = tracing::debug_span!("message.send", message = tracing::field::Empty);
                send.record("message", "12:7");
            });
            // The sender's actor forwards it (another task, or node).
            tracing::debug_span!("forward", to = 34u64).in_scope(|| {
                drop(tracing::debug_span!("message.forward", message = "12:7"));
            });
            // The recipient's connection delivers it (another node, say).
            let recipient = tracing::debug_span!("connection", device = 2u64);
            recipient.in_scope(|| {
                drop(tracing::debug_span!("message.deliver", message = %format_args!("{}:{}", 12, 7)));
            });
        })
        .await;
        let spans = spans_of(&requests);
        let named = |name: &str| spans.iter().filter(|s| s["name"] == name).cloned().collect::<Vec<_>>();
        let (send, forward, deliver) =
            (&named("message.send")[0], &named("message.forward")[0], &named("message.deliver")[0]);
        let trace = hex(&derived::<16>("trace", "12:7"));
        for span in [send, forward, deliver] {
            assert_eq!(span["traceId"], json!(trace), "in the message's trace: {span}");
        }
        assert_eq!(send["spanId"], json!(hex(&derived::<8>("send", "12:7"))), "the root's id is the message's");
        assert!(send.get("parentSpanId").is_none(), "the send is the trace's root: {send}");
        assert_eq!(forward["parentSpanId"], send["spanId"]);
        assert_eq!(deliver["parentSpanId"], send["spanId"]);
        // Each keeps a link to the span it ran inside.
        let connections = named("connection");
        let sender = connections.iter().find(|c| c["attributes"][0]["value"]["intValue"] == "1").unwrap();
        assert_eq!(send["links"][0]["spanId"], sender["spanId"]);
        assert_eq!(send["links"][0]["traceId"], sender["traceId"]);
        assert_eq!(forward["links"][0]["spanId"], named("forward")[0]["spanId"]);
        let recipient = connections.iter().find(|c| c["attributes"][0]["value"]["intValue"] == "2").unwrap();
        assert_eq!(deliver["links"][0]["spanId"], recipient["spanId"]);
        assert_ne!(sender["traceId"], json!(trace), "the connections keep their own traces");
    }

    #[tokio::test]
    async fn closed_spans_reach_the_collector_as_otlp_json_with_their_parents_and_fields() {
        let requests = collect(2, || {
            let outer = tracing::debug_span!("connection", device = 7u64, transport = "ws");
            let _in = outer.enter();
            let inner = tracing::debug_span!("message.send", bytes = 5u64, seq = tracing::field::Empty);
            inner.record("seq", 3u64);
            drop(inner);
        })
        .await;
        let spans = spans_of(&requests);
        let first = requests[0].clone();
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
