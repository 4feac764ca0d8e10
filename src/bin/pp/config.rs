//! `pp config`: from a destination exported from the BTP cockpit and a few flags, a
//! complete Envoy configuration: a listener, `jwt_authn` with the IdP's JWKS, the plugin
//! with the destination (its password moved into the environment), and clusters for the
//! target, the token service and the IdP, each verifying the server's certificate.
//! The plugin's own check runs on the result before it is written, so what `pp config`
//! writes is a configuration the plugin accepts.

use principal_propagation::config::PluginConfig;
use principal_propagation::http_url::HttpUrl;
use serde_json::{json, Map, Value};

pub const USAGE: &str = "usage: pp config --destination <exported.json> --idp-issuer <iss> --idp-jwks <https://…/jwks>
                 [--audience <JWT aud>] [--listen <address:port>] [--admin <address:port>]
                 [--wasm <path>] [--ca <bundle.pem>]
                 [--key-env PP_SIGNING_KEY] [--cert-env PP_SIGNING_CERT] [--secret-env PP_CLIENT_SECRET]
                 [--allow-insecure-token-service true] [--out <file>]
                 [--format envoy|istio|envoy-gateway [--authority <gateway host>] [--namespace <ns>]
                  [--gateway <Gateway name, envoy-gateway>]]

