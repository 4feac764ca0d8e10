// A cache hit's whole Wasm side in Node's V8 (the engine Envoy embeds), without Envoy:
// a small in-memory proxy-wasm host runs each request's callbacks (context create,
// request headers, response headers, done, log, delete) against the plugin and against
// the minimal filter (examples/minimal_filter.rs), alternately, and prints the median
// µs per request of each. The host's own work here is a few JavaScript lookups, far
// cheaper than Envoy's, so the difference is what the module itself does per request:
// the SDK's dispatch, the Rust code and the crossings into and out of Wasm. With
// COLD_BYTES=<n> in the environment it writes over n bytes between two requests, so that
// each request starts with the module's code and data out of the CPU's private caches
// (a tenth of the requests per round then).
//   [COLD_BYTES=n] node bench/hit_host.mjs [rounds] [requests-per-round]
import { readFileSync } from "node:fs";
import { WASI } from "node:wasi";
import { argv } from "node:process";

const ROOT = new URL("../", import.meta.url);
const rounds = Number(argv[2] || 7);
const perRound = Number(argv[3] || 20000);

const USER = "alice.anderson@example.com";
const enc = new TextEncoder();
const dec = new TextDecoder();

/// Protobuf bytes of Envoy's dynamic metadata with `jwt_authn`'s verified payload.
function metadataBytes(claims) {
  const varint = (n) => { const out = []; do { let b = n & 0x7f; n >>>= 7; if (n) b |= 0x80; out.push(b); } while (n); return out; };
  const field = (tag, bytes) => [...varint((tag << 3) | 2), ...varint(bytes.length), ...bytes];
  const str = (s) => [...enc.encode(s)];
  const value = (s) => field(3, str(s)); // Value.string_value
  const struct = (entries) => entries.flatMap(([k, v]) => field(1, [...field(1, str(k)), ...field(2, v)]));
  const payload = struct(claims.map(([k, v]) => [k, value(v)]));
  const jwt = struct([["payload", field(5, payload)]]); // Value.struct_value
  return Uint8Array.from(field(1, [...field(1, str("envoy.filters.http.jwt_authn")), ...field(2, jwt)]));
}

