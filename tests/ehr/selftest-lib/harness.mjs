// Minimal test harness for selftest.mjs: checks, assertions, EHR child processes,
// and a tiny loopback HTTP server for the client's JWKS. No test framework, so the
// last line is the plain "N passed, M failed" that CI reads.

import { spawn } from 'node:child_process';
import { createServer } from 'node:http';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = dirname(fileURLToPath(import.meta.url));
const SERVER = join(HERE, '..', 'server.mjs');
const READY_TIMEOUT_MS = 30_000;
export const HTTP_TIMEOUT_MS = 10_000;

export const results = { passed: 0, failed: 0, failures: [] };

// Runs one named check; a thrown error fails it, and the run goes on.
export async function check(name, fn) {
  try {
    await fn();
    results.passed++;
    console.log(`ok   ${name}`);
  } catch (err) {
    results.failed++;
    results.failures.push(name);
    console.log(`FAIL ${name}\n     ${String(err?.stack || err).split('\n').slice(0, 4).join('\n     ')}`);
  }
}

export function assert(condition, message) {
  if (!condition) throw new Error(`assertion failed: ${message}`);
}

export function assertEq(actual, expected, message) {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  if (a !== e) throw new Error(`${message}: expected ${e}, got ${a}`);
}

// Starts `node server.mjs` and resolves with its ready line once printed.
// stdin stays a pipe so that the child exits if this process dies (--exit-on-stdin-eof).
export function startEhr(args, { env = {} } = {}) {
  const child = spawn(process.execPath, [SERVER, '--exit-on-stdin-eof', '--max-lifetime', '300', ...args], {
    stdio: ['pipe', 'pipe', 'pipe'],
    env: { ...process.env, ...env },
  });
  const stderr = [];
  child.stderr.on('data', (d) => stderr.push(d.toString()));
  return new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => {
      child.kill();
      reject(new Error(`EHR did not become ready in ${READY_TIMEOUT_MS} ms:\n${stderr.join('')}`));
    }, READY_TIMEOUT_MS);
    child.stdout.on('data', (d) => {
      out += d.toString();
      const nl = out.indexOf('\n');
      if (nl < 0) return;
      clearTimeout(timer);
      try {
        const ready = JSON.parse(out.slice(0, nl));
        const origin = new URL(ready.base).origin;
        resolve({ ...ready, origin, child, stderr, stop: () => stopChild(child) });
      } catch (e) {
        reject(new Error(`bad ready line ${out.slice(0, nl)}: ${e.message}`));
      }
    });
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`EHR exited early with ${code}:\n${stderr.join('')}`));
    });
  });
}

function stopChild(child) {
  if (child.exitCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      resolve();
    }, 3000);
    child.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
    child.kill('SIGTERM');
  });
}

// Serves the client's JWKS (and counts the fetches) on 127.0.0.1.
export async function startJwksServer(getJwks) {
  let fetches = 0;
  const server = createServer((req, res) => {
    if (req.url === '/jwks.json') {
      fetches++;
      const text = JSON.stringify(getJwks());
      res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(text) });
      return res.end(text);
    }
    res.writeHead(404).end();
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const origin = `http://127.0.0.1:${server.address().port}`;
  return {
    origin,
    url: `${origin}/jwks.json`,
    fetches: () => fetches,
    close: () => {
      server.closeAllConnections();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

// fetch with a timeout; returns {status, headers, body (parsed JSON when JSON)}.
export async function request(url, { method = 'GET', headers = {}, body, redirect = 'manual' } = {}) {
  const response = await fetch(url, { method, headers, body, redirect, signal: AbortSignal.timeout(HTTP_TIMEOUT_MS) });
  const text = await response.text();
  let parsed = text;
  try {
    parsed = text ? JSON.parse(text) : undefined;
  } catch {
    // not JSON; keep the text
  }
  return { status: response.status, headers: response.headers, body: parsed };
}

export function postJson(url, body) {
  return request(url, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
}
