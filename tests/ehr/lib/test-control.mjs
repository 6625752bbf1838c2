// /_test/*: the test-control API. Nothing here exists on a real EHR; it is how a
// test plays the EHR's user and operator (start a launch, seed the chart, take the
// EHR down) and how it looks inside (what was written, how many token requests).
// It answers even while the EHR is "down", and it needs no token.

import * as jose from 'jose';
import { normalizeUser, stripType } from './authorize.mjs';
import { normalizeClient } from './clients.mjs';
import { HttpError, nowSeconds, randomToken, readJsonBody, sendJson } from './http.mjs';
import { LAUNCH_TTL_SECONDS, resetCounters, setSettingUrls } from './state.mjs';

const LAUNCH_FIELDS = ['need_patient_banner', 'smart_style_url', 'fhirContext', 'intent', 'tenant'];

export function createTestControl(state, tokens, fhir) {
  const routes = {
    'GET /_test': () => ({
      name: state.name,
      urls: state.urls,
      down: state.down,
      endpoints: Object.keys(routes),
    }),

    // An EHR launch as the EHR would start it: returns the launch id to put in
    // the app's launch URL (?iss=<fhir base>&launch=<id>).
    'POST /_test/launches': async (body = {}) => {
      const context = {};
      if (body.patient) context.patient = stripType(String(body.patient), 'Patient');
      if (body.encounter) context.encounter = stripType(String(body.encounter), 'Encounter');
      if (body.user) context.user = normalizeUser(String(body.user));
      for (const field of LAUNCH_FIELDS) if (body[field] !== undefined) context[field] = body[field];
      if (context.fhirContext !== undefined && !Array.isArray(context.fhirContext)) {
        throw new HttpError(400, 'fhirContext must be an array of objects, e.g. [{"reference": "Appointment/1"}]');
      }
      const launch = randomToken(16);
      state.launches.set(launch, { context, client_id: body.client_id ?? null, expires: nowSeconds() + LAUNCH_TTL_SECONDS });
      return { launch, iss: state.urls.fhirBase, expires_in: LAUNCH_TTL_SECONDS, context };
    },

    // Seed resources: one resource, a list, or a Bundle. Ids are kept (PUT semantics).
    'POST /_test/seed': async (body) => {
      let resources;
      if (Array.isArray(body)) resources = body;
      else if (body?.resourceType === 'Bundle') resources = (body.entry ?? []).map((e) => e.resource);
      else resources = [body];
      try {
        return { stored: await fhir.seed(resources) };
      } catch (e) {
        throw new HttpError(400, e.message, e.outcome ? { outcome: e.outcome } : undefined);
      }
    },

    // Every write made through /fhir (creates, updates, conditional-create matches), in order.
    'GET /_test/writes': () => ({ writes: state.writes }),

    'POST /_test/down': async (body = {}) => {
      const status = body.status ?? 503;
      if (!Number.isInteger(status) || status < 400 || status > 599) throw new HttpError(400, 'status must be 4xx or 5xx');
      state.down = { status, retry_after: body.retry_after ?? null };
      return { down: state.down };
    },
    'POST /_test/up': () => {
      state.down = null;
      return { down: null };
    },

    'GET /_test/settings': () => publicSettings(state),
    'POST /_test/settings': async (body = {}) => {
      const s = state.settings;
      const set = (key, field, check) => {
        if (body[key] === undefined) return;
        if (!check(body[key])) throw new HttpError(400, `invalid value for ${key}`);
        s[field] = body[key];
      };
      const isUserish = (v) => v === null || typeof v === 'string';
      const isSeconds = (v) => Number.isInteger(v) && v > 0;
      set('auto_approve_user', 'autoApproveUser', isUserish);
      set('standalone_patient', 'standalonePatient', isUserish);
      set('standalone_encounter', 'standaloneEncounter', isUserish);
      set('deny', 'deny', (v) => typeof v === 'boolean');
      set('token_ttl', 'tokenTtl', isSeconds);
      set('refresh_ttl', 'refreshTtl', isSeconds);
      set('refresh_rotation', 'refreshRotation', (v) => typeof v === 'boolean');
      set('code_ttl', 'codeTtl', isSeconds);
      set('id_token_kid', 'idTokenKid', (v) => typeof v === 'boolean');
      set('jwks_decoys', 'jwksDecoys', (v) => Number.isInteger(v) && v >= 0 && v <= 8);
      set('scopes_version', 'scopesVersion', (v) => v === 'both' || v === 1 || v === 2);
      set('id_token_alg', 'idTokenAlg', (v) => v === 'RS256' || v === 'ES384');
      set('fhir_user_form', 'fhirUserForm', (v) => v === 'absolute' || v === 'relative');
      set('clock_skew_secs', 'clockSkewSecs', (v) => Number.isInteger(v) && Math.abs(v) <= 3600);
      set('smart_configuration', 'smartConfiguration', (v) => typeof v === 'boolean');
      set('metadata_oauth_uris', 'metadataOauthUris', (v) => v === 'same' || v === 'elsewhere');
      set('id_token_amr', 'idTokenAmr', (v) => v === null || (Array.isArray(v) && v.every((m) => typeof m === 'string')));
      set('id_token_acr', 'idTokenAcr', (v) => v === null || typeof v === 'string');
      set('id_token_aud', 'idTokenAud', (v) => v === null || (typeof v === 'string' && v.length > 0) || (Array.isArray(v) && v.length > 0 && v.every((a) => typeof a === 'string' && a.length > 0)));
      set('id_token_azp', 'idTokenAzp', (v) => v === null || (typeof v === 'string' && v.length > 0));
      set('token_type', 'tokenType', (v) => typeof v === 'string' && v.length > 0);
      set('expires_in_form', 'expiresInForm', (v) => v === 'number' || v === 'string' || v === 'fraction');
      set('backend_token_path', 'backendTokenPath', (v) => v === null || isFreePath(v));
      set('token_client_credentials', 'tokenClientCredentials', (v) => typeof v === 'boolean');
      set('if_none_exist', 'ifNoneExist', (v) => v === 'honoured' || v === 400 || v === 412 || v === 501);
      set('prefer_handling', 'preferHandling', (v) => v === 'honoured' || v === 'refused');
      set('audit_path', 'auditPath', (v) => v === null || isFreePath(v, true));
      if (s.backendTokenPath !== null && s.backendTokenPath === s.auditPath) throw new HttpError(400, 'backend_token_path and audit_path must differ');
      setSettingUrls(state);
      if (s.idTokenAlg === 'ES384' && !state.ecKey) {
        const { publicKey, privateKey } = await jose.generateKeyPair('ES384', { extractable: true });
        const jwk = await jose.exportJWK(publicKey);
        const kid = await jose.calculateJwkThumbprint(jwk);
        state.ecKey = { kid, privateKey, jwk: { ...jwk, kid, alg: 'ES384', use: 'sig' } };
      }
      while (state.decoyKeys.length < s.jwksDecoys) {
        const { publicKey } = await jose.generateKeyPair('RS256', { extractable: true });
        state.decoyKeys.push({ ...(await jose.exportJWK(publicKey)), kid: `decoy-${state.decoyKeys.length + 1}`, alg: 'RS256', use: 'sig' });
      }
      return publicSettings(state);
    },

    'GET /_test/counters': () => state.counters,
    'POST /_test/counters/reset': () => {
      resetCounters(state);
      return state.counters;
    },

    'GET /_test/clients': () => ({ clients: [...state.clients.values()] }),
    'POST /_test/clients': async (body) => {
      let client;
      try {
        client = normalizeClient(body);
      } catch (e) {
        throw new HttpError(400, e.message);
      }
      state.clients.set(client.client_id, client);
      return { registered: client };
    },

    // The next N successful FHIR writes are committed but their response is never sent.
    'POST /_test/faults': async (body = {}) => {
      const n = body.drop_response_after_write ?? 0;
      if (!Number.isInteger(n) || n < 0) throw new HttpError(400, 'drop_response_after_write must be a non-negative integer');
      state.faults.drop_response_after_write = n;
      return { faults: state.faults };
    },

    // Revoke every grant (or one client's): its access and refresh tokens stop working.
    'POST /_test/revoke': async (body = {}) => ({ revoked_grants: tokens.revokeAll(body.client_id) }),
  };

  return async function handleTest(req, res, url) {
    const path = url.pathname.replace(/\/+$/, '');
    try {
      // GET /_test/resources/<Type>: everything stored of that type.
      const typed = /^\/_test\/resources\/([A-Za-z]+)$/.exec(path);
      if (typed && req.method === 'GET') {
        let resources;
        try {
          resources = await fhir.list(typed[1]);
        } catch (e) {
          throw new HttpError(404, e.message);
        }
        return sendJson(res, 200, { resourceType: typed[1], count: resources.length, resources });
      }
      const route = routes[`${req.method} ${path}`];
      if (!route) throw new HttpError(404, `no test-control route ${req.method} ${path}`);
      const body = req.method === 'POST' ? await readJsonBody(req) : undefined;
      return sendJson(res, 200, await route(body));
    } catch (e) {
      if (e instanceof HttpError) return sendJson(res, e.status, { error: e.message, ...e.details });
      throw e;
    }
  };
}

