//! The benchmark's reference point: a minimal proxy-wasm filter that reads one request
//! header and one shared-data key and sets a header. `make bench` compares the
//! plugin's cache-hit cost with this one's (built for wasm32-wasip1 only).
//!
//! With `MINIMAL_READ_IDENTITY` in its VM's environment it also reads the two properties
//! the plugin reads on every cache hit: the user's claim in the request's dynamic
//! metadata (where `jwt_authn` puts the verified JWT payload) and the route's metadata
//! (which names the destination). That variant is the floor of any filter that takes the
//! user from a verified JWT and its target from the route.

#[cfg(target_os = "wasi")]
mod filter {
    use proxy_wasm::traits::{Context, HttpContext};
    use proxy_wasm::types::Action;

    proxy_wasm::main! {{
        READ_IDENTITY.set(std::env::var_os("MINIMAL_READ_IDENTITY").is_some());
        proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> {
            Box::new(Minimal { read_identity: READ_IDENTITY.get() })
        });
    }}

    thread_local! {
        /// Read once, when the VM starts.
        static READ_IDENTITY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// The same path as `principal_propagation::filter::ROUTE_METADATA_PATH`.
    const ROUTE_DESTINATION: [&str; 5] = [
        "xds",
        "route_metadata",
        "filter_metadata",
        "principal_propagation",
        "destination",
    ];

    /// The claim the plugin reads on a hit with its default settings (`user_name`).
    const USER_CLAIM: [&str; 5] = [
        "metadata",
        "filter_metadata",
        "envoy.filters.http.jwt_authn",
        "payload",
        "user_name",
    ];

    struct Minimal {
        read_identity: bool,
    }

    impl Context for Minimal {}

    impl HttpContext for Minimal {
        fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
            let mut user = self.get_http_request_header("x-user").unwrap_or_default();
            if self.read_identity {
                let claim = self.get_property(USER_CLAIM.to_vec()).unwrap_or_default();
                let route = self.get_property(ROUTE_DESTINATION.to_vec());
                // Used, so that neither read is optimized away.
                user.push_str(&(claim.len() + route.map_or(0, |r| r.len())).to_string());
            }
            let (cached, _) = self.get_shared_data("bench/token");
            let value = match cached {
                Some(token) => String::from_utf8_lossy(&token).into_owned(),
                None => user,
            };
            self.set_http_request_header("x-bench", Some(&value));
            Action::Continue
        }
    }
}
