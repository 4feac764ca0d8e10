//! The core's host traits ([`crate::host`]) over Envoy's proxy-wasm ABI: translation only.

use crate::config::destination::Carrier;
use crate::config::PluginConfig;
use crate::destination_api::{Answer, TokenPart};
use crate::error::Failure;
use crate::host::{Callouts, Clock, Level, Queues, Random, Requests, SharedData, Telemetry};
use crate::metrics::{Kind, Metric};
use crate::oauth::token_request::TokenRequest;
use crate::trust::expiry;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MapType, MetricType};
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

thread_local! {
    /// The `Authorization` each resumed request was given, by request id, until the request
    /// is done: its response may show the backend refused that token, and Envoy does not
    /// let a filter read request headers once the response has begun.
    static RESUMED_WITH: RefCell<HashMap<u32, String>> = RefCell::new(HashMap::new());
}

#[link(wasm_import_module = "env")]
extern "C" {
    /// The host call behind the SDK's `get_http_request_headers`, declared here to get the
    /// serialized map as it is (see [`request_header_pairs`]).
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
}

/// proxy-wasm's number of the request header map.
const REQUEST_HEADERS: u32 = 0;

/// The current request's headers in one call, serialized as the host sends them (read
/// them with [`crate::pairs::parse`]); `None` if the host has none to give. The SDK's own
/// readers panic, killing the VM, on a header value that is not UTF-8 (a client can send
/// one) and on any status but "ok".
pub fn request_header_pairs() -> Option<Vec<u8>> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: on success the host wrote a buffer it allocated through the module's
    // `proxy_on_memory_allocate` (the SDK's: a `Vec<u8>` of exactly `size` bytes, left
    // unfreed), which this takes over, as the SDK's own `get_map` does.
    unsafe {
        if proxy_get_header_map_pairs(REQUEST_HEADERS, &mut data, &mut size) != 0 {
            return None;
        }
        if data.is_null() {
            return Some(Vec::new());
        }
        Some(Vec::from_raw_parts(data, size, size))
    }
}

/// The credential header value the request `request_id` was resumed with (taken: asked
/// once).
pub fn take_resumed_credential(request_id: u32) -> Option<String> {
    RESUMED_WITH.with(|map| map.borrow_mut().remove(&request_id))
}

/// A find-destination call waiting for its exchange: answered, not resumed, when the
/// exchange settles.
struct ApiWaiter {
    answer: Answer,
    carrier: Carrier,
}

thread_local! {
    static API_WAITERS: RefCell<HashMap<u32, ApiWaiter>> = RefCell::new(HashMap::new());
}

/// Request `request_id` is a find-destination call that waits: [`Requests::resume`] and
/// [`Requests::fail`] answer it with `answer`.
pub fn await_api_answer(request_id: u32, answer: Answer, carrier: Carrier) {
    API_WAITERS.with(|map| {
        map.borrow_mut()
            .insert(request_id, ApiWaiter { answer, carrier })
    });
}

pub fn forget_api_answer(request_id: u32) {
    API_WAITERS.with(|map| map.borrow_mut().remove(&request_id));
}

fn take_api_waiter(request_id: u32) -> Option<ApiWaiter> {
    API_WAITERS.with(|map| map.borrow_mut().remove(&request_id))
}

/// Sends the current request's find-destination answer (never cached: it may hold a
/// token).
pub fn send_api_answer(answer: &Answer, part: &TokenPart) {
    let body = answer.body(part);
    let headers = vec![
        ("content-type", "application/json"),
        ("cache-control", "no-store"),
    ];
    let _ = hostcalls::send_http_response(200, headers, Some(body.as_bytes()));
}

/// Shared-data key remembering the last day expiry notices were logged.
const EXPIRY_MARKER_KEY: &str = "principal-propagation/expiry-notices";

#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    /// WASI `random_get`; Envoy provides it to wasip1 modules.
    fn random_get(buf: *mut u8, len: usize) -> u16;
}

thread_local! {
    /// Metric ids of this VM, defined once from [`Metric::ALL`].
    static METRICS: Vec<Option<u32>> = Metric::ALL
        .iter()
        .map(|metric| {
            let kind = match metric.kind() {
                Kind::Counter => MetricType::Counter,
                Kind::Histogram => MetricType::Histogram,
                Kind::Gauge => MetricType::Gauge,
            };
            hostcalls::define_metric(kind, metric.name()).ok()
        })
        .collect();
}

/// Stats names allow letters, digits, `_` and `-`; anything else becomes `_`.
fn metric_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The host as seen from one worker VM.
pub struct EnvoyHost;

impl EnvoyHost {
    /// Registers the VM's queue under `name` for the current root context (the last root
    /// to register a name receives its messages).
    pub fn register_queue(name: &str) -> Option<u32> {
        hostcalls::register_shared_queue(name).ok()
    }

    /// Every message waiting in `queue`.
    pub fn drain_queue(queue: u32) -> Vec<Vec<u8>> {
        let mut messages = Vec::new();
        while let Ok(Some(message)) = hostcalls::dequeue_shared_queue(queue) {
            messages.push(message);
        }
        messages
    }

    /// Sets the gauge `wasm_memory_bytes` to this VM's linear memory (Wasm memory only
    /// grows; the plugin's caches live in shared data, so this stays flat once warm).
    pub fn report_wasm_memory(&self) {
        const PAGE_BYTES: u64 = 64 * 1024;
        let bytes = core::arch::wasm32::memory_size::<0>() as u64 * PAGE_BYTES;
        self.record(Metric::WasmMemoryBytes, bytes);
    }

