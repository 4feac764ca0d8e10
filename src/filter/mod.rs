//! The thin proxy-wasm layer: Envoy's root and HTTP contexts around [`crate::flow`].
//!
//! Root contexts (one per configuration and worker) own the configuration and every
//! token callout, and drive the worker's [`Worker`] (one per VM, i.e. per Envoy
//! worker); HTTP contexts read the route's destination and
//! the verified JWT payload, ask the worker, and forward, pause or answer.

mod envoy_host;

use crate::config::PluginConfig;
use crate::flow::{Decision, Host, Level, Notice, Worker};
use crate::http_url::append_query;
use crate::identity::payload::{claims_from_metadata, string_claim_from_property};
use crate::identity::Identity;
use crate::trust::download::answer;
use envoy_host::{EnvoyHost, Metrics};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
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

/// How often a worker looks for results it may have missed (see [`Worker::on_tick`]).
const TICK_PERIOD: Duration = Duration::from_secs(1);
/// The tick while the worker signs assertions: a slice of signing a millisecond (see
/// [`Worker::on_slice`]); the worker's other requests are served in between.
const SIGNING_TICK_PERIOD: Duration = Duration::from_millis(1);
/// How often certificate expiry is looked at (notices are logged once a day).
const CERTIFICATE_CHECK_MS: u64 = 3_600_000;

thread_local! {
    /// One [`Worker`] per VM (that is, per Envoy worker thread), shared by all root
    /// contexts of the VM, so exchanges survive a configuration update.
    static WORKER: Rc<RefCell<Worker>> = Rc::new(RefCell::new(Worker::new()));
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(PluginRoot {
            context_id,
            config: None,
            queue: None,
            metrics: None,
            certificates_checked_ms: 0,
            second_ticked_ms: 0,
            signing_ticks: false,
        })
    });
}}

/// A root context: one per plugin configuration and VM.
struct PluginRoot {
    context_id: u32,
    config: Option<Rc<PluginConfig>>,
    /// The VM's queue (wake-ups and notices from other workers).
    queue: Option<u32>,
    metrics: Option<Rc<Metrics>>,
    certificates_checked_ms: u64,
    /// When the once-a-second duties of [`RootContext::on_tick`] last ran (host ms).
    second_ticked_ms: u64,
    /// Whether the tick runs at [`SIGNING_TICK_PERIOD`].
    signing_ticks: bool,
}

impl PluginRoot {
    fn host(&self) -> EnvoyHost {
        EnvoyHost::new(self.queue, self.metrics.clone())
    }

    /// Runs `f` on the VM's worker, then makes this root the effective context again
    /// (the worker may have switched to requests' contexts to resume them) and paces
    /// the tick: every millisecond while the worker signs, every second otherwise.
    fn with_worker(&mut self, f: impl FnOnce(&mut Worker, &EnvoyHost)) {
        let host = self.host();
        let signing = WORKER.with(|worker| match worker.try_borrow_mut() {
            Ok(mut worker) => {
                f(&mut worker, &host);
                worker.signing()
            }
            Err(_) => self.signing_ticks,
        });
        let _ = hostcalls::set_effective_context(self.context_id);
        if signing != self.signing_ticks {
            self.signing_ticks = signing;
            self.set_tick_period(if signing {
                SIGNING_TICK_PERIOD
            } else {
                TICK_PERIOD
            });
        }
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
        self.with_worker(|worker, host| worker.on_token_response(host, token_id, status, &body));
    }
}

