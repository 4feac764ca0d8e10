//! The thin proxy-wasm layer: Envoy's root and HTTP contexts around [`crate::flow`].
//!
//! It only translates: it reads headers and properties, hands them to the core, and
//! carries out what the core decides (forward, pause, answer; the tick period; which root
//! registers the queue). One [`Worker`] per VM (per Envoy worker) is shared by all root
//! contexts of the VM, so exchanges survive a configuration update.

mod envoy_host;

use crate::config::PluginConfig;
use crate::coordination::registry;
use crate::destination_api::{self, Answer, ApiSettings, Call, Refusal, TokenPart};
use crate::error::Failure;
use crate::flow::{Decision, Worker};
use crate::forwarding::{self, Additions, Edit};
use crate::host::{Clock, Level, Telemetry};
use crate::identity::payload::{claims_from_metadata, root_claims};
use crate::identity::user_token;
use crate::identity::{principal_from_raw, Identity, Principal, UserIdRule};
use crate::pairs;
use crate::selection::{RequestView, Selected};
use crate::trust::download;
use envoy_host::EnvoyHost;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

/// Route metadata (`filter_metadata.principal_propagation.destination`) selecting the
/// destination for a route.
pub const ROUTE_METADATA_PATH: [&str; 5] = [
    "xds",
    "route_metadata",
    "filter_metadata",
    "principal_propagation",
    "destination",
];

/// How often certificate expiry is looked at (notices are logged once a day).
const CERTIFICATE_CHECK_MS: u64 = 3_600_000;

thread_local! {
    /// One [`Worker`] per VM (that is, per Envoy worker thread).
    static WORKER: Rc<RefCell<Worker>> = Rc::new(RefCell::new(Worker::new()));
    /// The VM's queue name, chosen once (at random, see [`registry::queue_name`]).
    static QUEUE_NAME: RefCell<Option<String>> = const { RefCell::new(None) };
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(PluginRoot {
            context_id,
            config: None,
            queue: None,
            certificates_checked_ms: 0,
            tick_ms: 0,
            retiring: false,
        })
    });
}}

/// A root context: one per plugin configuration and VM.
struct PluginRoot {
    context_id: u32,
    config: Option<Rc<PluginConfig>>,
    queue: Option<u32>,
    certificates_checked_ms: u64,
    /// The tick period this root's timer runs at (ms; 0: off).
    tick_ms: u64,
    /// Envoy shuts this root down; it waits for its callouts' answers.
    retiring: bool,
}

impl PluginRoot {
    /// Runs `f` on the VM's worker, then makes this root the effective context again (the
    /// worker may have switched to requests' contexts to resume them), re-registers the
    /// queue if this root now drives without owning it, and sets the tick period the
    /// worker asks for.
    fn with_worker<R>(&mut self, f: impl FnOnce(&mut Worker, &EnvoyHost) -> R) -> Option<R> {
        let host = EnvoyHost;
        let root = self.context_id;
        let result = WORKER.with(|worker| {
            let mut worker = worker.try_borrow_mut().ok()?;
            let result = f(&mut worker, &host);
            let _ = hostcalls::set_effective_context(root);
            if worker.needs_queue(root) {
                if let Some(queue) = QUEUE_NAME
                    .with(|name| name.borrow().clone())
                    .and_then(|name| EnvoyHost::register_queue(&name))
                {
                    self.queue = Some(queue);
                    worker.queue_registered(&host, root);
                }
            }
            let period = if self.retiring {
                0
            } else {
                worker.tick_period_ms(root)
            };
            Some((result, period))
        });
        let _ = hostcalls::set_effective_context(root);
        let (result, period) = result?;
        if period != self.tick_ms {
            self.tick_ms = period;
            self.set_tick_period(Duration::from_millis(period));
        }
        Some(result)
    }

