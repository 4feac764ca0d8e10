// Calls destinations the way an application on SAP BTP does, with the real SAP Cloud SDK
// (@sap-cloud-sdk/http-client, pinned in package.json): it reads the `destination` service
// binding from the environment (VCAP_SERVICES or SERVICE_BINDING_ROOT, through @sap/xsenv)
// and asks the binding's `uri` (the gateway's find-destination API) for each destination.
//
// Steps are JSON objects, given as a JSON list in the first argument, or one per line on
// stdin (read one at a time, so a test can change the world between two calls while this
// process, and so the SDK's caches, live on):
//   {"call": {"destination": "dev", "jwt": "<user JWT>", "path": "/hello", "label": "..."}}
//   {"sleep": <seconds>}
// Each step prints one JSON line on stdout:
//   {"step": n, "label": ..., "ok": true, "status": 200, "body": <the upstream's answer>, "requests": [...]}
//   {"step": n, "label": ..., "ok": false, "error": {"messages": [<the error and its causes>], ...}, "requests": [...]}
// `requests` lists what this process sent during the step (method, URL, header names: no
// values), seen on Node's http diagnostics channel. Credentials in an answer (an
// `authorization` value) are printed as a SHA-256 fingerprint, never as they are.

import { createHash } from 'node:crypto';
import diagnostics from 'node:diagnostics_channel';
import { createInterface } from 'node:readline';
import { executeHttpRequest } from '@sap-cloud-sdk/http-client';

// The SDK's logger (winston's Console transport) writes to console._stdout: send it to
// stderr, so stdout carries nothing but this program's JSON lines.
console._stdout = process.stderr;

const STEP_TIMEOUT_MS = Number(process.env.PP_SDK_STEP_TIMEOUT_MS || 30000);
const MAX_SLEEP_S = 120;
const MAX_CAUSES = 10;

let sent = null; // the requests of the running step
diagnostics.subscribe('http.client.request.start', ({ request }) => {
  if (!sent) return;
  const host = request.getHeader('host') ?? request.host;
  sent.push({
    method: request.method,
    url: `${request.protocol}//${host}${request.path}`,
    headers: request.getHeaderNames().sort()
  });
});

function fingerprint(value) {
  return `sha256:${createHash('sha256').update(String(value)).digest('hex').slice(0, 16)}`;
}

// A copy of `value` with every `authorization` value replaced by its fingerprint.
function redact(value) {
  if (Array.isArray(value)) return value.map(redact);
  if (value && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([key, inner]) =>
      [key, key.toLowerCase() === 'authorization' ? fingerprint(inner) : redact(inner)]));
  }
  return value;
}

// The SDK wraps errors (ErrorWithCause, axios errors): every message down the chain, and
// the HTTP answer of the innermost error that has one.
function describe(error) {
  const messages = [];
  let response;
  for (let e = error, depth = 0; e && depth < MAX_CAUSES; e = e.cause, depth++) {
    messages.push(String(e.message ?? e));
    if (e.response?.status) {
      response = { status: e.response.status, url: e.config?.url?.split('?')[0], data: redact(e.response.data) };
    }
  }
  return response ? { messages, response } : { messages };
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not finish within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function call({ destination, jwt, path = '/hello', method = 'get' }) {
  const response = await executeHttpRequest(
    jwt ? { destinationName: destination, jwt } : { destinationName: destination },
    { method, url: path }
  );
  return { status: response.status, body: redact(response.data) };
}

async function run(step, n) {
  const label = step.call?.label ?? step.label ?? null;
  sent = [];
  let result;
  try {
    if (step.call) {
      result = { ok: true, ...(await withTimeout(call(step.call), STEP_TIMEOUT_MS, 'the call')) };
    } else if (typeof step.sleep === 'number') {
      const seconds = Math.min(Math.max(step.sleep, 0), MAX_SLEEP_S);
      await new Promise(resolve => setTimeout(resolve, seconds * 1000));
      result = { ok: true, slept: seconds };
    } else {
      result = { ok: false, error: { messages: ['unknown step: expected "call" or "sleep"'] } };
    }
  } catch (error) {
    result = { ok: false, error: describe(error) };
  }
  const line = { step: n, label, ...result, requests: sent };
  sent = null;
  process.stdout.write(`${JSON.stringify(line)}\n`);
}

async function main() {
  let n = 0;
  if (process.argv[2]) {
    for (const step of JSON.parse(process.argv[2])) await run(step, n++);
    return;
  }
  for await (const line of createInterface({ input: process.stdin, crlfDelay: Infinity })) {
    if (!line.trim()) continue;
    let step;
    try {
      step = JSON.parse(line);
    } catch (error) {
      process.stdout.write(`${JSON.stringify({ step: n++, ok: false, error: { messages: [`not JSON: ${error.message}`] } })}\n`);
      continue;
    }
    await run(step, n++);
  }
}

main().then(
  () => process.exit(0), // the SDK's circuit breakers keep timers: do not wait for them
  error => {
    process.stderr.write(`${error.stack ?? error}\n`);
    process.exit(1);
  }
);
