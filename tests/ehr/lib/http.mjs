// Small HTTP helpers shared by the SMART, FHIR and test-control handlers.
// Plain node:http is used on purpose: no framework means no hidden behaviour
// (body parsing, redirects, CORS) between the tests and what the fixture checks.

import { randomBytes } from 'node:crypto';

// Bodies are small in tests; a hard cap keeps a runaway client from eating memory.
const MAX_BODY_BYTES = 2 * 1024 * 1024;

export class HttpError extends Error {
  constructor(status, message, details) {
    super(message);
    this.status = status;
    this.details = details; // extra JSON for the response, e.g. an OperationOutcome
  }
}

export function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(new HttpError(413, 'request body too large'));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

export function mediaType(req) {
  return (req.headers['content-type'] || '').split(';')[0].trim().toLowerCase();
}

// Form bodies (token endpoint, POST /authorize, POST _search) as a plain object.
// A repeated parameter is an error for OAuth (RFC 6749 §3.1), so we keep the
// list of repeated names for the caller to reject.
export function parseForm(text) {
  const params = new URLSearchParams(text);
  const out = Object.create(null);
  const repeated = [];
  for (const [k, v] of params) {
    if (k in out) repeated.push(k);
    out[k] = v;
  }
  return { params: out, repeated };
}

export async function readJsonBody(req) {
  const text = await readBody(req);
  if (!text) return undefined;
  try {
    return JSON.parse(text);
  } catch {
    throw new HttpError(400, 'body is not valid JSON');
  }
}

export function sendJson(res, status, body, headers = {}) {
  const text = JSON.stringify(body, null, 2);
  res.writeHead(status, {
    'Content-Type': 'application/json; charset=utf-8',
    'Content-Length': Buffer.byteLength(text),
    ...headers,
  });
  res.end(text);
}

export function redirect(res, location) {
  res.writeHead(302, { Location: location, 'Cache-Control': 'no-store', 'Content-Length': 0 });
  res.end();
}

// Opaque, unguessable handles (codes, launch ids, refresh tokens).
export function randomToken(bytes = 32) {
  return randomBytes(bytes).toString('base64url');
}

export function nowSeconds() {
  return Math.floor(Date.now() / 1000);
}

// Serialises async critical sections. The FHIR writes go through this so that two
// concurrent conditional creates cannot both see "no match" and both create: the
// in-memory repository's withTransaction() is a no-op, unlike a real database.
// (Today the in-memory search-then-create runs without yielding to I/O, so the race
// cannot happen anyway; the lock keeps that true if a write path ever awaits I/O.)
export class Mutex {
  #tail = Promise.resolve();
  run(fn) {
    const result = this.#tail.then(fn, fn);
    this.#tail = result.then(
      () => undefined,
      () => undefined
    );
    return result;
  }
}

// An RFC 6749 §5.2 error from the token endpoint (or §4.1.2.1 from /authorize).
export class OAuthError extends Error {
  constructor(status, error, description) {
    super(description);
    this.status = status;
    this.error = error;
  }
}

export function sendOAuthError(res, err) {
  // invalid_client is sent with 401 (RFC 6749 §5.2 allows it); there is no
  // WWW-Authenticate scheme for private_key_jwt, so none is named.
  const headers = { 'Cache-Control': 'no-store', Pragma: 'no-cache' };
  sendJson(res, err.status, { error: err.error, error_description: err.message }, headers);
}