    /// The VM's queue: its name chosen at random once per VM, registered for this root.
    fn register_queue(&self, host: &EnvoyHost) -> Option<u32> {
        let name = QUEUE_NAME.with(|name| {
            let mut name = name.borrow_mut();
            if name.is_none() {
                *name = registry::queue_name(host);
            }
            name.clone()
        })?;
        EnvoyHost::register_queue(&name)
    }
}

impl Context for PluginRoot {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        // A failed callout (reset, timeout after the headers) comes with no headers at
        // all, and then Envoy has no response map: reading `:status` would make the SDK
        // panic on the BadArgument status and kill the VM. Read nothing in that case.
        let (status, body) = if headers == 0 {
            (None, Vec::new())
        } else {
            let status = self
                .get_http_call_response_header(":status")
                .and_then(|s| s.parse::<u16>().ok());
            // Only a bounded prefix is copied into the VM, however large the answer: one
            // byte over the limit is enough for the parser to refuse an oversized one.
            let limit = crate::oauth::token_response::MAX_RESPONSE_BYTES + 1;
            let body = match body_size {
                0 => Vec::new(),
                size => self
                    .get_http_call_response_body(0, size.min(limit))
                    .unwrap_or_default(),
            };
            (status, body)
        };
        let root = self.context_id;
        let drained = self.with_worker(|worker, host| {
            worker.on_callout_response(host, root, token_id, status, &body);
            worker.root_drained(root)
        });
        if self.retiring && drained == Some(true) {
            self.done();
        }
    }

    /// Envoy shuts this root down (its configuration was replaced and its requests are
    /// done). Its callouts would be cancelled without an answer, so it stays until they
    /// have answered.
    fn on_done(&mut self) -> bool {
        self.retiring = true;
        let root = self.context_id;
        let done = self
            .with_worker(|worker, _| worker.root_done(root))
            .unwrap_or(true);
        self.set_tick_period(Duration::ZERO);
        self.tick_ms = 0;
        done
    }
}