function publicSettings(state) {
  const s = state.settings;
  return {
    auto_approve_user: s.autoApproveUser,
    standalone_patient: s.standalonePatient,
    standalone_encounter: s.standaloneEncounter,
    deny: s.deny,
    token_ttl: s.tokenTtl,
    refresh_ttl: s.refreshTtl,
    refresh_rotation: s.refreshRotation,
    code_ttl: s.codeTtl,
    id_token_kid: s.idTokenKid,
    jwks_decoys: s.jwksDecoys,
    scopes_version: s.scopesVersion,
    id_token_alg: s.idTokenAlg,
    fhir_user_form: s.fhirUserForm,
    clock_skew_secs: s.clockSkewSecs,
    smart_configuration: s.smartConfiguration,
    metadata_oauth_uris: s.metadataOauthUris,
    id_token_amr: s.idTokenAmr,
    id_token_acr: s.idTokenAcr,
    id_token_aud: s.idTokenAud,
    id_token_azp: s.idTokenAzp,
    token_type: s.tokenType,
    expires_in_form: s.expiresInForm,
    backend_token_path: s.backendTokenPath,
    token_client_credentials: s.tokenClientCredentials,
    if_none_exist: s.ifNoneExist,
    prefer_handling: s.preferHandling,
    audit_path: s.auditPath,
    backend_token_url: state.urls.backendToken,
    audit_base: state.urls.auditBase,
  };
}

// A path for an extra endpoint: absolute, plain, and clear of the fixture's own routes. An
// AuditEvent base may sit below the FHIR base (`/fhir/audit`), but not on a resource type's path.
function isFreePath(v, belowFhir = false) {
  if (typeof v !== 'string' || !/^(\/[A-Za-z0-9._~-]+)+$/.test(v)) return false;
  if (belowFhir && /^\/fhir\/[a-z][A-Za-z0-9._~-]*$/.test(v)) return v !== '/fhir/metadata';
  const taken = ['/_test', '/fhir', '/authorize', '/token', '/jwks.json', '/smart-style.json'];
  return !taken.some((t) => v === t || v.startsWith(`${t}/`));
}
