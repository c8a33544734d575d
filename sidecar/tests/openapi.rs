//! The OpenAPI document (`sidecar/openapi.yaml`) against the running
//! sidecar (DESIGN.md §3.1): the routes the server declares and the
//! document's paths are the same set; every documented operation is called;
//! every answer's status is listed under its operation, and a JSON answer is
//! valid against the schema the document gives for that status.

mod support;

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{json, Value};
use support::*;

const TOKEN: &str = "s3cret";

/// A pull subscription of the test app on `orders`.
const PULLED: &str = "\
apiVersion: ferry.dev/v1alpha1
kind: Subscription
metadata:
  name: pulled
spec:
  topic: orders
  app: shop
  mode: Pull
  startPosition: Earliest
";

struct Doc {
    doc: Value,
    /// Operation ids called so far.
    called: BTreeSet<String>,
}

impl Doc {
    fn load() -> Doc {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: Value = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Doc { doc, called: BTreeSet::new() }
    }

    fn paths(&self) -> BTreeSet<String> {
        self.doc["paths"].as_object().expect("paths").keys().cloned().collect()
    }

    /// Follows a `$ref` within the document.
    fn resolve<'a>(&'a self, v: &'a Value) -> &'a Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let pointer = r.strip_prefix('#').expect("a local $ref");
                self.resolve(self.doc.pointer(pointer).unwrap_or_else(|| panic!("{r} is not in the document")))
            }
            None => v,
        }
    }

    /// The documented path template matching `path` (segment by segment,
    /// `{param}` matching any one segment).
    fn template(&self, path: &str) -> Option<String> {
        let segments: Vec<&str> = path.split('/').collect();
        self.paths().into_iter().find(|t| {
            let ts: Vec<&str> = t.split('/').collect();
            ts.len() == segments.len()
                && ts.iter().zip(&segments).all(|(t, s)| (t.starts_with('{') && t.ends_with('}')) || t == s)
        })
    }

    /// Checks one answer against the document; returns the operation id.
    fn check(&mut self, method: &str, path: &str, status: u16, content_type: &str, body: &[u8]) -> String {
        let template = self.template(path).unwrap_or_else(|| panic!("{method} {path}: no documented path"));
        let op = self.doc["paths"][&template][method].clone();
        assert!(op.is_object(), "{method} {template}: not documented");
        let id = op["operationId"].as_str().expect("operationId").to_owned();
        let response = op["responses"]
            .get(status.to_string())
            .unwrap_or_else(|| panic!("{id}: status {status} is not documented ({})", String::from_utf8_lossy(body)));
        let response = self.resolve(response).clone();
        let media = content_type.split(';').next().unwrap_or("").trim();
        let content = &response["content"];
        assert!(
            content.get(media).is_some(),
            "{id} {status}: content type {media:?} is not documented ({})",
            content.as_object().map(|c| c.keys().cloned().collect::<Vec<_>>().join(", ")).unwrap_or_default()
        );
        if media == "application/json" {
            let instance: Value = serde_json::from_slice(body).expect("a JSON body");
            let mut schema = content[media]["schema"].clone();
            // Refs into `components` resolve against this root.
            schema["components"] = self.doc["components"].clone();
            let validator = jsonschema::validator_for(&schema).unwrap_or_else(|e| panic!("{id} {status}: {e}"));
            let errors: Vec<String> =
                validator.iter_errors(&instance).map(|e| format!("{} at {}", e, e.instance_path())).collect();
            assert!(errors.is_empty(), "{id} {status}: {instance} does not fit the document: {errors:#?}");
        }
        self.called.insert(id.clone());
        id
    }
}

/// The routes a source file declares with `.route("…"`.
fn declared_routes(file: &str) -> BTreeSet<String> {
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
    src.split(".route(\"").skip(1).map(|rest| rest.split('"').next().unwrap().to_owned()).collect()
}

/// A path template with its parameters unnamed (`/a/{}/b`): the server and
/// the document may name them differently.
fn shape(template: &str) -> String {
    template
        .split('/')
        .map(|s| if s.starts_with('{') && s.ends_with('}') { "{}" } else { s })
        .collect::<Vec<_>>()
        .join("/")
}

struct Client {
    http: reqwest::Client,
    api: String,
    admin: String,
}

impl Client {
    async fn call(&self, doc: &mut Doc, method: &str, url: &str, req: Req<'_>) -> (u16, Value) {
        let base = if ["/healthz", "/readyz", "/metrics"].contains(&url) { &self.admin } else { &self.api };
        let mut r = self.http.request(method.parse().unwrap(), format!("{base}{url}"));
        if req.token {
            r = r.bearer_auth(TOKEN);
        }
        for (n, v) in req.headers {
            r = r.header(*n, *v);
        }
        let resp = r.body(req.body).send().await.unwrap();
        let status = resp.status().as_u16();
        let ct = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let body = resp.bytes().await.unwrap();
        let path = url.split('?').next().unwrap();
        doc.check(&method.to_ascii_lowercase(), path, status, &ct, &body);
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }
}

struct Req<'a> {
    token: bool,
    headers: &'a [(&'a str, &'a str)],
    body: String,
}

