// Everything one EHR instance remembers. One process = one EHR, so this is a
// single object passed to every handler; nothing is global.

import { nowSeconds } from './http.mjs';

export const CODE_TTL_SECONDS = 60;
export const LAUNCH_TTL_SECONDS = 600;

export function createState(config, key) {
  const state = {
    name: config.name,
    key,
    urls: null, // set by setUrls() once the port is known
    clients: new Map(config.clients.map((c) => [c.client_id, c])),
    // What tests change at run time (see /_test/settings).
    settings: {
      tokenTtl: config.tokenTtl,
      refreshTtl: config.refreshTtl,
      refreshRotation: config.refreshRotation,
      codeTtl: CODE_TTL_SECONDS,
      autoApproveUser: config.autoApproveUser,
      standalonePatient: config.standalonePatient,
      standaloneEncounter: null,
      deny: config.deny,
      // OpenID Connect Core §10.1 asks for `kid` only when the JWKS holds several keys: real EHRs
      // (the SMART App Launcher among them) sign id_tokens without one.
      idTokenKid: true,
      // Extra RSA keys published in the JWKS before the signing key (an EHR mid-rotation).
      jwksDecoys: 0,
      // Which SMART scope syntax the EHR understands: 'both', 1 (v1 only: patient/Patient.read;
      // it advertises permission-v1 alone and ignores v2 scopes) or 2 (v2 only).
      scopesVersion: 'both',
      // id_tokens: signed RS256 (the fixture's key) or ES384 (a P-384 key published beside it);
      // fhirUser absolute (SMART 2 asks for a URL) or relative (Type/id, as some EHRs send it);
      // this EHR's clock ahead of (+) or behind (-) real time by this many seconds.
      idTokenAlg: 'RS256',
      fhirUserForm: 'absolute',
      clockSkewSecs: 0,
      // Discovery: whether /.well-known/smart-configuration is served, and whether the
      // CapabilityStatement's oauth-uris name the real endpoints ('same') or others ('elsewhere',
      // an EHR whose two documents disagree).
      smartConfiguration: true,
      metadataOauthUris: 'same',
      // How the user signed in, as the id_token tells it: `amr` (RFC 8176; null: no amr claim, as
      // many EHRs send) and `acr` (null: none). A password and a one-time code by default.
      idTokenAmr: ['pwd', 'otp'],
      idTokenAcr: null,
      // The id_token's aud: null is the client's id, as SMART requires; a string plays an EHR
      // that issues it for another app (a fault Courier must refuse and name).
      idTokenAud: null,
      // The id_token's azp (OpenID Connect: the party it was issued to); null: none.
      idTokenAzp: null,
      // The token_type of user grants' token responses (SMART: "Bearer").
      tokenType: 'Bearer',
      // expires_in in token responses: 'number' (RFC 6749), or 'string' ("3600") or 'fraction'
      // (3600.5), as some EHRs send it.
      expiresInForm: 'number',
      // Backend Services elsewhere: a second token endpoint at this path (client_credentials
      // only; discovery does not name it), and whether /token still grants client_credentials.
      backendTokenPath: null,
      tokenClientCredentials: true,
      // Write-back compatibility: 'honoured', or the status (400, 412, 501) with which a create
      // carrying If-None-Exist is refused (a server without conditional create); 'honoured' or
      // 'refused' (400) for a request carrying `Prefer: handling=…`; and the path of another
      // FHIR base that alone takes AuditEvents (/fhir then has no AuditEvent type).
      ifNoneExist: 'honoured',
      preferHandling: 'honoured',
      auditPath: null,
    },
    // The P-384 key, made when first asked for (id_token_alg ES384).
    ecKey: null,
    decoyKeys: [], // public JWKs, made when jwks_decoys is set
    down: null, // {status, retry_after} while "down"
    faults: { drop_response_after_write: 0 },
    launches: new Map(), // launch id -> {context, client_id, expires}
    codes: new Map(), // code -> {..., expires, used, family}
    refreshTokens: new Map(), // token -> {..., expires, used, family}
    families: new Map(), // family id -> {client_id, revoked}
    seenJti: new Map(), // `${client_id} ${jti}` -> exp (seconds); replay protection
    writes: [], // log of every FHIR write through /fhir
    counters: null,
  };
  resetCounters(state);
  return state;
}

export function setUrls(state, port) {
  const origin = `http://127.0.0.1:${port}`;
  state.urls = {
    origin,
    fhirBase: `${origin}/fhir`,
    // The OpenID issuer is the FHIR base: SMART clients discover it from there.
    issuer: `${origin}/fhir`,
    authorize: `${origin}/authorize`,
    token: `${origin}/token`,
    jwks: `${origin}/jwks.json`,
  };
  setSettingUrls(state);
}

// URLs that follow from settings (the backend token endpoint, the AuditEvent base).
export function setSettingUrls(state) {
  const { origin } = state.urls;
  state.urls.backendToken = state.settings.backendTokenPath ? `${origin}${state.settings.backendTokenPath}` : null;
  state.urls.auditBase = state.settings.auditPath ? `${origin}${state.settings.auditPath}` : null;
}

export function resetCounters(state) {
  state.counters = {
    authorize: { requests: 0, approved: 0, denied: 0, rejected: 0 },
    token: { requests: 0, issued: 0, by_grant_type: {}, by_client: {}, by_endpoint: {}, errors: {} },
    fhir: { requests: 0, unauthorized: 0, forbidden: 0, by_status: {}, refused: { if_none_exist: 0, prefer: 0 } },
    jwks_fetches: 0,
    down_rejected: 0,
    dropped_responses: 0,
  };
}

export function bump(map, key) {
  map[key] = (map[key] || 0) + 1;
}

// Forget expired codes, launches, refresh tokens and jti entries. Called on each
// token/authorize request so memory stays bounded without a timer.
export function prune(state) {
  const now = nowSeconds();
  for (const map of [state.codes, state.launches, state.refreshTokens]) {
    for (const [k, v] of map) if (v.expires < now - 60) map.delete(k);
  }
  for (const [k, exp] of state.seenJti) if (exp < now) state.seenJti.delete(k);
}
