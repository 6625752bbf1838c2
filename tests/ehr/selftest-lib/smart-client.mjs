// The client side of SMART, as Courier will do it: keys, PKCE, private_key_jwt
// assertions, the authorize redirect and the token request. Used by selftest.mjs.

import { createHash, randomBytes } from 'node:crypto';
import * as jose from 'jose';
import { request } from './harness.mjs';

export const ASSERTION_TYPE = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';

// A client key: alg RS384 or ES384, with its public JWK (kid = thumbprint).
export async function clientKey(alg) {
  const { publicKey, privateKey } = await jose.generateKeyPair(alg, { extractable: true });
  const jwk = await jose.exportJWK(publicKey);
  const kid = await jose.calculateJwkThumbprint(jwk);
  return { alg, kid, privateKey, publicJwk: { ...jwk, kid, alg, use: 'sig' } };
}

export function pkce() {
  const verifier = randomBytes(32).toString('base64url');
  return { verifier, challenge: createHash('sha256').update(verifier).digest('base64url') };
}

// A private_key_jwt client assertion. `overrides` lets a test break one thing at a time.
export async function clientAssertion(key, clientId, tokenUrl, overrides = {}) {
  const now = Math.floor(Date.now() / 1000);
  const claims = {
    iss: clientId,
    sub: clientId,
    aud: tokenUrl,
    exp: now + 240,
    jti: randomBytes(16).toString('base64url'),
    ...overrides.claims,
  };
  const header = { alg: key.alg, kid: key.kid, typ: 'JWT', ...overrides.header };
  return new jose.SignJWT(claims).setProtectedHeader(header).sign(key.privateKey);
}

// An unsigned JWT ({"alg":"none"}), built by hand: the attack the server must refuse.
export function unsignedAssertion(clientId, tokenUrl, kid) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const now = Math.floor(Date.now() / 1000);
  const claims = { iss: clientId, sub: clientId, aud: tokenUrl, exp: now + 240, jti: randomBytes(16).toString('base64url') };
  return `${b64({ alg: 'none', typ: 'JWT', kid })}.${b64(claims)}.`;
}

// GET /authorize without following the redirect; returns the redirect's parameters.
export async function authorize(authorizeUrl, params, headers = {}) {
  const url = new URL(authorizeUrl);
  for (const [k, v] of Object.entries(params)) if (v !== undefined) url.searchParams.set(k, v);
  const response = await request(url, { headers });
  const location = response.headers.get('location');
  return {
    status: response.status,
    body: response.body,
    location,
    params: location ? Object.fromEntries(new URL(location).searchParams) : {},
  };
}

export function tokenRequest(tokenUrl, form) {
  const body = new URLSearchParams();
  for (const [k, v] of Object.entries(form)) if (v !== undefined) body.set(k, v);
  return request(tokenUrl, {
    method: 'POST',
    headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
    body: body.toString(),
  });
}

// A token request authenticated with a fresh assertion from `key`.
export async function authenticatedTokenRequest(ehr, client, key, form, assertionOverrides) {
  return tokenRequest(ehr.token, {
    ...form,
    client_assertion_type: ASSERTION_TYPE,
    client_assertion: await clientAssertion(key, client.client_id, ehr.token, assertionOverrides),
  });
}
