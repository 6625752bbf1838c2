// POST /token: authorization_code (with PKCE), client_credentials and refresh_token,
// all with private_key_jwt client authentication. Errors are RFC 6749 §5.2 JSON.

import { createHash } from 'node:crypto';
import { authenticateClient } from './client-auth.mjs';
import { mediaType, nowSeconds, OAuthError, parseForm, randomToken, readBody, sendJson, sendOAuthError } from './http.mjs';
import { grantScopes, splitScopes } from './scopes.mjs';
import { bump, prune } from './state.mjs';

const GRANTS = ['authorization_code', 'client_credentials', 'refresh_token'];
// RFC 7636 §4.1: 43-128 unreserved characters.
const VERIFIER = /^[A-Za-z0-9\-._~]{43,128}$/;
// Launch context fields returned beside the access token (App Launch 2 §launch-context).
const CONTEXT_FIELDS = ['patient', 'encounter', 'fhirContext', 'need_patient_banner', 'smart_style_url', 'intent', 'tenant'];

const invalidRequest = (m) => new OAuthError(400, 'invalid_request', m);
const invalidGrant = (m) => new OAuthError(400, 'invalid_grant', m);
const invalidScope = (m) => new OAuthError(400, 'invalid_scope', m);

// `endpoint`: which token endpoint this is — the launch one (`/token`, every grant, unless the
// setting token_client_credentials turns client_credentials away) or the backend one
// (`backend_token_path`: client_credentials only), with its URL (the assertions' `aud`).
export async function handleToken(state, tokens, req, res, endpoint = { url: state.urls.token, backendOnly: false }) {
  const counters = state.counters.token;
  counters.requests++;
  bump(counters.by_endpoint, new URL(endpoint.url).pathname);
  prune(state);
  try {
    if (req.method !== 'POST') throw new OAuthError(405, 'invalid_request', 'the token endpoint accepts POST only');
    if (mediaType(req) !== 'application/x-www-form-urlencoded') {
      throw invalidRequest('the token request must be application/x-www-form-urlencoded');
    }
    const { params, repeated } = parseForm(await readBody(req));
    if (repeated.length) throw invalidRequest(`parameters may not be repeated: ${repeated.join(', ')}`);
    const grant = params.grant_type;
    if (!grant) throw invalidRequest('grant_type is required');
    bump(counters.by_grant_type, grant);
    if (!GRANTS.includes(grant)) throw new OAuthError(400, 'unsupported_grant_type', `grant_type ${grant} is not supported`);
    if (endpoint.backendOnly && grant !== 'client_credentials') {
      throw new OAuthError(400, 'unsupported_grant_type', 'this endpoint serves SMART Backend Services (client_credentials) only');
    }
    if (!endpoint.backendOnly && grant === 'client_credentials' && !state.settings.tokenClientCredentials) {
      throw new OAuthError(400, 'unsupported_grant_type', 'client_credentials is not served at this endpoint (SMART Backend Services have their own)');
    }

    const client = await authenticateClient(state, params, endpoint.url);
    bump(counters.by_client, client.client_id);

    let body;
    if (grant === 'authorization_code') body = await codeGrant(state, tokens, client, params);
    else if (grant === 'client_credentials') body = await clientCredentialsGrant(tokens, client, params);
    else body = await refreshGrant(state, tokens, client, params);

    counters.issued++;
    sendJson(res, 200, body, { 'Cache-Control': 'no-store', Pragma: 'no-cache' });
  } catch (err) {
    if (!(err instanceof OAuthError)) throw err;
    bump(counters.errors, err.error);
    sendOAuthError(res, err);
  }
}

async function codeGrant(state, tokens, client, params) {
  if (!params.code) throw invalidRequest('code is required');
  const entry = state.codes.get(params.code);
  if (!entry) throw invalidGrant('unknown or expired authorization code');
  if (entry.client_id !== client.client_id) throw invalidGrant('the code was issued to another client');
  if (entry.used) {
    // RFC 6749 §4.1.2: a second use revokes what the first one obtained.
    if (entry.family) tokens.revokeFamily(entry.family);
    throw invalidGrant('the authorization code was already used; tokens issued from it are now revoked');
  }
  // Any redemption attempt burns the code, so a wrong verifier cannot be retried.
  entry.used = true;
  if (entry.expires < nowSeconds()) throw invalidGrant('the authorization code has expired');
  if (params.redirect_uri !== entry.redirect_uri) throw invalidGrant('redirect_uri does not match the authorization request');
  if (!params.code_verifier) throw invalidRequest('code_verifier is required (PKCE)');
  if (!VERIFIER.test(params.code_verifier)) throw invalidGrant('code_verifier is not 43-128 unreserved characters');
  const challenge = createHash('sha256').update(params.code_verifier).digest('base64url');
  if (challenge !== entry.code_challenge) throw invalidGrant('PKCE verification failed: code_verifier does not match code_challenge');

  entry.family = tokens.newFamily(client.client_id);
  const body = await userTokens(tokens, client, entry, entry.scopes, { nonce: entry.nonce });
  if (wantsRefresh(entry.scopes)) body.refresh_token = newRefreshToken(state, client, entry);
  return body;
}

