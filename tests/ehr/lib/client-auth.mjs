// Client authentication at the token endpoint: private_key_jwt only, as SMART's
// "client-confidential-asymmetric" profile (App Launch 2 §client-authentication-asymmetric,
// Backend Services) requires. Each failure says which check failed, so a test that
// expects a rejection can assert on the reason and not only on the status.

import * as jose from 'jose';
import { loadClientJwks } from './clients.mjs';
import { nowSeconds, OAuthError } from './http.mjs';

const ASSERTION_TYPE = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';
const ALLOWED_ALGS = ['RS384', 'ES384'];
const MAX_ASSERTION_LIFETIME_SECONDS = 300;

function fail(message) {
  return new OAuthError(401, 'invalid_client', message);
}

// `tokenUrl`: the endpoint the request came to (the assertion's `aud` must name it).
export async function authenticateClient(state, params, tokenUrl = state.urls.token) {
  if (params.client_secret !== undefined) throw fail('client_secret is not accepted: register a JWKS and use private_key_jwt');
  if (params.client_assertion_type !== ASSERTION_TYPE) throw fail(`client_assertion_type must be ${ASSERTION_TYPE}`);
  const assertion = params.client_assertion;
  if (!assertion) throw fail('client_assertion is missing');

  let header;
  let claims;
  try {
    header = jose.decodeProtectedHeader(assertion);
    claims = jose.decodeJwt(assertion);
  } catch {
    throw fail('client_assertion is not a compact JWT');
  }
  // Checked before any key is looked at: "none" and HMAC algorithms must never
  // reach a verifier, whatever library sits behind it.
  if (!ALLOWED_ALGS.includes(header.alg)) throw fail(`client_assertion alg "${header.alg}" is not allowed; use RS384 or ES384`);
  if (header.typ !== 'JWT') throw fail('client_assertion header typ must be "JWT"');
  if (!header.kid) throw fail('client_assertion header must carry a kid');

  const clientId = claims.iss;
  if (typeof clientId !== 'string' || !clientId) throw fail('client_assertion has no iss');
  if (claims.sub !== clientId) throw fail('client_assertion sub must equal iss (the client_id)');
  if (params.client_id !== undefined && params.client_id !== clientId) throw fail('client_id does not match the assertion iss');
  const client = state.clients.get(clientId);
  if (!client) throw fail(`unknown client_id "${clientId}"`);
  if (header.jku !== undefined && header.jku !== client.jwks_url) throw fail('jku does not match the registered jwks_url');

  const audOk = claims.aud === tokenUrl || (Array.isArray(claims.aud) && claims.aud.includes(tokenUrl));
  if (!audOk) throw fail(`client_assertion aud must be the token endpoint ${tokenUrl}`);

  const now = nowSeconds();
  if (typeof claims.exp !== 'number') throw fail('client_assertion has no exp');
  if (claims.exp <= now) throw fail('client_assertion has expired');
  if (claims.exp > now + MAX_ASSERTION_LIFETIME_SECONDS) throw fail('client_assertion exp is more than 5 minutes in the future');
  if (typeof claims.nbf === 'number' && claims.nbf > now) throw fail('client_assertion is not yet valid (nbf)');
  if (typeof claims.jti !== 'string' || !claims.jti) throw fail('client_assertion has no jti');

  let jwks;
  try {
    jwks = await loadClientJwks(client, state.counters);
  } catch (e) {
    throw fail(e.message);
  }
  try {
    await jose.jwtVerify(assertion, jose.createLocalJWKSet(jwks), { algorithms: ALLOWED_ALGS });
  } catch (e) {
    throw fail(`client_assertion signature did not verify against the client's JWKS (${e.code || e.message})`);
  }

  // Replay check only after the signature is good (so a forged assertion cannot
  // burn a jti), and without an await between the check and the record, so two
  // concurrent requests with one jti cannot both pass.
  const replayKey = `${clientId} ${claims.jti}`;
  if (state.seenJti.has(replayKey)) throw fail('client_assertion jti has already been used');
  state.seenJti.set(replayKey, claims.exp);
  return client;
}
