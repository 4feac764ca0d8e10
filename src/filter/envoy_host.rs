//! [`Host`] over Envoy's proxy-wasm ABI.

use crate::config::PluginConfig;
use crate::error::Failure;
use crate::flow::{Host, Level, Metric, Notice};
use crate::oauth::token_request::TokenRequest;
use crate::trust::expiry;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MetricType};
use sha2::{Digest, Sha256};
use std::rc::Rc;

/// Shared-data key listing every worker's queue (u32 tokens, big-endian), newest last.
const REGISTRY_KEY: &str = "principal-propagation/workers";
/// Registry length kept: VMs replaced by a code update leave stale entries behind.
const REGISTRY_MAX: usize = 64;

thread_local! {
    static QUEUE_NAME: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Adds `queue` to the registry (compare-and-swap, a few tries).
fn announce(queue: u32) {
    for _ in 0..8 {
        let (current, cas) = match hostcalls::get_shared_data(REGISTRY_KEY) {
            Ok((value, cas)) => (value.unwrap_or_default(), cas),
            Err(_) => return,
        };
        let mut queues = decode_queues(&current);
        if queues.contains(&queue) {
            return;
        }
        queues.push(queue);
        let skip = queues.len().saturating_sub(REGISTRY_MAX);
        let encoded: Vec<u8> = queues[skip..]
            .iter()
            .flat_map(|q| q.to_be_bytes())
            .collect();
        if hostcalls::set_shared_data(REGISTRY_KEY, Some(&encoded), cas).is_ok() {
            return;
        }
    }
}

fn registered_queues() -> Vec<u32> {
    match hostcalls::get_shared_data(REGISTRY_KEY) {
        Ok((Some(value), _)) => decode_queues(&value),
        _ => Vec::new(),
    }
}

fn decode_queues(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Shared-data key remembering the last day expiry notices were logged.
const EXPIRY_MARKER_KEY: &str = "principal-propagation/expiry-notices";

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
use std::time::{Duration, UNIX_EPOCH};

#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    /// WASI `random_get`; Envoy provides it to wasip1 modules.
    fn random_get(buf: *mut u8, len: usize) -> u16;
}

/// Metric ids, defined once per worker; Envoy shows them as `wasmcustom.<name>`.
pub struct Metrics {
    cache_hit: Option<u32>,
    cache_miss: Option<u32>,
    exchange_ok: Option<u32>,
    exchange_rejected: Option<u32>,
    exchange_failed: Option<u32>,
    signing_us: Option<u32>,
    signing_ec_us: Option<u32>,
    wake_us: Option<u32>,
    joined_remote: Option<u32>,
    refresh: Option<u32>,
}

impl Metrics {
    pub fn define() -> Self {
        let counter = |name| hostcalls::define_metric(MetricType::Counter, name).ok();
        let histogram = |name| hostcalls::define_metric(MetricType::Histogram, name).ok();
        Metrics {
            cache_hit: counter("principal_propagation.cache_hit"),
            cache_miss: counter("principal_propagation.cache_miss"),
            exchange_ok: counter("principal_propagation.token_exchange.ok"),
            exchange_rejected: counter("principal_propagation.token_exchange.rejected"),
            exchange_failed: counter("principal_propagation.token_exchange.failed"),
            joined_remote: counter("principal_propagation.joined_other_worker"),
            refresh: counter("principal_propagation.refresh_ahead"),
            signing_us: histogram("principal_propagation.signing_us"),
            signing_ec_us: histogram("principal_propagation.signing_ec_us"),
            wake_us: histogram("principal_propagation.wake_us"),
        }
    }
}

/// The host as seen from one worker.
pub struct EnvoyHost {
    queue: Option<u32>,
    metrics: Option<Rc<Metrics>>,
}

impl EnvoyHost {
    pub fn new(queue: Option<u32>, metrics: Option<Rc<Metrics>>) -> Self {
        EnvoyHost { queue, metrics }
    }

    /// Registers this VM's queue (a random name chosen once per VM, so each worker
    /// has its own) and announces it in the shared registry of worker queues.
    pub fn register_worker_queue() -> Option<u32> {
        let name = QUEUE_NAME.with(|name| {
            name.borrow_mut()
                .get_or_insert_with(|| {
                    let mut random = [0u8; 8];
                    let suffix: String = if fill(&mut random) {
                        random.iter().map(|b| format!("{b:02x}")).collect()
                    } else {
                        String::new()
                    };
                    format!("principal-propagation/worker/{suffix}")
                })
                .clone()
        });
        let queue = hostcalls::register_shared_queue(&name).ok()?;
        announce(queue);
        Some(queue)
    }

    /// Sets the gauge `wasm_memory_bytes` to this VM's linear memory (Wasm memory only
    /// grows; the plugin's caches live in shared data, so this stays flat once warm).
    /// Every worker's VM reports it in turn: they run the same code on the same traffic.
    pub fn report_wasm_memory(&self) {
        const PAGE_BYTES: u64 = 64 * 1024;
        let bytes = core::arch::wasm32::memory_size::<0>() as u64 * PAGE_BYTES;
        if let Ok(id) =
            hostcalls::define_metric(MetricType::Gauge, "principal_propagation.wasm_memory_bytes")
        {
            let _ = hostcalls::record_metric(id, bytes);
        }
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

fn fill(buf: &mut [u8]) -> bool {
    // SAFETY: the host writes exactly `buf.len()` bytes into `buf`.
    unsafe { random_get(buf.as_mut_ptr(), buf.len()) == 0 }
}

impl Host for EnvoyHost {
    fn now_ns(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64)
    }

    fn fill_random(&self, buf: &mut [u8]) -> bool {
        fill(buf)
    }

    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(value), cas)) => Some((value, cas.unwrap_or(0))),
            _ => None,
        }
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        hostcalls::set_shared_data(key, Some(value), cas).is_ok()
    }

    fn dispatch(&self, request: &TokenRequest) -> Option<u32> {
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

    fn wake(&self) -> bool {
        self.queue
            .is_some_and(|queue| hostcalls::enqueue_shared_queue(queue, Some(b"w")).is_ok())
    }

    fn notify_all(&self, notice: &Notice) {
        let message = notice.encode();
        for queue in registered_queues() {
            let _ = hostcalls::enqueue_shared_queue(queue, Some(&message));
        }
    }

    fn resume(&self, request_id: u32, authorization: &str) -> bool {
        if hostcalls::set_effective_context(request_id).is_err() {
            return false;
        }
        let _ = hostcalls::set_map_value(
            proxy_wasm::types::MapType::HttpRequestHeaders,
            "authorization",
            Some(authorization),
        );
        hostcalls::resume_http_request().is_ok()
    }

    fn fail(&self, request_id: u32, failure: &Failure) -> bool {
        if hostcalls::set_effective_context(request_id).is_err() {
            return false;
        }
        self.send_reply(failure);
        true
    }

    fn log(&self, level: Level, message: &str) {
        let level = match level {
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        let _ = hostcalls::log(level, &format!("principal-propagation: {message}"));
    }

    fn count(&self, metric: Metric, amount: u64) {
        let Some(m) = &self.metrics else { return };
        let id = match metric {
            Metric::CacheHit => m.cache_hit,
            Metric::CacheMiss => m.cache_miss,
            Metric::ExchangeOk => m.exchange_ok,
            Metric::ExchangeRejected => m.exchange_rejected,
            Metric::ExchangeFailed => m.exchange_failed,
            Metric::JoinedRemote => m.joined_remote,
            Metric::Refresh => m.refresh,
            Metric::SigningMicros | Metric::SigningEcMicros | Metric::WakeMicros => {
                let histogram = match metric {
                    Metric::SigningMicros => m.signing_us,
                    Metric::SigningEcMicros => m.signing_ec_us,
                    _ => m.wake_us,
                };
                if let Some(id) = histogram {
                    let _ = hostcalls::record_metric(id, amount);
                }
                return;
            }
        };
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, amount as i64);
        }
    }
}