impl RootContext for PluginRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let host = EnvoyHost;
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let env = |name: &str| std::env::var(name).ok();
        let config = match PluginConfig::parse(&bytes, &env) {
            Ok(config) => Rc::new(config),
            Err(e) => {
                host.log(Level::Error, &e.to_string());
                return false;
            }
        };
        // Every root registers the VM's queue: the newest one receives its messages.
        let Some(queue) = self.register_queue(&host) else {
            host.log(
                Level::Error,
                "cannot register the worker queue (is WASI random_get available?)",
            );
            return false;
        };
        self.queue = Some(queue);
        host.log(
            Level::Info,
            &format!(
                "configured {} destination(s), {} signing key(s); {}",
                config.destinations.len(),
                config.keys.len(),
                config.selection.describe(
                    &config
                        .destinations
                        .iter()
                        .map(|d| d.name.clone())
                        .collect::<Vec<_>>()
                )
            ),
        );
        for notice in &config.notices {
            host.log(Level::Warn, notice);
        }
        let root = self.context_id;
        let configured = Rc::clone(&config);
        if self
            .with_worker(|worker, host| worker.configure(host, root, queue, &configured))
            .is_none()
        {
            host.log(Level::Error, "worker busy while configuring");
            return false;
        }
        host.check_certificates(&config);
        self.certificates_checked_ms = host.now_ms();
        self.config = Some(config);
        true
    }

    fn on_tick(&mut self) {
        let root = self.context_id;
        let Some(tick) = self.with_worker(|worker, host| worker.on_tick(host, root)) else {
            return;
        };
        if tick.second {
            let host = EnvoyHost;
            host.report_wasm_memory();
            let now_ms = host.now_ms();
            if now_ms.saturating_sub(self.certificates_checked_ms) >= CERTIFICATE_CHECK_MS {
                if let Some(config) = &self.config {
                    host.check_certificates(config);
                }
                self.certificates_checked_ms = now_ms;
            }
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        let messages = EnvoyHost::drain_queue(queue_id);
        let root = self.context_id;
        self.with_worker(|worker, host| worker.on_messages(host, root, &messages));
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = Rc::clone(self.config.as_ref()?);
        Some(Box::new(PluginRequest {
            context_id,
            config,
            worker: WORKER.with(Rc::clone),
            waiting: false,
            propagated: None,
            forwarded_with: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The user as `jwt_authn` left them in the request's dynamic metadata.
struct JwtMetadata<'a> {
    config: &'a PluginConfig,
    /// Where the user's own token is: `Authorization: Bearer` on a propagated request,
    /// `X-user-token` on a find-destination call.
    token_in: TokenHeader,
}

/// The header that carries the user's own token.
#[derive(Clone, Copy)]
enum TokenHeader {
    Authorization,
    XUserToken,
}

impl Identity for JwtMetadata<'_> {
    /// The payload read as one property (its root claims as raw bytes, see
    /// [`root_claims`]): a fraction of the cost of [`Self::claims`].
    fn quick_principal(&self, rule: &UserIdRule) -> Option<Principal> {
        let config = self.config;
        let property = vec![
            "metadata",
            "filter_metadata",
            config.jwt_filter_name.as_str(),
            config.jwt_payload_key.as_str(),
        ];
        if property.iter().any(|part| part.contains('\0')) {
            return None; // the host splits property paths at NUL
        }
        let bytes = hostcalls::get_property(property).ok().flatten()?;
        principal_from_raw(rule, &root_claims(&bytes)?)
    }

    fn claims(&self) -> Option<serde_json::Value> {
        let metadata = hostcalls::get_property(vec!["metadata"]).ok().flatten()?;
        claims_from_metadata(
            &metadata,
            &self.config.jwt_filter_name,
            &self.config.jwt_payload_key,
        )
    }

    /// The one `Authorization: Bearer` (or `X-user-token`) token of the request (read as
    /// raw pairs: a value need not be UTF-8); none when there are two, which would be
    /// ambiguous.
    fn raw_token(&self) -> Option<String> {
        let raw = envoy_host::request_header_pairs()?;
        let headers = pairs::parse(&raw)?;
        let name: &[u8] = match self.token_in {
            TokenHeader::Authorization => b"authorization",
            TokenHeader::XUserToken => b"x-user-token",
        };
        let mut values = headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name));
        let (_, value) = values.next()?;
        if values.next().is_some() {
            return None;
        }
        match self.token_in {
            TokenHeader::Authorization => user_token::bearer_token(value),
            TokenHeader::XUserToken => user_token::bare_token(value),
        }
        .map(str::to_string)
    }
}

/// The caller of a find-destination call for a `SystemUser` destination: the token is the
/// technical user's, so, as SAP's Destination Service does (and the SAP Cloud SDK sends
/// no `X-user-token` for it), the application's verified and allowed service token is
/// enough; a user's claims, if any, shape nothing.
struct TechnicalUser<'a>(&'a JwtMetadata<'a>);

impl Identity for TechnicalUser<'_> {
    fn quick_principal(&self, rule: &UserIdRule) -> Option<Principal> {
        self.0.quick_principal(rule)
    }

    fn claims(&self) -> Option<serde_json::Value> {
        Some(self.0.claims().unwrap_or_else(|| serde_json::json!({})))
    }
}

/// The request's headers as the selection rules see them.
struct HeaderView<'a>(&'a [(&'a [u8], &'a [u8])]);

impl RequestView for HeaderView<'_> {
    fn header(&self, name: &str) -> Option<&[u8]> {
        pairs::get(self.0, name)
    }
}

/// One HTTP request.
struct PluginRequest {
    context_id: u32,
    config: Rc<PluginConfig>,
    worker: Rc<RefCell<Worker>>,
    waiting: bool,
    /// The destination this request was propagated to (its token injected or awaited).
    propagated: Option<usize>,
    /// The `Authorization` it was forwarded with, kept where the destination evicts tokens
    /// its backend refuses (a waiting request's is kept by [`envoy_host`] on resume).
    forwarded_with: Option<String>,
}