    /// Logs due expiry notices once a day across all workers, and sets the
    /// `certificate_days_left` gauges.
    pub fn check_certificates(&self, config: &PluginConfig) {
        let now_s = self.now_ns() / 1_000_000_000;
        for status in expiry::statuses(config, now_s) {
            let name = format!(
                "principal_propagation.certificate_days_left.{}.{}",
                metric_safe(&status.key),
                status.slot
            );
            if let Ok(id) = hostcalls::define_metric(MetricType::Gauge, &name) {
                let _ = hostcalls::record_metric(id, status.days_left.max(0) as u64);
            }
        }
        let notices = expiry::notices(config, now_s);
        if notices.is_empty() || !self.first_today(config, now_s) {
            return;
        }
        for notice in notices {
            let level = match notice {
                expiry::Notice::Expired { .. } => Level::Error,
                expiry::Notice::ExpiresSoon { .. } => Level::Warn,
            };
            self.log(level, &notice.message());
        }
    }

    /// True for the first caller today (per key set): workers share the marker through
    /// shared data, and compare-and-swap lets only one of them win.
    fn first_today(&self, config: &PluginConfig, now_s: u64) -> bool {
        let mut hash = Sha256::new();
        for pair in config.keys.values() {
            hash.update(pair.active.certificate_base64());
            if let Some(passive) = &pair.passive {
                hash.update(passive.certificate_base64());
            }
        }
        let marker = format!("{}:{:x}", now_s / 86_400, hash.finalize());
        if matches!(hostcalls::get_shared_data(EXPIRY_MARKER_KEY), Ok((None, _))) {
            let _ = hostcalls::set_shared_data(EXPIRY_MARKER_KEY, Some(b""), None);
        }
        match hostcalls::get_shared_data(EXPIRY_MARKER_KEY) {
            Ok((Some(current), _)) if current == marker.as_bytes() => false,
            Ok((_, cas)) => {
                hostcalls::set_shared_data(EXPIRY_MARKER_KEY, Some(marker.as_bytes()), cas).is_ok()
            }
            Err(_) => true,
        }
    }

    /// Sends the local reply for `failure` on the current context.
    pub fn send_reply(&self, failure: &Failure) {
        let reply = failure.reply();
        let headers: Vec<(&str, &str)> = reply
            .headers
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        let _ = hostcalls::send_http_response(reply.status, headers, Some(reply.body.as_bytes()));
    }
}

impl Clock for EnvoyHost {
    fn now_ns(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64)
    }
}

impl Random for EnvoyHost {
    fn fill_random(&self, buf: &mut [u8]) -> bool {
        // SAFETY: the host writes exactly `buf.len()` bytes into `buf`.
        unsafe { random_get(buf.as_mut_ptr(), buf.len()) == 0 }
    }
}

impl SharedData for EnvoyHost {
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(value), cas)) => Some((value, cas.unwrap_or(0))),
            _ => None,
        }
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        hostcalls::set_shared_data(key, Some(value), cas).is_ok()
    }
}

impl Queues for EnvoyHost {
    fn enqueue(&self, queue: u32, message: &[u8]) -> bool {
        hostcalls::enqueue_shared_queue(queue, Some(message)).is_ok()
    }
}

impl Callouts for EnvoyHost {
    fn dispatch(&self, owner: u32, request: &TokenRequest) -> Option<u32> {
        // The callout belongs to the effective context's root: make it `owner` (the root
        // whose callback this is; resuming requests may have switched the context).
        hostcalls::set_effective_context(owner).ok()?;
        let headers: Vec<(&str, &str)> = request
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        hostcalls::dispatch_http_call(
            &request.cluster,
            headers,
            Some(&request.body),
            Vec::new(),
            Duration::from_millis(request.timeout_ms),
        )
        .ok()
    }
}

impl Requests for EnvoyHost {
    fn resume(&self, request_id: u32, header: &str, value: &str, usable_until_ms: u64) -> bool {
        if hostcalls::set_effective_context(request_id).is_err() {
            return false;
        }
        if let Some(waiter) = take_api_waiter(request_id) {
            let part = TokenPart::of(&waiter.carrier, value, usable_until_ms, self.now_ms());
            send_api_answer(&waiter.answer, &part);
            return true;
        }
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, header, Some(value));
        if hostcalls::resume_http_request().is_err() {
            return false;
        }
        RESUMED_WITH.with(|map| map.borrow_mut().insert(request_id, value.to_string()));
        true
    }

    fn fail(&self, request_id: u32, failure: &Failure) -> bool {
        if hostcalls::set_effective_context(request_id).is_err() {
            return false;
        }
        if let Some(waiter) = take_api_waiter(request_id) {
            send_api_answer(&waiter.answer, &TokenPart::Error(failure.description()));
            return true;
        }
        self.send_reply(failure);
        true
    }
}

impl Telemetry for EnvoyHost {
    fn log(&self, level: Level, message: &str) {
        let level = match level {
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        let _ = hostcalls::log(level, &format!("principal-propagation: {message}"));
    }

    fn record(&self, metric: Metric, amount: u64) {
        let Some(id) = METRICS.with(|ids| ids.get(metric.index()).copied().flatten()) else {
            return;
        };
        let _ = match metric.kind() {
            Kind::Counter => hostcalls::increment_metric(id, amount as i64),
            Kind::Histogram | Kind::Gauge => hostcalls::record_metric(id, amount),
        };
    }
}