Writes a complete Envoy configuration (JSON, which is YAML too) for one destination as
the BTP cockpit exports it: a listener (default 0.0.0.0:8443, plain HTTP: put TLS in
front or add a transport socket), jwt_authn verifying the users' JWTs against the IdP's
JWKS (payload for the plugin; a missing or invalid JWT answered by the plugin), the
plugin (fail closed) with the destination and its gateway fields, and clusters for the
target (URL), the token service (tokenServiceURL) and the IdP, each https one verifying
the server's certificate and name against --ca (default the system bundle). The signing
key, its certificate and the token service password come from the environment variables
named (never from the file): the exported tokenServicePassword becomes
tokenServicePasswordEnv, KeyStoreLocation names the one key. The plugin's configuration
check runs on the result (with a throwaway key) before it is written.
--format istio writes Istio's manifests instead (YAML documents, written as JSON): the
ingress gateway's RequestAuthentication, a ServiceEntry and a TLS-originating
DestinationRule per external host, and the WasmPlugin (--wasm is then its url, oci:// or
file://; --authority the host whose requests propagate). --format envoy-gateway writes
Envoy Gateway's: an EnvoyProxy putting the secrets (Secret principal-propagation) into
Envoy's environment, the target as a Backend, an HTTPRoute from --authority on --gateway
to it, a SecurityPolicy JWT provider and the EnvoyExtensionPolicy (--wasm is its image);
the token service must then be on the target's host.";

const DEFAULT_CA: &str = "/etc/ssl/certs/ca-certificates.crt";
const DEFAULT_WASM: &str = "/etc/envoy/principal_propagation.wasm";
const KEY_NAME: &str = "gateway";

pub fn run(args: &[String]) -> Result<String, String> {
    let options = crate::parse_options(args)?;
    let get = |name: &str| options.get(name).map(String::as_str);
    let required = |name: &str| get(name).ok_or_else(|| format!("--{name} is required\n{USAGE}"));
    let path = required("destination")?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let exported: Value =
        serde_json::from_str(&text).map_err(|e| format!("{path}: not JSON: {e}"))?;
    // The cockpit exports one destination, or a list with one.
    let mut destination = match exported {
        Value::Object(d) => d,
        Value::Array(mut list) if list.len() == 1 => match list.remove(0) {
            Value::Object(d) => d,
            _ => return Err(format!("{path}: the destination is not a JSON object")),
        },
        _ => {
            return Err(format!(
                "{path}: one destination (a JSON object) is expected"
            ))
        }
    };
    let name = destination
        .get("Name")
        .and_then(Value::as_str)
        .ok_or(format!("{path}: the destination has no Name"))?
        .to_string();
    let key_env = get("key-env").unwrap_or("PP_SIGNING_KEY");
    let cert_env = get("cert-env").unwrap_or("PP_SIGNING_CERT");
    let secret_env = get("secret-env").unwrap_or("PP_CLIENT_SECRET");
    let ca = get("ca").unwrap_or(DEFAULT_CA);
    let insecure = match get("allow-insecure-token-service") {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err("--allow-insecure-token-service must be true or false".into()),
    };

    // Secrets never go into the file: the password moves to the environment.
    let mut env_keys = vec![key_env.to_string(), cert_env.to_string()];
    if destination.remove("tokenServicePassword").is_some() {
        destination.insert("tokenServicePasswordEnv".into(), json!(secret_env));
        env_keys.push(secret_env.to_string());
    }
    destination.remove("KeyStorePassword");
    destination.insert("KeyStoreLocation".into(), json!(KEY_NAME));
    let target = url_of(&destination, "URL")?;
    let token = url_of(&destination, "tokenServiceURL")?;
    let format = get("format").unwrap_or("envoy");
    let namespace = get("namespace").unwrap_or(match format {
        "istio" => "istio-system",
        _ => "default",
    });
    let route = format!("{}-route", kube_name(&name));
    let token_cluster = match format {
        "envoy" => "token_service".to_string(),
        // Istio names a ServiceEntry's cluster outbound|<port>||<host>.
        "istio" => format!("outbound|{}||{}", token.port, token.host),
        // Envoy Gateway names a route rule's cluster httproute/<ns>/<route>/rule/<i>: the
        // token service is reached through the target's route, so it must share its host.
        "envoy-gateway" if token.host == target.host && token.port == target.port => {
            format!("httproute/{namespace}/{route}/rule/0")
        }
        "envoy-gateway" => {
            return Err(format!(
                "--format envoy-gateway: the token service ({}:{}) is not on the target's host ({}:{}); \
                 add an HTTPRoute and Backend for it and set tokenServiceCluster to httproute/<ns>/<route>/rule/0",
                token.host, token.port, target.host, target.port
            ))
        }
        other => return Err(format!("--format {other:?}: envoy, istio or envoy-gateway")),
    };
    let istio = format == "istio";
    let gateway_api = format == "envoy-gateway";
    destination.insert("tokenServiceCluster".into(), json!(token_cluster));
    let jwks_text = required("idp-jwks")?;
    let jwks = HttpUrl::parse(jwks_text).map_err(|p| format!("--idp-jwks {p}"))?;
    let mut plugin = Map::new();
    if insecure {
        plugin.insert("allowInsecureTokenService".into(), json!(true));
    }
    plugin.insert(
        "keys".into(),
        json!({ KEY_NAME: {"privateKeyEnv": key_env, "certificateEnv": cert_env} }),
    );
    if istio || gateway_api {
        // A WasmPlugin applies to the whole gateway: only this host's requests propagate.
        let authority = required("authority")?;
        // Envoy Gateway puts the payload under the provider's name.
        let payload_key = if istio { "payload" } else { JWT_PROVIDER };
        plugin.insert("jwtPayloadMetadataKey".into(), json!(payload_key));
        plugin.insert(
            "destinationRules".into(),
            json!([{"authority": authority, "destination": name}]),
        );
    } else {
        plugin.insert("defaultDestination".into(), json!(name));
    }
    plugin.insert("destinations".into(), json!([Value::Object(destination)]));
    let plugin = Value::Object(plugin);
    check_plugin(&plugin, secret_env)?;
    if gateway_api {
        let manifests = envoy_gateway_manifests(&GatewayInput {
            name: &name,
            namespace,
            route: &route,
            gateway: required("gateway")?,
            authority: required("authority")?,
            issuer: required("idp-issuer")?,
            jwks: jwks_text,
            audience: get("audience"),
            image: required("wasm")?,
            env_keys: &env_keys,
            plugin,
            target: &target,
        });
        return written(get("out"), &manifests, &name, &env_keys);
    }
    if istio {
        let manifests = istio_manifests(&IstioInput {
            name: &name,
            namespace,
            issuer: required("idp-issuer")?,
            jwks: jwks_text,
            audience: get("audience"),
            wasm_url: required("wasm")?,
            ca,
            env_keys: &env_keys,
            plugin,
            endpoints: [&token, &target],
        });
        return written(get("out"), &manifests, &name, &env_keys);
    }

    let mut provider = json!({
        "issuer": required("idp-issuer")?,
        "remote_jwks": {
            "http_uri": {"uri": jwks_text, "cluster": "idp", "timeout": "5s"},
            "cache_duration": "600s",
        },
        "payload_in_metadata": "payload",
        "forward": false,
    });
    if let Some(audience) = get("audience") {
        provider["audiences"] = json!([audience]);
    }
    let (listen_host, listen_port) = host_port(get("listen").unwrap_or("0.0.0.0:8443"))?;
    let route = json!({
        "match": {"prefix": "/"},
        "route": {"cluster": "target", "host_rewrite_literal": target.host, "timeout": "30s"},
        "metadata": {"filter_metadata": {"principal_propagation": {"destination": name}}},
    });
    let mut config = json!({
        "static_resources": {
            "listeners": [{
                "name": "gateway",
                "address": {"socket_address": {"address": listen_host, "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "gateway",
                        "route_config": {"virtual_hosts": [{"name": "target", "domains": ["*"], "routes": [route]}]},
                        "http_filters": [
                            {
                                "name": "envoy.filters.http.jwt_authn",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                                    "providers": {"idp": provider},
                                    // The plugin answers a missing or invalid JWT (401, JSON).
                                    "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
                                        {"provider_name": "idp"}, {"allow_missing_or_failed": {}}]}}}],
                                },
                            },
                            {
                                "name": "envoy.filters.http.wasm",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                                    "config": {
                                        "name": "principal_propagation",
                                        "root_id": "principal_propagation",
                                        "fail_open": false,
                                        "vm_config": {
                                            "vm_id": "principal_propagation",
                                            "runtime": "envoy.wasm.runtime.v8",
                                            "code": {"local": {"filename": get("wasm").unwrap_or(DEFAULT_WASM)}},
                                            "environment_variables": {"host_env_keys": env_keys},
                                        },
                                        "configuration": {
                                            "@type": "type.googleapis.com/google.protobuf.StringValue",
                                            "value": plugin.to_string(),
                                        },
                                    },
                                },
                            },
                            {
                                "name": "envoy.filters.http.router",
                                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                            },
                        ],
                    },
                }]}],
            }],
            "clusters": [
                cluster("target", &target, ca),
                cluster("token_service", &token, ca),
                cluster("idp", &Endpoint::of(&jwks)?, ca),
            ],
        },
    });
    if let Some(admin) = get("admin") {
        let (host, port) = host_port(admin)?;
        config["admin"] =
            json!({"address": {"socket_address": {"address": host, "port_value": port}}});
    }
    let text = serde_json::to_string_pretty(&config).map_err(|e| e.to_string())?;
    written(get("out"), &text, &name, &env_keys)
}