function load(file, pluginConfig, env) {
  const module = new WebAssembly.Module(readFileSync(new URL(file, ROOT)));
  const wasi = new WASI({ version: "preview1", env, returnOnExit: true });
  const shared = new Map(); // key -> {value, cas}
  const queues = new Map();
  const state = { headers: new Map(), callouts: 0, callResponse: null, enqueued: [] };
  let ex;
  const mem = () => new Uint8Array(ex.memory.buffer);
  const view = () => new DataView(ex.memory.buffer);
  const str = (p, n) => dec.decode(mem().subarray(p, p + n));
  const give = (bytes, retPtr, retSize) => {
    const p = ex.proxy_on_memory_allocate(bytes.length || 1);
    mem().set(bytes, p);
    view().setUint32(retPtr, p, true);
    view().setUint32(retSize, bytes.length, true);
    return 0;
  };
  const pairs = (map) => {
    const entries = [...map].map(([k, v]) => [enc.encode(k), enc.encode(v)]);
    const size = 4 + entries.length * 8 + entries.reduce((s, [k, v]) => s + k.length + v.length + 2, 0);
    const out = new Uint8Array(size);
    const dv = new DataView(out.buffer);
    dv.setUint32(0, entries.length, true);
    let o = 4 + entries.length * 8;
    entries.forEach(([k, v], i) => {
      dv.setUint32(4 + i * 8, k.length, true); dv.setUint32(8 + i * 8, v.length, true);
      out.set(k, o); o += k.length + 1; out.set(v, o); o += v.length + 1;
    });
    return out;
  };
  const claims = [["user_name", USER], ["email", USER], ["given_name", "Alice"], ["origin", "idp"],
                  ["iss", "https://idp.example/oauth/token"]];
  const properties = new Map([
    ["metadata", metadataBytes(claims)],
    // The payload as Envoy 1.40 hands it over read on its own: its root claims as pairs.
    ["metadata\0filter_metadata\0envoy.filters.http.jwt_authn\0payload", pairs(new Map(claims))],
    ["xds\0route_metadata\0filter_metadata\0principal_propagation\0destination", enc.encode("d")],
  ]);
  const headerMap = (type) => (type === 6 ? state.callResponse.headers : state.headers);
  const envImports = {
    proxy_log: (level, p, n) => { if (level >= (process.env.LOG_LEVEL ?? 3)) console.error(str(p, n)); return 0; },
    proxy_set_tick_period_milliseconds: () => 0,
    proxy_get_current_time_nanoseconds: (ret) => { view().setBigUint64(ret, BigInt(Date.now()) * 1000000n, true); return 0; },
    proxy_get_buffer_bytes: (type, start, max, retPtr, retSize) => {
      const bytes = type === 7 ? enc.encode(pluginConfig) : type === 4 ? state.callResponse.body : null;
      return bytes ? give(bytes.subarray(start >>> 0, (start >>> 0) + (max >>> 0)), retPtr, retSize) : 1;
    },
    proxy_get_property: (p, n, retPtr, retSize) => {
      const value = properties.get(str(p, n));
      return value ? give(value, retPtr, retSize) : 1;
    },
    proxy_get_shared_data: (p, n, retPtr, retSize, retCas) => {
      const entry = shared.get(str(p, n));
      if (!entry) return 1;
      view().setUint32(retCas, entry.cas, true);
      return give(entry.value, retPtr, retSize);
    },
    proxy_set_shared_data: (p, n, v, vn, cas) => {
      const key = str(p, n);
      const entry = shared.get(key);
      if (cas && entry && entry.cas !== cas) return 8; // CasMismatch
      shared.set(key, { value: mem().slice(v, v + vn), cas: (entry?.cas || 0) + 1 });
      return 0;
    },
    proxy_register_shared_queue: (p, n, ret) => { const id = queues.size + 1; queues.set(id, []); view().setUint32(ret, id, true); return 0; },
    proxy_resolve_shared_queue: (vp, vn, p, n, ret) => { view().setUint32(ret, 1, true); return queues.size ? 0 : 1; },
    proxy_enqueue_shared_queue: (id, p, n) => { queues.get(id)?.push(mem().slice(p, p + n)); state.enqueued.push(id); return 0; },
    proxy_dequeue_shared_queue: (id, retPtr, retSize) => {
      const message = queues.get(id)?.shift();
      return message ? give(message, retPtr, retSize) : 1;
    },
    proxy_get_header_map_value: (type, p, n, retPtr, retSize) => {
      const value = headerMap(type).get(str(p, n));
      return value === undefined ? 1 : give(enc.encode(value), retPtr, retSize);
    },
    // Serialized once per request's header map (and again after a change), as a host keeps
    // its map in a form it copies out cheaply: encoding it in JavaScript on every call would
    // be the harness's cost, not the module's.
    proxy_get_header_map_pairs: (type, retPtr, retSize) => {
      if (type !== 0) return give(pairs(headerMap(type)), retPtr, retSize);
      state.headerPairs ??= pairs(state.headers);
      return give(state.headerPairs, retPtr, retSize);
    },
    proxy_replace_header_map_value: (type, p, n, v, vn) => { state.headers.set(str(p, n), str(v, vn)); state.headerPairs = null; return 0; },
    proxy_add_header_map_value: (type, p, n, v, vn) => { state.headers.set(str(p, n), str(v, vn)); state.headerPairs = null; return 0; },
    proxy_remove_header_map_value: (type, p, n) => { state.headers.delete(str(p, n)); state.headerPairs = null; return 0; },
    proxy_define_metric: (type, p, n, ret) => { view().setUint32(ret, 1, true); return 0; },
    proxy_increment_metric: () => 0,
    proxy_record_metric: () => 0,
    proxy_http_call: (up, upn, h, hn, b, bn, t, tn, timeout, ret) => {
      state.callouts += 1;
      view().setUint32(ret, 7, true);
      return 0;
    },
    proxy_continue_stream: () => 0,
    proxy_send_local_response: (status) => { state.localResponse = status; return 0; },
    proxy_set_effective_context: () => 0,
  };
  const env_ = Object.fromEntries(WebAssembly.Module.imports(module).filter((i) => i.module === "env")
    .map((i) => [i.name, envImports[i.name] || (() => { throw new Error(`${i.name}: not in this host`); })]));
  const instance = new WebAssembly.Instance(module, { ...wasi.getImportObject(), env: env_ });
  ex = instance.exports;
  wasi.initialize(instance);
  const root = 1;
  ex.proxy_on_context_create(root, 0);
  if (!ex.proxy_on_vm_start(root, 0)) throw new Error(`${file}: VM start refused`);
  if (!ex.proxy_on_configure(root, enc.encode(pluginConfig).length)) throw new Error(`${file}: configuration refused`);
  let next = 2;
  const requestHeaders = [[":path", "/x"], [":method", "GET"], [":authority", "gw"], ["x-user", "bench"],
                          ["authorization", `Bearer ${"j".repeat(800)}`], ["accept", "*/*"]];
  const requestPairs = pairs(new Map(requestHeaders));
  const request = () => {
    const id = next++;
    state.headers = new Map(requestHeaders);
    state.headerPairs = requestPairs;
    state.localResponse = undefined;
    ex.proxy_on_context_create(id, root);
    const action = ex.proxy_on_request_headers(id, state.headers.size, 1);
    return { id, action };
  };
  const finish = (id) => {
    ex.proxy_on_response_headers(id, 2, 1);
    ex.proxy_on_done(id);
    ex.proxy_on_log(id);
    ex.proxy_on_delete(id);
  };
  return { ex, state, request, finish, root, token: () => state.headers.get("authorization") };
}

