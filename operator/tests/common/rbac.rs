//! The Helm chart's RBAC as a checker: [`assert_allowed`] fails a test whose
//! operator code makes an API call that the ServiceAccount of the chart's
//! operator Deployment may not make. The controller tests call it for every
//! request they see (`expect_status`), so the chart's rules follow from the
//! calls the code really makes, not from a list kept by hand.
//!
//! Also home of the helpers that run the real `helm` binary (installed into
//! `.tools/` by `scripts/test`), shared with `tests/chart.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use http::{Method, Uri};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use serde_json::Value;

/// The release name the tests render the chart with.
pub const RELEASE: &str = "ferry";
/// The release (operator) namespace the tests render the chart with; the
/// controller tests use `shop` for the watched resources.
pub const NAMESPACE: &str = "ferry-system";

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The chart's folder.
pub fn chart_dir() -> PathBuf {
    repo().join("charts").join("ferry")
}

/// The `helm` binary: `FERRY_HELM`, else the one `scripts/test` installed
/// into `.tools/`. Panics with what to do when there is none.
pub fn helm() -> PathBuf {
    if let Some(path) = std::env::var_os("FERRY_HELM") {
        return PathBuf::from(path);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(repo().join(".tools"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("kubectl-layer-"))
        .map(|e| e.path().join("helm").join("helm"))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!("no helm: FERRY_HELM is unset and .tools/ has none; run scripts/test, it installs helm")
    })
}

/// Runs `helm <args>` in the repository root: stdout, or stdout and stderr
/// as the error when it fails.
pub fn run_helm(args: &[&str]) -> Result<String, String> {
    let helm = helm();
    let out = Command::new(&helm)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}; run scripts/test, it installs helm", helm.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "helm {} failed ({}):\n{stdout}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `helm template` of the chart as release [`RELEASE`] in [`NAMESPACE`],
/// with `--set` values.
pub fn template(sets: &[&str]) -> Result<String, String> {
    let chart = chart_dir();
    let mut args = vec!["template", RELEASE, chart.to_str().expect("a UTF-8 path"), "--namespace", NAMESPACE];
    for set in sets {
        args.extend(["--set", set]);
    }
    run_helm(&args)
}

/// The documents of a multi-document YAML stream, empty ones left out.
pub fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| {
            let value: serde_yaml::Value = serde::Deserialize::deserialize(doc).expect("helm renders YAML");
            serde_json::to_value(value).expect("YAML the API server takes is JSON")
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

/// One API request, as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A call on a resource.
    Resource {
        /// API group ("" for the core group).
        group: String,
        /// Resource, `resource/subresource` for a subresource.
        resource: String,
        /// The namespace, for a namespaced resource.
        namespace: Option<String>,
        /// The object's name (none for a collection).
        name: Option<String>,
        /// get, list, watch, create, update, patch, delete, deletecollection.
        verb: &'static str,
    },
    /// A call on a path that is not a resource (`/version`, `/healthz`).
    NonResource {
        /// The path.
        path: String,
        /// The HTTP verb, lower case.
        verb: String,
    },
}

/// Maps an API server request to what RBAC checks, as the API server does:
/// `/api/v1/...` is the core group, `/apis/{group}/{version}/...` a named
/// one; then `[namespaces/{ns}/]{resource}[/{name}[/{subresource}]]`.
pub fn request_of(method: &Method, uri: &Uri) -> Request {
    let path = uri.path();
    let segments: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let (group, rest) = match segments.as_slice() {
        ["api", _version, rest @ ..] if !rest.is_empty() => ("", rest),
        ["apis", group, _version, rest @ ..] if !rest.is_empty() => (*group, rest),
        _ => return Request::NonResource { path: path.to_owned(), verb: method.as_str().to_lowercase() },
    };
    // The old `/watch/` path prefix means watch.
    let (watch_prefix, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        rest => (false, rest),
    };
    let (namespace, rest): (Option<&str>, &[&str]) = match rest {
        // `/api/v1/namespaces/{name}` is the Namespace object itself.
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(*ns), rest),
        rest => (None, rest),
    };
    let (resource, name, subresource) = match rest {
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some(*name), None),
        [resource, name, sub, ..] => (*resource, Some(*name), Some(*sub)),
        // `/apis/{group}/{version}/watch` alone names no resource.
        [] => return Request::NonResource { path: path.to_owned(), verb: method.as_str().to_lowercase() },
    };
    let query: Vec<(String, String)> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect();
    let param = |key: &str| query.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let verb = match *method {
        _ if watch_prefix => "watch",
        Method::GET if name.is_some() => "get",
        Method::GET if matches!(param("watch"), Some("true" | "1")) => "watch",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if name.is_some() => "delete",
        Method::DELETE => "deletecollection",
        _ => panic!("no RBAC verb for {method} {uri}"),
    };
    // As the API server does: a list or watch of one name (field selector
    // `metadata.name=NAME`) is checked against resourceNames.
    let name = match (name, verb) {
        (None, "list" | "watch") => param("fieldSelector").and_then(|selector| {
            let name = selector.strip_prefix("metadata.name==").or_else(|| selector.strip_prefix("metadata.name="));
            name.filter(|n| !n.contains(',')).map(str::to_owned)
        }),
        (name, _) => name.map(str::to_owned),
    };
    Request::Resource {
        group: group.to_owned(),
        resource: match subresource {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource.to_owned(),
        },
        namespace: namespace.map(str::to_owned),
        name,
        verb,
    }
}

