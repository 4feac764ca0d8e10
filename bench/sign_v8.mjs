// Runs an example built for wasm32-wasip1 inside Node's V8 (the engine Envoy embeds), so
// costs can be measured without Envoy: signing (examples/sign_bench.rs, the default) or
// the host-independent work of a cache hit (EXAMPLE=hit_bench, examples/hit_bench.rs):
//   cargo build --release --target wasm32-wasip1 --example sign_bench
//   node bench/sign_v8.mjs [rounds] [signatures-per-round]
import { readFile } from "node:fs/promises";
import { WASI } from "node:wasi";
import process, { argv } from "node:process";

const example = process.env.EXAMPLE || "sign_bench";
const path = new URL(`../target/wasm32-wasip1/release/examples/${example}.wasm`, import.meta.url);
const wasi = new WASI({ version: "preview1", args: [example, ...argv.slice(2)] });
const module = await WebAssembly.compile(await readFile(path));
// The library's proxy-wasm host calls are linked in but never called by the benchmark.
const env = Object.fromEntries(
  WebAssembly.Module.imports(module)
    .filter((i) => i.module === "env")
    .map((i) => [i.name, () => { throw new Error(`${i.name} is not available here`); }]),
);
const instance = await WebAssembly.instantiate(module, { ...wasi.getImportObject(), env });
// The library also exports a reactor `_initialize`, which `wasi.start` refuses; run `_start`.
const { _start, memory } = instance.exports;
wasi.start({ exports: { _start, memory } });