impl PluginRequest {
    /// Answers a request for the gateway's IdP metadata or certificates; false if the
    /// request is not one of those. Only requests without an authenticated user get here,
    /// so a cache hit never reads `:path` for it.
    fn answer_trust_download(&self, config: &PluginConfig) -> bool {
        let Some(prefix) = &config.trust_metadata_path else {
            return false;
        };
        let Some(raw) = envoy_host::request_header_pairs() else {
            return false;
        };
        let headers = pairs::parse(&raw).unwrap_or_default();
        // Text only: a value that is not UTF-8 names no download.
        let header =
            |name: &str| pairs::get(&headers, name).and_then(|v| std::str::from_utf8(v).ok());
        let path = header(":path").unwrap_or_default();
        if !path.starts_with(prefix.as_str()) {
            return false;
        }
        let scheme = header(":scheme").unwrap_or("http");
        let authority = header(":authority").unwrap_or_default();
        let method = header(":method").unwrap_or_default();
        let Some(reply) =
            download::respond(config, method, path, &format!("{scheme}://{authority}"))
        else {
            return false;
        };
        let mut headers = vec![
            ("content-type", reply.content_type),
            ("cache-control", "no-cache"),
        ];
        if reply.status == 405 {
            headers.push(("allow", "GET, HEAD"));
        }
        let body = (!reply.body.is_empty()).then_some(reply.body.as_bytes());
        self.send_http_response(reply.status, headers, body);
        true
    }

    /// Makes the request one the backend may get: every inbound credential the destination
    /// removes is gone, its `URL.headers.*` and `URL.queries.*` are in (see
    /// [`crate::forwarding`]). One host call reads the headers; edits are made only where
    /// the request needs them.
    /// False if the headers could not be read: the request must then not go on (it could
    /// carry a credential that is not removed).
    fn prepare_forwarding(
        &self,
        config: &PluginConfig,
        destination: usize,
        read_already: Option<Vec<u8>>,
    ) -> bool {
        let Some(dest) = config.destinations.get(destination) else {
            return false;
        };
        let Some(raw) = read_already.or_else(envoy_host::request_header_pairs) else {
            return false;
        };
        let Some(headers) = pairs::parse(&raw) else {
            return false;
        };
        let add = Additions {
            headers: &dest.url_headers,
            queries: &dest.url_queries,
        };
        for edit in forwarding::edits(&headers, &dest.removal, &add) {
            match edit {
                Edit::Remove(name) => self.set_http_request_header(&name, None),
                Edit::Set(name, value) => self.set_http_request_header_bytes(&name, Some(&value)),
            }
        }
        true
    }
}

