// GET|POST /authorize: the SMART authorization request (App Launch 2 §obtain-authorization-code).
//
// There is no login page. Who the user is comes from, in order: the X-Test-User
// header or _test_user parameter, the user of the EHR launch, the configured
// auto-approve user. The decision is "approve" unless the fixture is set to deny
// (or X-Test-Deny: true is sent). Approval redirects with code+state; everything
// the fixture checks is listed in README.md.

import { mediaType, nowSeconds, OAuthError, parseForm, randomToken, readBody, redirect, sendJson } from './http.mjs';
import { grantScopes, splitScopes } from './scopes.mjs';
import { prune } from './state.mjs';

// RFC 7636: S256 challenge = BASE64URL(SHA256(verifier)), always 43 characters.
const S256_CHALLENGE = /^[A-Za-z0-9_-]{43}$/;

// "dr-1" means Practitioner/dr-1; a typed reference is kept as it is.
export function normalizeUser(user) {
  if (!user) return null;
  return user.includes('/') ? user : `Practitioner/${user}`;
}

async function readParams(req, url) {
  if (req.method === 'GET') {
    const params = Object.create(null);
    const repeated = [];
    for (const [k, v] of url.searchParams) {
      if (k in params) repeated.push(k);
      params[k] = v;
    }
    return { params, repeated };
  }
  if (req.method === 'POST' && mediaType(req) === 'application/x-www-form-urlencoded') {
    return parseForm(await readBody(req));
  }
  return null;
}

export async function handleAuthorize(state, req, res, url) {
  const counters = state.counters.authorize;
  counters.requests++;
  prune(state);

  const read = await readParams(req, url);
  if (!read) {
    counters.rejected++;
    return sendJson(res, 405, { error: 'invalid_request', error_description: 'use GET, or POST with a form body' });
  }
  const { params, repeated } = read;

  // RFC 6749 §4.1.2.1: with an unknown client or a redirect_uri that is not
  // registered, the server must not redirect; it tells the user instead.
  const client = state.clients.get(params.client_id);
  if (!client) {
    counters.rejected++;
    return sendJson(res, 400, { error: 'invalid_request', error_description: `unknown client_id "${params.client_id ?? ''}"` });
  }
  if (!params.redirect_uri || !client.redirect_uris.includes(params.redirect_uri)) {
    counters.rejected++;
    return sendJson(res, 400, {
      error: 'invalid_request',
      error_description: 'redirect_uri is missing or not exactly one of the client\'s registered redirect_uris',
    });
  }

  try {
    const approval = decide(state, req, params, repeated, client);
    const code = randomToken();
    const now = nowSeconds();
    state.codes.set(code, {
      client_id: client.client_id,
      redirect_uri: params.redirect_uri,
      code_challenge: params.code_challenge,
      scopes: approval.scopes,
      user: approval.user,
      context: approval.context,
      nonce: params.nonce ?? null,
      auth_time: now,
      expires: now + state.settings.codeTtl,
      used: false,
      family: null,
    });
    counters.approved++;
    return redirect(res, withParams(params.redirect_uri, { code, state: params.state }));
  } catch (err) {
    if (!(err instanceof OAuthError)) throw err;
    if (err.error === 'access_denied') counters.denied++;
    else counters.rejected++;
    return redirect(
      res,
      withParams(params.redirect_uri, { error: err.error, error_description: err.message, state: params.state })
    );
  }
}

// Everything after client and redirect_uri are known good; errors here redirect.
function decide(state, req, params, repeated, client) {
  const invalid = (message) => new OAuthError(400, 'invalid_request', message);
  if (repeated.length) throw invalid(`parameters may not be repeated: ${repeated.join(', ')}`);
  if (params.response_type !== 'code') throw new OAuthError(400, 'unsupported_response_type', 'response_type must be "code"');
  if (!params.state) throw invalid('state is required');
  if (params.aud !== state.urls.fhirBase) throw invalid(`aud must be this EHR's FHIR base URL ${state.urls.fhirBase}`);
  if (params.code_challenge_method !== 'S256') throw invalid('code_challenge_method must be S256');
  if (!params.code_challenge || !S256_CHALLENGE.test(params.code_challenge)) {
    throw invalid('code_challenge must be the 43-character base64url SHA-256 of the code_verifier');
  }

  const requested = splitScopes(params.scope);
  if (requested.length === 0) throw new OAuthError(400, 'invalid_scope', 'scope is required');

  // EHR launch: the launch id must be one this EHR issued (via /_test/launches).
  let launch = null;
  if (params.launch !== undefined) {
    launch = state.launches.get(params.launch);
    if (!launch || launch.expires < nowSeconds()) throw invalid('launch is not a launch id issued by this EHR, or it expired');
    if (launch.client_id && launch.client_id !== client.client_id) throw invalid('launch was issued for another client');
    if (!requested.includes('launch')) throw new OAuthError(400, 'invalid_scope', 'an EHR launch must request the "launch" scope');
  } else if (requested.includes('launch')) {
    throw invalid('the "launch" scope needs a launch parameter (EHR launch)');
  }

  const scopes = grantScopes(requested, client, 'user', state.settings.scopesVersion);
  if (scopes.length === 0) throw new OAuthError(400, 'invalid_scope', 'none of the requested scopes is registered for this client');

  const headerDeny = String(req.headers['x-test-deny'] || '').toLowerCase() === 'true';
  if (state.settings.deny || headerDeny) throw new OAuthError(400, 'access_denied', 'the user denied access (test setting)');

  const user = normalizeUser(
    req.headers['x-test-user'] || params._test_user || launch?.context.user || state.settings.autoApproveUser
  );
  if (!user) {
    throw new OAuthError(400, 'access_denied', 'no user: set X-Test-User, the launch user, or /_test/settings auto_approve_user');
  }

  let context;
  if (launch) {
    // EHR launch: the context is the one the EHR recorded for this launch.
    const { user: _launchUser, ...launchContext } = launch.context;
    context = launchContext;
  } else {
    // Standalone launch: stands in for the EHR's patient picker.
    context = {};
    if (scopes.includes('launch/patient')) {
      const patient = req.headers['x-test-patient'] || state.settings.standalonePatient;
      if (!patient) throw new OAuthError(400, 'access_denied', 'no patient selected: set X-Test-Patient or /_test/settings standalone_patient');
      context.patient = stripType(patient, 'Patient');
    }
    if (scopes.includes('launch/encounter')) {
      const encounter = req.headers['x-test-encounter'] || state.settings.standaloneEncounter;
      if (encounter) context.encounter = stripType(encounter, 'Encounter');
    }
  }
  return { scopes, user, context };
}

// The token response's patient/encounter are ids, not references.
export function stripType(value, type) {
  return value.startsWith(`${type}/`) ? value.slice(type.length + 1) : value;
}

function withParams(uri, params) {
  const url = new URL(uri);
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null) url.searchParams.set(k, v);
  return url.toString();
}
