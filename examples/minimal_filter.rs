//! The benchmark's reference point: a minimal proxy-wasm filter that reads one request
//! header and one shared-data key (holding a token the size of the plugin's cached
//! ones) and sets a header. `make bench` compares the plugin's cache-hit cost with this
//! one's (built for wasm32-wasip1 only).
//!
//! With `MINIMAL_READ_IDENTITY` in its VM's environment it also reads the two properties
//! the plugin reads on every cache hit: the verified JWT payload in the request's dynamic
//! metadata (where `jwt_authn` puts it; the plugin takes the user id, issuer and origin
//! from it) and the route's metadata (which names the destination). That variant is the
//! floor of any filter that takes the user from a verified JWT and its target from the
//! route.
//!
//! With `MINIMAL_PROBE=<host call>` it also makes that one host call [`PROBE_REPEAT`]
//! times per request, so that the bench can tell what a single call costs in Envoy.

#[cfg(target_os = "wasi")]
mod filter {
    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext};
    use proxy_wasm::types::{Action, MetricType};
    use std::cell::Cell;

    proxy_wasm::main! {{
        READ_IDENTITY.set(std::env::var_os("MINIMAL_READ_IDENTITY").is_some());
        PROBE.set(std::env::var("MINIMAL_PROBE").ok().and_then(|call| Probe::parse(&call)));
        proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> {
            Box::new(Minimal { read_identity: READ_IDENTITY.get(), probe: PROBE.get() })
        });
    }}

    thread_local! {
        /// Read once, when the VM starts.
        static READ_IDENTITY: Cell<bool> = const { Cell::new(false) };
        static PROBE: Cell<Option<Probe>> = const { Cell::new(None) };
        /// The probe's counter (`increment_metric`), defined on the first request: the
        /// host allows no calls while the VM starts.
        static PROBE_METRIC: Cell<Option<u32>> = const { Cell::new(None) };
    }

    /// How often a probe repeats its host call per request.
    const PROBE_REPEAT: usize = 50;

    /// The same path as `principal_propagation::filter::ROUTE_METADATA_PATH`.
    const ROUTE_DESTINATION: [&str; 5] = [
        "xds",
        "route_metadata",
        "filter_metadata",
        "principal_propagation",
        "destination",
    ];

    /// The verified payload, as the plugin reads it on a hit with its default settings.
    const PAYLOAD: [&str; 4] = [
        "metadata",
        "filter_metadata",
        "envoy.filters.http.jwt_authn",
        "payload",
    ];

    const TOKEN_KEY: &str = "bench/token";

    /// The host calls a probe can repeat (the ones a plugin's cache hit makes).
    #[derive(Clone, Copy)]
    enum Probe {
        /// The whole dynamic metadata (what an exchange reads).
        Metadata,
        /// The verified payload (what a hit reads).
        Payload,
        Route,
        Header,
        /// Every request header at once (what a hit reads to remove inbound credentials).
        Headers,
        Clock,
        Metric,
        SharedData,
    }

    impl Probe {
        fn parse(call: &str) -> Option<Probe> {
            Some(match call {
                "metadata" => Probe::Metadata,
                "payload" => Probe::Payload,
                "route" => Probe::Route,
                "header" => Probe::Header,
                "headers" => Probe::Headers,
                "clock" => Probe::Clock,
                "metric" => Probe::Metric,
                "shared_data" => Probe::SharedData,
                _ => return None,
            })
        }

        /// Makes the call once; returns a number that depends on the answer, so that
        /// the call is not optimized away.
        fn call(self, filter: &Minimal) -> usize {
            let property = |path: &[&str]| {
                filter
                    .get_property(path.to_vec())
                    .map_or(0, |value| value.len())
            };
            match self {
                Probe::Metadata => property(&["metadata"]),
                Probe::Payload => property(&PAYLOAD),
                Probe::Route => property(&ROUTE_DESTINATION),
                Probe::Header => filter
                    .get_http_request_header(":path")
                    .map_or(0, |v| v.len()),
                Probe::Headers => filter.get_http_request_headers().len(),
                Probe::Clock => hostcalls::get_current_time().map_or(0, |t| {
                    t.duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.subsec_nanos() as usize & 1)
                }),
                Probe::Metric => {
                    let id = PROBE_METRIC.get().or_else(|| {
                        let id = hostcalls::define_metric(MetricType::Counter, "minimal_probe");
                        PROBE_METRIC.set(id.ok());
                        id.ok()
                    });
                    id.map_or(0, |id| hostcalls::increment_metric(id, 1).is_ok() as usize)
                }
                Probe::SharedData => filter.get_shared_data(TOKEN_KEY).0.map_or(0, |v| v.len()),
            }
        }
    }

    struct Minimal {
        read_identity: bool,
        probe: Option<Probe>,
    }

    impl Context for Minimal {}

    impl HttpContext for Minimal {
        fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
            let mut user = self.get_http_request_header("x-user").unwrap_or_default();
            if self.read_identity {
                let payload = self.get_property(PAYLOAD.to_vec()).unwrap_or_default();
                let route = self.get_property(ROUTE_DESTINATION.to_vec());
                // Used, so that neither read is optimized away.
                user.push_str(&(payload.len() + route.map_or(0, |r| r.len())).to_string());
            }
            if let Some(probe) = self.probe {
                let sum: usize = (0..PROBE_REPEAT).map(|_| probe.call(self)).sum();
                user.push_str(&sum.to_string());
            }
            let value = match self.get_shared_data(TOKEN_KEY).0 {
                Some(token) => String::from_utf8_lossy(&token).into_owned(),
                None => {
                    // The first request stores the token: an 800-byte value, as the
                    // plugin's cache entries hold.
                    let _ = self.set_shared_data(TOKEN_KEY, Some(&[b'b'; 800]), None);
                    user
                }
            };
            self.set_http_request_header("x-bench", Some(&value));
            Action::Continue
        }
    }
}