impl RootContext for PluginRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let env = |name: &str| std::env::var(name).ok();
        let config = match PluginConfig::parse(&bytes, &env) {
            Ok(config) => Rc::new(config),
            Err(e) => {
                self.host().log(Level::Error, &e.to_string());
                return false;
            }
        };
        if self.metrics.is_none() {
            self.metrics = Some(Rc::new(Metrics::define()));
        }
        // Every root registers the VM's queue: the newest one receives its messages.
        self.queue = EnvoyHost::register_worker_queue();
        if self.queue.is_none() {
            self.host()
                .log(Level::Error, "cannot register the worker queue");
            return false;
        }
        self.host().log(
            Level::Info,
            &format!(
                "configured {} destination(s), {} signing key(s)",
                config.destinations.len(),
                config.keys.len()
            ),
        );
        let host = self.host();
        crate::flow::create_locks(&host);
        host.check_certificates(&config);
        self.certificates_checked_ms = host.now_ns() / 1_000_000;
        self.set_tick_period(TICK_PERIOD);
        self.config = Some(config);
        true
    }

    fn on_tick(&mut self) {
        let host = self.host();
        let now_ms = host.now_ns() / 1_000_000;
        let second = now_ms.saturating_sub(self.second_ticked_ms) >= TICK_PERIOD.as_millis() as u64;
        if second {
            self.second_ticked_ms = now_ms;
            host.report_wasm_memory();
            if now_ms.saturating_sub(self.certificates_checked_ms) >= CERTIFICATE_CHECK_MS {
                if let Some(config) = &self.config {
                    host.check_certificates(config);
                }
                self.certificates_checked_ms = now_ms;
            }
        }
        self.with_worker(|worker, host| {
            worker.on_slice(host);
            if second && worker.waits_elsewhere() {
                worker.on_tick(host);
            }
        });
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        let mut wake = false;
        let mut notices = Vec::new();
        while let Ok(Some(message)) = hostcalls::dequeue_shared_queue(queue_id) {
            match Notice::decode(&message) {
                Some(notice) => notices.push(notice),
                None => wake = true,
            }
        }
        self.with_worker(|worker, host| {
            for notice in &notices {
                worker.on_notice(host, notice);
            }
            if wake {
                worker.on_wake(host);
            }
        });
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = Rc::clone(self.config.as_ref()?);
        Some(Box::new(PluginRequest {
            context_id,
            config,
            worker: WORKER.with(Rc::clone),
            host: self.host(),
            waiting: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The user as `jwt_authn` left them in the request's dynamic metadata.
struct JwtMetadata<'a> {
    config: &'a PluginConfig,
}

impl Identity for JwtMetadata<'_> {
    /// One claim, read as a deeper property: a fraction of the cost of [`Self::claims`].
    fn string_claim(&self, path: &[String]) -> Option<String> {
        let config = self.config;
        let mut property = vec![
            "metadata",
            "filter_metadata",
            config.jwt_filter_name.as_str(),
            config.jwt_payload_key.as_str(),
        ];
        property.extend(path.iter().map(String::as_str));
        if property.iter().any(|part| part.contains('\0')) {
            return None; // the host splits property paths at NUL
        }
        let bytes = hostcalls::get_property(property).ok().flatten()?;
        string_claim_from_property(bytes)
    }

    fn claims(&self) -> Option<serde_json::Value> {
        let metadata = hostcalls::get_property(vec!["metadata"]).ok().flatten()?;
        claims_from_metadata(
            &metadata,
            &self.config.jwt_filter_name,
            &self.config.jwt_payload_key,
        )
    }
}

/// One HTTP request.
struct PluginRequest {
    context_id: u32,
    config: Rc<PluginConfig>,
    worker: Rc<RefCell<Worker>>,
    host: EnvoyHost,
    waiting: bool,
}

impl PluginRequest {
    /// The destination index for this route; `Err` answers the request, `Ok(None)`
    /// means the plugin does not apply.
    fn destination(&self, config: &PluginConfig) -> Result<Option<usize>, ()> {
        match hostcalls::get_property(ROUTE_METADATA_PATH.to_vec()) {
            Ok(Some(bytes)) => {
                let name = String::from_utf8_lossy(&bytes);
                match config.destinations.iter().position(|d| d.name == name) {
                    Some(index) => Ok(Some(index)),
                    None => {
                        self.host.log(
                            Level::Error,
                            &format!("route names unknown destination {name:?}"),
                        );
                        Err(())
                    }
                }
            }
            _ => Ok(config.default_destination),
        }
    }

    /// Answers a request for the gateway's IdP metadata or certificates; false if the
    /// path is not one of those.
    fn answer_trust_download(&self, config: &PluginConfig, prefix: &str) -> bool {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        if !path.starts_with(prefix) {
            return false; // the common case: one header read, nothing else
        }
        let scheme = self
            .get_http_request_header(":scheme")
            .unwrap_or_else(|| "http".into());
        let authority = self
            .get_http_request_header(":authority")
            .unwrap_or_default();
        let Some(download) = answer(config, &path, &format!("{scheme}://{authority}")) else {
            return false;
        };
        let method = self.get_http_request_header(":method").unwrap_or_default();
        if method != "GET" && method != "HEAD" {
            self.send_http_response(405, vec![("allow", "GET, HEAD")], None);
            return true;
        }
        self.send_http_response(
            download.status,
            vec![
                ("content-type", download.content_type),
                ("cache-control", "no-cache"),
            ],
            Some(download.body.as_bytes()),
        );
        true
    }

    /// `URL.headers.*` and `URL.queries.*` of the destination, on the forwarded request.
    fn add_destination_extras(&self, config: &PluginConfig, destination: usize) {
        let Some(dest) = config.destinations.get(destination) else {
            return;
        };
        for (name, value) in &dest.url_headers {
            self.set_http_request_header(name, Some(value));
        }
        if !dest.url_queries.is_empty() {
            let path = self
                .get_http_request_header(":path")
                .unwrap_or_else(|| "/".into());
            self.set_http_request_header(":path", Some(&append_query(&path, &dest.url_queries)));
        }
    }
}

impl Context for PluginRequest {
    fn on_done(&mut self) -> bool {
        // try_borrow: should a host ever end a stream from inside a worker callback,
        // the worker skips the gone request itself (resume/fail report it missing).
        if self.waiting {
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
        if let Some(prefix) = &config.trust_metadata_path {
            if self.answer_trust_download(&config, prefix) {
                return Action::Pause;
            }
        }
        let destination = match self.destination(&config) {
            Ok(Some(index)) => index,
            Ok(None) => return Action::Continue,
            Err(()) => {
                self.host.send_reply(&crate::error::Failure::Internal {
                    reason: "the route names an unknown destination",
                });
                return Action::Pause;
            }
        };
        let identity = JwtMetadata { config: &config };
        let Ok(mut worker) = self.worker.try_borrow_mut() else {
            self.host.send_reply(&crate::error::Failure::Internal {
                reason: "worker busy",
            });
            return Action::Pause;
        };
        let decision =
            worker.on_request(&self.host, &config, self.context_id, destination, &identity);
        drop(worker);
        match decision {
            // The caller's credentials never reach the backend: replaced here, removed
            // while waiting (the worker sets the token on resume), never forwarded on failure.
            Decision::Forward(authorization) => {
                self.add_destination_extras(&config, destination);
                self.set_http_request_header("authorization", Some(&authorization));
                Action::Continue
            }
            Decision::Wait => {
                self.set_http_request_header("authorization", None);
                self.add_destination_extras(&config, destination);
                self.waiting = true;
                Action::Pause
            }
            Decision::Fail(failure) => {
                self.host.send_reply(&failure);
                Action::Pause
            }
        }
    }
}
