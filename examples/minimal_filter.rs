//! The benchmark's reference point: a minimal proxy-wasm filter that reads one request
//! header and one shared-data key and sets a header. `make bench` compares the
//! plugin's cache-hit cost with this one's (built for wasm32-wasip1 only).

#[cfg(target_os = "wasi")]
mod filter {
    use proxy_wasm::traits::{Context, HttpContext};
    use proxy_wasm::types::Action;

    proxy_wasm::main! {{
        proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Minimal) });
    }}

    struct Minimal;

    impl Context for Minimal {}

    impl HttpContext for Minimal {
        fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
            let user = self.get_http_request_header("x-user").unwrap_or_default();
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