impl PluginRequest {
    /// Answers a find-destination call (see [`crate::destination_api`]): the caller's
    /// service token and the destination's exposure are checked, then the user's token is
    /// looked up or exchanged on the same engine as a propagated request; a waiting call
    /// is answered when its exchange settles ([`envoy_host`] keeps its answer).
    fn answer_destination_api(
        &mut self,
        config: &Rc<PluginConfig>,
        api: &ApiSettings,
        call: Call,
    ) -> Action {
        let host = EnvoyHost;
        let method = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, ":method")
            .ok()
            .flatten();
        if method.as_deref() != Some(b"GET") {
            return refuse(Refusal::MethodNotAllowed);
        }
        let service = hostcalls::get_property(vec!["metadata"])
            .ok()
            .flatten()
            .and_then(|m| {
                claims_from_metadata(&m, &config.jwt_filter_name, &api.service_token_key)
            });
        let Some(service) = service else {
            return refuse(Refusal::Unauthenticated);
        };
        let exposed = call
            .name
            .as_deref()
            .and_then(|name| config.destination_index(name))
            .and_then(|i| Some((i, config.destinations.get(i)?)))
            .and_then(|(i, d)| Some((i, d, d.exposure.as_ref()?)));
        let Some((index, dest, exposure)) = exposed else {
            return refuse(Refusal::NotFound);
        };
        if !destination_api::client_id(&service).is_some_and(|c| exposure.allows(c)) {
            return refuse(Refusal::Forbidden);
        }
        let scope = dest.saml().and_then(|s| s.scope.as_deref());
        let answer = Answer::new(destination_api::subaccount(api, &service), exposure, scope);
        if call.skip_token_retrieval {
            envoy_host::send_api_answer(&answer, &TokenPart::Skipped);
            return Action::Pause;
        }
        let user = JwtMetadata {
            config,
            token_in: TokenHeader::XUserToken,
        };
        let technical = TechnicalUser(&user);
        let identity: &dyn Identity = match dest.user_id {
            UserIdRule::SystemUser(_) => &technical,
            _ => &user,
        };
        let Ok(mut worker) = self.worker.try_borrow_mut() else {
            host.send_reply(&Failure::Internal {
                reason: "worker busy",
            });
            return Action::Pause;
        };
        let (decision, usable_until_ms) =
            worker.on_request_with_expiry(&host, config, self.context_id, index, identity);
        drop(worker);
        let part = match decision {
            Decision::Forward(value) => {
                TokenPart::of(&dest.carrier, &value, usable_until_ms, host.now_ms())
            }
            Decision::Wait => {
                envoy_host::await_api_answer(self.context_id, answer, dest.carrier.clone());
                self.waiting = true;
                return Action::Pause;
            }
            Decision::Fail(failure) => TokenPart::Error(failure.description()),
        };
        envoy_host::send_api_answer(&answer, &part);
        Action::Pause
    }
}

/// Answers a find-destination call with one of the API's refusals.
fn refuse(refusal: Refusal) -> Action {
    let (status, mut headers, body) = refusal.reply();
    headers.push(("content-type", "application/json"));
    let _ = hostcalls::send_http_response(status, headers, Some(body.as_bytes()));
    Action::Pause
}

impl Context for PluginRequest {
    fn on_done(&mut self) -> bool {
        // try_borrow: should a host ever end a stream from inside a worker callback,
        // the worker skips the gone request itself (resume/fail report it missing).
        if self.waiting {
            envoy_host::take_resumed_credential(self.context_id);
            envoy_host::forget_api_answer(self.context_id);
            if let Ok(mut worker) = self.worker.try_borrow_mut() {
                worker.forget_request(self.context_id);
            }
        }
        true
    }
}