/// Decodes a query string component (`%XX`, and `+` for a space).
fn percent_decode(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                match std::str::from_utf8(&hex).ok().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(decoded) if hex.len() == 2 => out.push(decoded),
                    _ => {
                        out.push(b'%');
                        out.extend(hex);
                    }
                }
            }
            b => out.push(b),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Rules granted to one ServiceAccount, each with where it applies.
#[derive(Debug, Default)]
pub struct Rbac {
    /// (namespace the rule is limited to, or none for cluster-wide; rule).
    grants: Vec<(Option<String>, PolicyRule)>,
}

fn typed<T: serde::de::DeserializeOwned>(doc: &Value) -> T {
    serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{e}: {doc}"))
}

impl Rbac {
    /// The rules that the chart's bindings give the operator Deployment's
    /// ServiceAccount: a ClusterRoleBinding grants its ClusterRole
    /// everywhere, a RoleBinding its Role or ClusterRole in its namespace.
    pub fn of_chart(docs: &[Value]) -> Rbac {
        let deployment =
            docs.iter().find(|d| d["kind"] == "Deployment").expect("the chart renders the operator Deployment");
        let sa = deployment["spec"]["template"]["spec"]["serviceAccountName"].as_str().expect("a serviceAccountName");
        let sa_ns = deployment["metadata"]["namespace"].as_str().expect("a namespace");
        let is_operator = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
            subjects
                .iter()
                .flatten()
                .any(|s| s.kind == "ServiceAccount" && s.name == sa && s.namespace.as_deref() == Some(sa_ns))
        };
        let rules_of = |kind: &str, name: &str, ns: Option<&str>| -> Vec<PolicyRule> {
            let role = docs
                .iter()
                .find(|d| {
                    d["kind"] == kind && d["metadata"]["name"] == name && d["metadata"]["namespace"].as_str() == ns
                })
                .unwrap_or_else(|| panic!("a binding names {kind} {name}, which the chart does not render"));
            match kind {
                "ClusterRole" => typed::<ClusterRole>(role).rules,
                _ => typed::<Role>(role).rules,
            }
            .unwrap_or_default()
        };
        let mut rbac = Rbac::default();
        for doc in docs {
            match doc["kind"].as_str() {
                Some("ClusterRoleBinding") => {
                    let b: ClusterRoleBinding = typed(doc);
                    if is_operator(&b.subjects) {
                        for rule in rules_of("ClusterRole", &b.role_ref.name, None) {
                            rbac.grants.push((None, rule));
                        }
                    }
                }
                Some("RoleBinding") => {
                    let b: RoleBinding = typed(doc);
                    let ns = b.metadata.namespace.clone().expect("a RoleBinding has a namespace");
                    if is_operator(&b.subjects) {
                        let role_ns = (b.role_ref.kind == "Role").then_some(ns.as_str());
                        for rule in rules_of(&b.role_ref.kind, &b.role_ref.name, role_ns) {
                            rbac.grants.push((Some(ns.clone()), rule));
                        }
                    }
                }
                _ => {}
            }
        }
        rbac
    }

    /// Whether some granted rule allows `req` (Kubernetes' RBAC matching:
    /// `*` wildcards, `*/subresource`, resourceNames only for named calls).
    pub fn allows(&self, req: &Request) -> bool {
        let any = |list: &[String], want: &str| list.iter().any(|v| v == "*" || v == want);
        self.grants.iter().any(|(scope, rule)| {
            if !any(
                &rule.verbs,
                match req {
                    Request::Resource { verb, .. } => verb,
                    Request::NonResource { verb, .. } => verb,
                },
            ) {
                return false;
            }
            match req {
                Request::NonResource { path, .. } => {
                    scope.is_none()
                        && rule
                            .non_resource_urls
                            .iter()
                            .flatten()
                            .any(|u| u == path || u.strip_suffix('*').is_some_and(|prefix| path.starts_with(prefix)))
                }
                Request::Resource { group, resource, namespace, name, .. } => {
                    let in_scope = match scope {
                        None => true,
                        Some(scope) => namespace.as_deref() == Some(scope.as_str()),
                    };
                    let sub_wildcard = resource.split_once('/').map(|(_, sub)| format!("*/{sub}")).unwrap_or_default();
                    in_scope
                        && any(rule.api_groups.as_deref().unwrap_or_default(), group)
                        && rule.resources.iter().flatten().any(|r| r == "*" || r == resource || *r == sub_wildcard)
                        && match rule.resource_names.as_deref() {
                            None | Some([]) => true,
                            Some(names) => name.as_ref().is_some_and(|n| names.contains(n)),
                        }
                }
            }
        })
    }
}

/// The chart's RBAC, rendered once with default values.
pub fn chart_rbac() -> &'static Rbac {
    static RBAC: OnceLock<Rbac> = OnceLock::new();
    RBAC.get_or_init(|| Rbac::of_chart(&documents(&template(&[]).unwrap_or_else(|e| panic!("{e}")))))
}

/// Panics unless the chart's RBAC (default values) lets the operator make
/// this call.
pub fn assert_allowed(method: &Method, uri: &Uri) {
    let req = request_of(method, uri);
    assert!(
        chart_rbac().allows(&req),
        "the Helm chart's RBAC does not allow the operator's call {method} {uri} ({req:?}): \
         add the rule to charts/ferry/templates/rbac.yaml"
    );
}