/// The plugin's first request is a miss: sign on ticks, answer the callout, resume.
function warmPlugin(plugin) {
  const { id, action } = plugin.request();
  if (action === 0) throw new Error("the first request should wait for its token");
  const deliverQueued = () => { for (const q of plugin.state.enqueued.splice(0)) plugin.ex.proxy_on_queue_ready(plugin.root, q); };
  for (let i = 0; i < 100000 && !plugin.state.callouts; i++) {
    deliverQueued();
    plugin.ex.proxy_on_tick(plugin.root);
  }
  if (!plugin.state.callouts) throw new Error(`no token callout (local response ${plugin.state.localResponse})`);
  const body = enc.encode(JSON.stringify({ access_token: "t".repeat(800), token_type: "bearer", expires_in: 3600 }));
  plugin.state.callResponse = { headers: new Map([[":status", "200"], ["content-type", "application/json"]]), body };
  plugin.ex.proxy_on_http_call_response(plugin.root, 7, 2, body.length, 0);
  deliverQueued();
  plugin.finish(id);
  const hit = plugin.request();
  if (hit.action !== 0 || !plugin.token()?.startsWith("Bearer ttt")) throw new Error("the second request is not a hit");
  plugin.finish(hit.id);
}

const pem = (name) => readFileSync(new URL(`tests/fixtures/${name}`, ROOT), "utf8");
const pluginConfig = JSON.stringify({
  tokenServiceCluster: "ts",
  keys: { default: { privateKey: pem("signing-key.pem"), certificate: pem("signing-cert.pem") } },
  destinations: [{ Name: "d", Authentication: "OAuth2SAMLBearerAssertion", tokenServiceURL: "https://ts.example/oauth/token",
                   audience: "https://ts.example", assertionIssuer: "gw" }],
});
const plugin = load(process.env.PLUGIN_WASM || "target/wasm32-wasip1/release/principal_propagation.wasm", pluginConfig, {});
warmPlugin(plugin);
const minimal = load("target/wasm32-wasip1/release/examples/minimal_filter.wasm", "{}", {});
const identity = load("target/wasm32-wasip1/release/examples/minimal_filter.wasm", "{}", { MINIMAL_READ_IDENTITY: "1" });
for (const m of [minimal, identity]) for (let i = 0; i < 2; i++) { const r = m.request(); m.finish(r.id); }

const variants = { principal_propagation: plugin, minimal_wasm: minimal, minimal_identity: identity };
// Cold: between two requests, write over a buffer larger than the CPU's private caches,
// as Envoy's own work between two requests does; only the request itself is timed.
const polluter = new Uint8Array(Number(process.env.COLD_BYTES || 0));
const times = Object.fromEntries(Object.keys(variants).map((k) => [k, []]));
for (let r = 0; r < rounds; r++) {
  for (const [name, v] of Object.entries(variants)) {
    let spent = 0n;
    const n = polluter.length ? perRound / 10 : perRound;
    for (let i = 0; i < n; i++) {
      if (polluter.length) polluter.fill(i & 0xff);
      const start = process.hrtime.bigint();
      const { id } = v.request();
      v.finish(id);
      spent += process.hrtime.bigint() - start;
    }
    times[name].push(Number(spent) / 1000 / n);
  }
}
if (plugin.state.callouts !== 1) throw new Error(`${plugin.state.callouts} callouts: hits went to the token service`);
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
for (const [name, xs] of Object.entries(times)) {
  console.log(`${name.padEnd(22)} ${median(xs).toFixed(2)} µs per request (${Math.min(...xs).toFixed(2)}–${Math.max(...xs).toFixed(2)})`);
}