/// `text` written to `out` (then a line saying what to set), or returned to print.
fn written(
    out: Option<&str>,
    text: &str,
    name: &str,
    env_keys: &[String],
) -> Result<String, String> {
    match out {
        Some(out) => {
            std::fs::write(out, format!("{text}\n")).map_err(|e| format!("{out}: {e}"))?;
            Ok(format!(
                "wrote {out}: destination {name}; set {} in the gateway's environment",
                env_keys.join(", ")
            ))
        }
        None => Ok(text.to_string()),
    }
}

/// What the Istio manifests are made of.
struct IstioInput<'a> {
    name: &'a str,
    namespace: &'a str,
    issuer: &'a str,
    jwks: &'a str,
    audience: Option<&'a str>,
    wasm_url: &'a str,
    ca: &'a str,
    env_keys: &'a [String],
    plugin: Value,
    /// The token service and the target: each gets a ServiceEntry and TLS origination.
    endpoints: [&'a Endpoint; 2],
}

/// Istio's manifests (YAML documents, each written as JSON): the ingress gateway's
/// RequestAuthentication, for each external host a ServiceEntry and a DestinationRule that
/// originates TLS verifying the server (without it Istio sends the callout in cleartext),
/// and the WasmPlugin after Istio's JWT authentication, failing closed.
fn istio_manifests(input: &IstioInput<'_>) -> String {
    let selector = json!({"matchLabels": {"istio": "ingressgateway"}});
    let metadata = |name: String| json!({"name": name, "namespace": input.namespace});
    let mut rule = json!({"issuer": input.issuer, "jwksUri": input.jwks});
    if let Some(audience) = input.audience {
        rule["audiences"] = json!([audience]);
    }
    let mut documents = vec![json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": metadata(format!("{}-users", kube_name(input.name))),
        "spec": {"selector": selector, "jwtRules": [rule]},
    })];
    let mut hosts: Vec<&Endpoint> = Vec::new();
    for endpoint in input.endpoints {
        if hosts
            .iter()
            .any(|h| h.host == endpoint.host && h.port == endpoint.port)
        {
            continue;
        }
        hosts.push(endpoint);
        let name = kube_name(&endpoint.host);
        documents.push(json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": metadata(name.clone()),
            "spec": {
                "hosts": [endpoint.host],
                "ports": [{"number": endpoint.port, "name": if endpoint.tls { "http-tls-origination" } else { "http" }, "protocol": "HTTP"}],
                "resolution": "DNS",
                "location": "MESH_EXTERNAL",
            },
        }));
        if endpoint.tls {
            documents.push(json!({
                "apiVersion": "networking.istio.io/v1",
                "kind": "DestinationRule",
                "metadata": metadata(format!("{name}-tls")),
                "spec": {
                    "host": endpoint.host,
                    "trafficPolicy": {"tls": {
                        "mode": "SIMPLE",
                        "sni": endpoint.host,
                        "caCertificates": input.ca,
                        "subjectAltNames": [endpoint.host],
                    }},
                },
            }));
        }
    }
    let env: Vec<Value> = input
        .env_keys
        .iter()
        .map(|key| json!({"name": key, "valueFrom": "HOST"}))
        .collect();
    documents.push(json!({
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": metadata("principal-propagation".into()),
        "spec": {
            "selector": selector,
            "url": input.wasm_url,
            "phase": "AUTHZ",
            "failStrategy": "FAIL_CLOSE",
            "vmConfig": {"env": env},
            "pluginConfig": input.plugin,
        },
    }));
    documents
        .iter()
        .map(|d| serde_json::to_string_pretty(d).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// The `SecurityPolicy` JWT provider's name (Envoy Gateway's metadata key of the payload).
const JWT_PROVIDER: &str = "users";

/// What the Envoy Gateway manifests are made of.
struct GatewayInput<'a> {
    name: &'a str,
    namespace: &'a str,
    route: &'a str,
    gateway: &'a str,
    authority: &'a str,
    issuer: &'a str,
    jwks: &'a str,
    audience: Option<&'a str>,
    image: &'a str,
    env_keys: &'a [String],
    plugin: Value,
    target: &'a Endpoint,
}

