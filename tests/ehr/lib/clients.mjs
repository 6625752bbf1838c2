// Registered SMART clients and their public keys.
//
// A registration is {client_id, jwks_url | jwks, redirect_uris, scopes}. Only
// confidential asymmetric clients exist here: there is no client secret and no
// public-client path, because Courier is registered as private_key_jwt everywhere.

// The fixture must never reach outside the machine, so a jwks_url has to be loopback.
const LOOPBACK_HOSTS = new Set(['127.0.0.1', 'localhost', '[::1]']);
const JWKS_FETCH_TIMEOUT_MS = 5000;

export function normalizeClient(raw) {
  if (!raw || typeof raw !== 'object') throw new Error('client registration must be an object');
  const { client_id, jwks_url, jwks } = raw;
  if (typeof client_id !== 'string' || !client_id) throw new Error('client registration needs a client_id');
  if (!jwks_url === !jwks) throw new Error(`client ${client_id}: give exactly one of jwks_url or jwks`);
  if (jwks_url) assertLoopback(jwks_url, `client ${client_id}: jwks_url`);
  if (jwks && !Array.isArray(jwks.keys)) throw new Error(`client ${client_id}: jwks must be {"keys": [...]}`);
  const redirect_uris = raw.redirect_uris ?? [];
  if (!Array.isArray(redirect_uris) || redirect_uris.some((u) => typeof u !== 'string')) {
    throw new Error(`client ${client_id}: redirect_uris must be a list of strings`);
  }
  let scopes = raw.scopes ?? raw.scope ?? [];
  if (typeof scopes === 'string') scopes = scopes.split(/\s+/).filter(Boolean);
  if (!Array.isArray(scopes)) throw new Error(`client ${client_id}: scopes must be a list or a space-separated string`);
  return { client_id, jwks_url: jwks_url || null, jwks: jwks || null, redirect_uris, scopes };
}

export function assertLoopback(url, what) {
  let parsed;
  try {
    parsed = new URL(url);
  } catch {
    throw new Error(`${what} is not a URL: ${url}`);
  }
  if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') throw new Error(`${what} must be http(s): ${url}`);
  if (!LOOPBACK_HOSTS.has(parsed.hostname)) throw new Error(`${what} must be a loopback address in this fixture: ${url}`);
}

// The client's current key set. A registered jwks_url is fetched on every client
// authentication (no cache): tests that rotate keys then see the new keys at once,
// and the jwks_fetches counter tells exactly how often the client's URL was used.
export async function loadClientJwks(client, counters) {
  if (client.jwks) return client.jwks;
  counters.jwks_fetches++;
  let response;
  try {
    response = await fetch(client.jwks_url, {
      signal: AbortSignal.timeout(JWKS_FETCH_TIMEOUT_MS),
      headers: { Accept: 'application/json' },
      redirect: 'error',
    });
  } catch (e) {
    throw new Error(`could not fetch the client's JWKS from ${client.jwks_url}: ${e.message}`);
  }
  if (!response.ok) throw new Error(`client's JWKS at ${client.jwks_url} answered HTTP ${response.status}`);
  let body;
  try {
    body = await response.json();
  } catch {
    throw new Error(`client's JWKS at ${client.jwks_url} is not JSON`);
  }
  if (!body || !Array.isArray(body.keys)) throw new Error(`client's JWKS at ${client.jwks_url} has no "keys" list`);
  return body;
}
