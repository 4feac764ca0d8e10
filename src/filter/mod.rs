//! The thin proxy-wasm layer: Envoy's root and HTTP contexts around [`crate::flow`].
//!
//! The root context (one per worker) owns the configuration, the per-worker
//! [`Worker`] and every token callout; HTTP contexts read the route's destination and
//! the verified JWT payload, ask the worker, and forward, pause or answer.

mod envoy_host;

use crate::config::PluginConfig;
use crate::flow::{Decision, Host, Level, Worker};
use crate::http_url::append_query;
use crate::identity::payload::claims_from_metadata;
use crate::trust::download::answer;
use envoy_host::{EnvoyHost, Metrics};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::cell::RefCell;
use std::rc::Rc;

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
const CERTIFICATE_CHECK_PERIOD: std::time::Duration = std::time::Duration::from_secs(3600);

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(PluginRoot { context_id, worker: None, queue: None, metrics: None })
    });
}}

/// Per-worker root context.
struct PluginRoot {
    context_id: u32,
    worker: Option<Rc<RefCell<Worker>>>,
    /// This worker's own wake-up queue (a shared queue is delivered to its last registrant).
    queue: Option<u32>,
    metrics: Option<Rc<Metrics>>,
}

impl PluginRoot {
    fn host(&self) -> EnvoyHost {
        EnvoyHost::new(self.queue, self.metrics.clone())
    }
}

impl Context for PluginRoot {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let Some(worker) = &self.worker else { return };
        let status = self
            .get_http_call_response_header(":status")
            .and_then(|s| s.parse::<u16>().ok());
        // One byte over the limit is enough for the parser to refuse an oversized answer.
        let limit = crate::oauth::token_response::MAX_RESPONSE_BYTES + 1;
        let body = self
            .get_http_call_response_body(0, body_size.min(limit))
            .unwrap_or_default();
        worker
            .borrow_mut()
            .on_token_response(&self.host(), token_id, status, &body);
        let _ = hostcalls::set_effective_context(self.context_id);
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
        if self.queue.is_none() {
            self.queue = EnvoyHost::register_wake_queue();
            if self.queue.is_none() {
                self.host()
                    .log(Level::Error, "cannot register the wake-up queue");
                return false;
            }
        }
        self.host().log(
            Level::Info,
            &format!(
                "configured {} destination(s), {} signing key(s)",
                config.destinations.len(),
                config.keys.len()
            ),
        );
        self.host().check_certificates(&config);
        self.set_tick_period(CERTIFICATE_CHECK_PERIOD);
        match &self.worker {
            Some(worker) => worker.borrow_mut().reconfigure(config),
            None => self.worker = Some(Rc::new(RefCell::new(Worker::new(config)))),
        }
        true
    }

    fn on_tick(&mut self) {
        if let Some(worker) = &self.worker {
            let config = Rc::clone(worker.borrow().config());
            self.host().check_certificates(&config);
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {}
        if let Some(worker) = &self.worker {
            worker.borrow_mut().on_wake(&self.host());
            let _ = hostcalls::set_effective_context(self.context_id);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let worker = self.worker.clone()?;
        Some(Box::new(PluginRequest {
            context_id,
            worker,
            host: self.host(),
            waiting: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One HTTP request.
struct PluginRequest {
    context_id: u32,
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

    /// The verified JWT payload, from the request's dynamic metadata.
    fn claims(&self, config: &PluginConfig) -> Option<serde_json::Value> {
        let metadata = hostcalls::get_property(vec!["metadata"]).ok().flatten()?;
        claims_from_metadata(&metadata, &config.jwt_filter_name, &config.jwt_payload_key)
    }

    /// Answers a request for the gateway's IdP metadata or certificates; false if the
    /// path is not one of those.
    fn answer_trust_download(&self, config: &PluginConfig) -> bool {
        let path = self.get_http_request_header(":path").unwrap_or_default();
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
        let config = Rc::clone(self.worker.borrow().config());
        if config.trust_metadata_path.is_some() && self.answer_trust_download(&config) {
            return Action::Pause;
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
        // The caller's credentials never reach the backend.
        self.set_http_request_header("authorization", None);
        let claims = self.claims(&config);
        let decision = self.worker.borrow_mut().on_request(
            &self.host,
            self.context_id,
            destination,
            claims.as_ref(),
        );
        match decision {
            Decision::Forward(authorization) => {
                self.add_destination_extras(&config, destination);
                self.set_http_request_header("authorization", Some(&authorization));
                Action::Continue
            }
            Decision::Wait => {
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