fn req<'a>(headers: &'a [(&'a str, &'a str)], body: &str) -> Req<'a> {
    Req { token: true, headers, body: body.to_owned() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_the_running_sidecar() {
    let mut doc = Doc::load();
    let declared: BTreeSet<String> =
        declared_routes("src/api/mod.rs").iter().chain(&declared_routes("src/admin.rs")).map(|t| shape(t)).collect();
    let documented: BTreeSet<String> = doc.paths().iter().map(|t| shape(t)).collect();
    assert_eq!(declared, documented, "routes the server declares vs paths the document has");

    let nats = NatsServer::start();
    let res = manifests(&[("topics.yaml", TOPICS), ("subs.yaml", PULLED)]);
    let data = tempfile::tempdir().unwrap();
    let mut sc = Launch::new(nats.url(), res.path(), data.path()).arg("--api-token").arg(TOKEN).start();
    sc.wait_configured();
    sc.process.wait_for_line("starting subscription subscription=pulled", START_TIMEOUT);
    let c = Client { http: http(), api: sc.api.clone(), admin: sc.admin.clone() };
    let d = &mut doc;
    let text = [("content-type", "text/plain")];
    let ndjson = [("content-type", "application/x-ndjson")];
    let json_ct = [("content-type", "application/json")];

    // Produce, each answer and error the document lists that a healthy
    // sidecar gives.
    let one = "/v1/topics/orders/messages";
    assert_eq!(c.call(d, "POST", one, req(&[("ferry-id", "m-1"), text[0]], "one")).await.0, 202);
    assert_eq!(c.call(d, "POST", &format!("{one}?ack=broker"), req(&text, "two")).await.0, 201);
    let anonymous = Req { token: false, headers: &text, body: "x".into() };
    assert_eq!(c.call(d, "POST", one, anonymous).await.0, 401);
    assert_eq!(c.call(d, "POST", "/v1/topics/nope/messages", req(&text, "x")).await.0, 404);
    assert_eq!(c.call(d, "POST", &format!("{one}?ack=maybe"), req(&text, "x")).await.0, 400);
    assert_eq!(c.call(d, "POST", one, req(&text, &"x".repeat(8192))).await.0, 413);
    assert_eq!(c.call(d, "POST", one, req(&[("content-encoding", "br")], "x")).await.0, 415);
    let batch = "/v1/topics/orders/messages:batch";
    let lines = "{\"id\":\"b-1\",\"data\":{\"n\":1}}\n{\"id\":\"b-2\",\"data\":\"two\"}\n";
    assert_eq!(c.call(d, "POST", batch, req(&ndjson, lines)).await.0, 202);
    let array = r#"[{"id":"b-3","data":3,"key":"k"}]"#;
    assert_eq!(c.call(d, "POST", &format!("{batch}?ack=broker"), req(&json_ct, array)).await.0, 201);
    assert_eq!(c.call(d, "POST", batch, req(&json_ct, "[{\"nope\":1}]")).await.0, 400);
    assert_eq!(c.call(d, "POST", batch, req(&text, "x")).await.0, 415);

    // Message status and replay.
    let (status, body) = c.call(d, "GET", "/v1/messages/m-1", req(&[], "")).await;
    assert_eq!((status, &body["id"]), (200, &json!("m-1")));
    assert_eq!(c.call(d, "GET", "/v1/messages/never-produced", req(&[], "")).await.0, 404);
    let replay = "/v1/topics/orders/outbox:replay";
    assert_eq!(c.call(d, "POST", replay, req(&[], "")).await.0, 202);
    assert_eq!(c.call(d, "POST", &format!("{replay}?since=yesterday"), req(&[], "")).await.0, 400);
    assert_eq!(c.call(d, "POST", "/v1/topics/nope/outbox:replay", req(&[], "")).await.0, 404);

    // Pull, and the callbacks on what it gave.
    let pull = "/v1/subscriptions/pulled/messages";
    let (status, events) = c.call(d, "GET", &format!("{pull}?max=3&wait=5s"), req(&[], "")).await;
    assert_eq!(status, 200);
    let ids: Vec<String> =
        events.as_array().unwrap().iter().map(|e| e["ferrydeliveryid"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids.len(), 3, "{events}");
    assert_eq!(c.call(d, "GET", &format!("{pull}?max=0"), req(&[], "")).await.0, 400);
    assert_eq!(c.call(d, "GET", "/v1/subscriptions/nope/messages", req(&[], "")).await.0, 404);
    let ack = format!("/v1/deliveries/{}/ack", ids[0]);
    assert_eq!(c.call(d, "POST", &ack, req(&[], "")).await.0, 200);
    assert_eq!(c.call(d, "POST", &ack, req(&[], "")).await.0, 404, "settled already");
    let retry = format!("/v1/deliveries/{}/retry", ids[1]);
    assert_eq!(c.call(d, "POST", &format!("{retry}?delay=soon"), req(&[], "")).await.0, 400);
    assert_eq!(c.call(d, "POST", &retry, req(&json_ct, r#"{"delay":"1s"}"#)).await.0, 200);
    let reject = format!("/v1/deliveries/{}/reject", ids[2]);
    assert_eq!(c.call(d, "POST", &reject, req(&json_ct, r#"{"reason":7}"#)).await.0, 400);
    assert_eq!(c.call(d, "POST", &reject, req(&json_ct, r#"{"reason":"bad"}"#)).await.0, 200);

    // The admin port.
    assert_eq!(c.call(d, "GET", "/healthz", req(&[], "")).await.0, 200);
    assert_eq!(c.call(d, "GET", "/readyz", req(&[], "")).await.0, 200);
    assert_eq!(c.call(d, "GET", "/metrics", req(&[], "")).await.0, 200);

    let documented: BTreeSet<String> = doc.doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|item| item.as_object().unwrap().values().filter_map(|op| op["operationId"].as_str()))
        .map(str::to_owned)
        .collect();
    assert_eq!(doc.called, documented, "every documented operation is called");
}