impl HttpContext for PluginRequest {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let config = Rc::clone(&self.config);
        let host = EnvoyHost;
        // A find-destination call is answered here, never propagated (one `:path` read,
        // only where the API is configured).
        if let Some(api) = &config.destination_api {
            let call = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, ":path")
                .ok()
                .flatten()
                .and_then(|path| api.call(&path));
            if let Some(call) = call {
                return self.answer_destination_api(&config, api, call);
            }
        }
        let named = hostcalls::get_property(ROUTE_METADATA_PATH.to_vec())
            .ok()
            .flatten();
        // The rules need the request's headers: read once, kept for the forwarding.
        let raw_headers = if named.is_none() && config.selection.has_rules() {
            envoy_host::request_header_pairs()
        } else {
            None
        };
        let parsed = raw_headers
            .as_deref()
            .and_then(pairs::parse)
            .unwrap_or_default();
        let view = HeaderView(&parsed);
        let destination = match config.selection.select(
            &|name| config.destination_index(name),
            named.as_deref(),
            &view,
        ) {
            Selected::Destination(index) => index,
            Selected::PassThrough => {
                return if self.answer_trust_download(&config) {
                    Action::Pause
                } else {
                    Action::Continue
                };
            }
            Selected::Refuse => {
                if !self.answer_trust_download(&config) {
                    host.send_reply(&Failure::NoDestination);
                }
                return Action::Pause;
            }
            Selected::UnknownName(name) => {
                host.log(
                    Level::Error,
                    &format!("route names unknown destination {name:?}"),
                );
                host.send_reply(&Failure::Internal {
                    reason: "the route names an unknown destination",
                });
                return Action::Pause;
            }
        };
        let identity = JwtMetadata {
            config: &config,
            token_in: TokenHeader::Authorization,
        };
        let Ok(mut worker) = self.worker.try_borrow_mut() else {
            host.send_reply(&Failure::Internal {
                reason: "worker busy",
            });
            return Action::Pause;
        };
        let decision = worker.on_request(&host, &config, self.context_id, destination, &identity);
        drop(worker);
        // The caller's credentials never reach the backend: every other one is removed
        // here, `Authorization` is replaced, or removed while waiting (the worker sets the
        // token on resume); nothing is forwarded on failure.
        let propagating = matches!(decision, Decision::Forward(_) | Decision::Wait);
        if propagating && !self.prepare_forwarding(&config, destination, raw_headers) {
            host.send_reply(&Failure::Internal {
                reason: "cannot read the request's headers",
            });
            return Action::Pause;
        }
        let carrier = config.destinations.get(destination).map(|d| &d.carrier);
        if propagating && carrier.is_some_and(|c| c.header != "authorization") {
            // The gateway sends no `Authorization` where the credential rides elsewhere.
            self.set_http_request_header("authorization", None);
        }
        match decision {
            Decision::Forward(value) => {
                let Some(carrier) = carrier else {
                    host.send_reply(&Failure::Internal {
                        reason: "unknown destination",
                    });
                    return Action::Pause;
                };
                self.set_http_request_header(&carrier.header, Some(&value));
                self.propagated = Some(destination);
                if config
                    .destinations
                    .get(destination)
                    .is_some_and(|d| !d.evict_on_status.is_empty())
                {
                    self.forwarded_with = Some(value);
                }
                Action::Continue
            }
            Decision::Wait => {
                // Removed while waiting: the worker sets it on resume.
                self.set_http_request_header("authorization", None);
                self.waiting = true;
                self.propagated = Some(destination);
                Action::Pause
            }
            Decision::Fail(Failure::NotAuthenticated) if self.answer_trust_download(&config) => {
                Action::Pause
            }
            Decision::Fail(failure) => {
                host.send_reply(&failure);
                Action::Pause
            }
        }
    }

    /// A backend that refuses the token it was given (a status in the destination's
    /// `evictTokenOnUpstreamStatus`) makes the plugin drop that token; the answer goes to
    /// the client unchanged. Only a propagated request reads its status.
    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(destination) = self.propagated else {
            return Action::Continue;
        };
        let config = Rc::clone(&self.config);
        let Some(dest) = config.destinations.get(destination) else {
            return Action::Continue;
        };
        if dest.evict_on_status.is_empty() {
            return Action::Continue;
        }
        let refused = self
            .get_http_response_header(":status")
            .and_then(|s| s.parse::<u16>().ok())
            .is_some_and(|status| dest.evict_on_status.contains(&status));
        if !refused {
            return Action::Continue;
        }
        // Request headers cannot be read any more (Envoy refuses, and the SDK would panic).
        // None when the gateway answered the request itself: it then carried no token.
        let forwarded_with = self
            .forwarded_with
            .take()
            .or_else(|| envoy_host::take_resumed_credential(self.context_id));
        let Some(carried) = forwarded_with else {
            return Action::Continue;
        };
        let identity = JwtMetadata {
            config: &config,
            token_in: TokenHeader::Authorization,
        };
        if let Ok(mut worker) = self.worker.try_borrow_mut() {
            worker.on_backend_refused(&EnvoyHost, &config, destination, &identity, &carried);
        }
        Action::Continue
    }
}