async function clientCredentialsGrant(tokens, client, params) {
  // SMART Backend Services: scope is required, system/ scopes only, no refresh token.
  const requested = splitScopes(params.scope);
  if (requested.length === 0) throw invalidScope('scope is required');
  const scopes = grantScopes(requested, client, 'system');
  if (scopes.length === 0) throw invalidScope('none of the requested system/ scopes is registered for this client');
  const family = tokens.newFamily(client.client_id);
  const { token, expiresIn } = await tokens.accessToken({ family, clientId: client.client_id, subject: client.client_id, scopes });
  return { access_token: token, token_type: 'Bearer', expires_in: expiresInAs(tokens.state, expiresIn), scope: scopes.join(' ') };
}

// Refresh tokens rotate by default: each use returns a new refresh token and
// retires the old one; presenting a retired one revokes the whole grant (OAuth
// security BCP §4.14). With --refresh-rotation false the same refresh token stays
// valid until it expires and no refresh_token is returned on refresh.
async function refreshGrant(state, tokens, client, params) {
  if (!params.refresh_token) throw invalidRequest('refresh_token is required');
  const entry = state.refreshTokens.get(params.refresh_token);
  if (!entry) throw invalidGrant('unknown or expired refresh token');
  if (entry.client_id !== client.client_id) throw invalidGrant('the refresh token was issued to another client');
  if (tokens.familyRevoked(entry.family)) throw invalidGrant('the refresh token has been revoked');
  if (entry.used) {
    tokens.revokeFamily(entry.family);
    throw invalidGrant('the refresh token was already used (rotation); the whole grant is now revoked');
  }
  if (entry.expires < nowSeconds()) throw invalidGrant('the refresh token has expired');

  let scopes = entry.scopes;
  if (params.scope !== undefined) {
    const requested = splitScopes(params.scope);
    const extra = requested.filter((s) => !entry.scopes.includes(s));
    if (requested.length === 0 || extra.length) throw invalidScope(`scope may only narrow the original grant (not granted: ${extra.join(' ')})`);
    scopes = requested;
  }
  const body = await userTokens(tokens, client, entry, scopes, {});
  if (state.settings.refreshRotation) {
    entry.used = true;
    // RFC 6749 §6: the new refresh token carries the original grant's scope.
    body.refresh_token = newRefreshToken(state, client, entry);
  }
  return body;
}

// Access token + id_token + launch context for a user grant (code or refresh).
async function userTokens(tokens, client, grant, scopes, { nonce }) {
  const { token, expiresIn } = await tokens.accessToken({
    family: grant.family,
    clientId: client.client_id,
    subject: grant.user,
    scopes,
    context: grant.context,
  });
  // token_type: 'Bearer' (SMART's fixed value, any case), or another one an EHR might send.
  const body = { access_token: token, token_type: tokens.state.settings.tokenType, expires_in: expiresInAs(tokens.state, expiresIn), scope: scopes.join(' ') };
  if (scopes.includes('openid')) {
    body.id_token = await tokens.idToken({ clientId: client.client_id, user: grant.user, scopes, nonce, authTime: grant.auth_time });
  }
  for (const field of CONTEXT_FIELDS) if (grant.context?.[field] !== undefined) body[field] = grant.context[field];
  return body;
}

// expires_in as RFC 6749 has it (a number), or as some EHRs send it: a string of digits, or a
// number with a fraction.
function expiresInAs(state, seconds) {
  switch (state.settings.expiresInForm) {
    case 'string': return String(seconds);
    case 'fraction': return seconds + 0.5;
    default: return seconds;
  }
}

function wantsRefresh(scopes) {
  return scopes.includes('offline_access') || scopes.includes('online_access');
}

function newRefreshToken(state, client, grant) {
  const token = randomToken();
  state.refreshTokens.set(token, {
    client_id: client.client_id,
    scopes: grant.scopes,
    user: grant.user,
    context: grant.context,
    family: grant.family,
    auth_time: grant.auth_time,
    expires: nowSeconds() + state.settings.refreshTtl,
    used: false,
  });
  return token;
}