/// Envoy Gateway's manifests (YAML documents, each written as JSON): the `EnvoyProxy`
/// that puts the secrets into Envoy's environment (the Gateway's
/// `infrastructure.parametersRef` names it), the target as a `Backend` verifying its
/// certificate, the `HTTPRoute` from the gateway host to it, the `SecurityPolicy` JWT
/// provider, and the `EnvoyExtensionPolicy` running the plugin on that route, failing
/// closed.
fn envoy_gateway_manifests(input: &GatewayInput<'_>) -> String {
    let metadata = |name: &str| json!({"name": name, "namespace": input.namespace});
    let backend = format!("{}-backend", kube_name(input.name));
    let route_ref =
        json!([{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": input.route}]);
    let env: Vec<Value> = input
        .env_keys
        .iter()
        .map(|key| {
            json!({"name": key, "valueFrom": {"secretKeyRef": {
                "name": "principal-propagation", "key": kube_name(key)}}})
        })
        .collect();
    let mut provider =
        json!({"name": JWT_PROVIDER, "issuer": input.issuer, "remoteJWKS": {"uri": input.jwks}});
    if let Some(audience) = input.audience {
        provider["audiences"] = json!([audience]);
    }
    let mut backend_spec = json!({"endpoints": [{"fqdn": {"hostname": input.target.host, "port": input.target.port}}]});
    if input.target.tls {
        backend_spec["tls"] =
            json!({"sni": input.target.host, "wellKnownCACertificates": "System"});
    }
    let documents = [
        json!({
            "apiVersion": "gateway.envoyproxy.io/v1alpha1",
            "kind": "EnvoyProxy",
            "metadata": metadata("principal-propagation"),
            "spec": {"provider": {"type": "Kubernetes", "kubernetes": {"envoyDeployment": {"container": {"env": env}}}}},
        }),
        json!({
            "apiVersion": "gateway.envoyproxy.io/v1alpha1",
            "kind": "Backend",
            "metadata": metadata(&backend),
            "spec": backend_spec,
        }),
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": metadata(input.route),
            "spec": {
                "parentRefs": [{"name": input.gateway}],
                "hostnames": [input.authority],
                "rules": [{
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "filters": [{"type": "URLRewrite", "urlRewrite": {"hostname": input.target.host}}],
                    "backendRefs": [{"group": "gateway.envoyproxy.io", "kind": "Backend", "name": backend}],
                }],
            },
        }),
        json!({
            "apiVersion": "gateway.envoyproxy.io/v1alpha1",
            "kind": "SecurityPolicy",
            "metadata": metadata(&format!("{}-users", kube_name(input.name))),
            // optional: a request without a JWT reaches the plugin, which answers it (401, JSON).
            "spec": {"targetRefs": route_ref, "jwt": {"optional": true, "providers": [provider]}},
        }),
        json!({
            "apiVersion": "gateway.envoyproxy.io/v1alpha1",
            "kind": "EnvoyExtensionPolicy",
            "metadata": metadata("principal-propagation"),
            "spec": {
                "targetRefs": route_ref,
                "wasm": [{
                    "name": "principal-propagation",
                    "rootID": "principal_propagation",
                    "failOpen": false,
                    "code": {"type": "Image", "image": {"url": input.image}},
                    "env": {"hostKeys": input.env_keys},
                    "config": input.plugin,
                }],
            },
        }),
    ];
    documents
        .iter()
        .map(|d| serde_json::to_string_pretty(d).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// A Kubernetes object name (RFC 1123 label) from `text`.
fn kube_name(text: &str) -> String {
    let name: String = text
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let name = name.trim_matches('-');
    name.chars()
        .take(53)
        .collect::<String>()
        .trim_end_matches('-')
        .to_string()
}

/// Where a cluster connects.
struct Endpoint {
    host: String,
    port: u16,
    tls: bool,
}

impl Endpoint {
    fn of(url: &HttpUrl) -> Result<Endpoint, String> {
        let tls = url.full.starts_with("https://");
        let (host, port) = match url.authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || port.is_empty() => (
                host.to_string(),
                port.parse()
                    .map_err(|_| format!("{}: bad port", url.full))?,
            ),
            _ => (url.authority.clone(), if tls { 443 } else { 80 }),
        };
        Ok(Endpoint {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            tls,
        })
    }
}

fn url_of(destination: &Map<String, Value>, key: &str) -> Result<Endpoint, String> {
    let text = destination
        .get(key)
        .and_then(Value::as_str)
        .ok_or(format!("the destination has no {key}"))?;
    Endpoint::of(&HttpUrl::parse(text).map_err(|p| format!("{key} {p}"))?)
}

fn host_port(text: &str) -> Result<(String, u16), String> {
    let (host, port) = text
        .rsplit_once(':')
        .ok_or(format!("{text:?}: address:port expected"))?;
    let port = port.parse().map_err(|_| format!("{text:?}: bad port"))?;
    Ok((host.to_string(), port))
}

/// A cluster to `endpoint`; over TLS it verifies the server's certificate against `ca` and
/// its name (without a validation context Envoy accepts any certificate).
fn cluster(name: &str, endpoint: &Endpoint, ca: &str) -> Value {
    let mut cluster = json!({
        "name": name,
        "type": "LOGICAL_DNS",
        "connect_timeout": "5s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": endpoint.host, "port_value": endpoint.port}}}}]}]},
    });
    if endpoint.tls {
        cluster["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": endpoint.host,
                "common_tls_context": {"validation_context": {
                    "trusted_ca": {"filename": ca},
                    "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": endpoint.host}}],
                }},
            },
        });
    }
    cluster
}

/// The plugin's own configuration check, with a throwaway key (its certificate's CN the
/// destination's issuer) and a placeholder password in the variables, so that a
/// destination the plugin would refuse is never written.
fn check_plugin(plugin: &Value, secret_env: &str) -> Result<(), String> {
    let issuer = plugin["destinations"][0]["assertionIssuer"]
        .as_str()
        .unwrap_or("placeholder");
    let (key, cert) = crate::keys::throwaway_pair(issuer)?;
    let key_env = plugin["keys"][KEY_NAME]["privateKeyEnv"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let cert_env = plugin["keys"][KEY_NAME]["certificateEnv"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let secret = secret_env.to_string();
    let env = move |name: &str| {
        if name == key_env {
            Some(key.clone())
        } else if name == cert_env {
            Some(cert.clone())
        } else if name == secret {
            Some("placeholder".to_string())
        } else {
            None
        }
    };
    PluginConfig::parse(plugin.to_string().as_bytes(), &env)
        .map(|_| ())
        .map_err(|e| format!("the plugin would refuse this destination: {e}"))
}
