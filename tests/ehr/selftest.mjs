#!/usr/bin/env node
// Self-test of the test EHR: two EHR processes at once, real keys, real crypto.
// Run: cd tests/ehr && npm install && node selftest.mjs
// Last line: "N passed, M failed"; exit status 1 on any failure.

import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as jose from 'jose';
import { assert, assertEq, check, postJson, request, results, startEhr, startJwksServer } from './selftest-lib/harness.mjs';
import {
  ASSERTION_TYPE,
  authenticatedTokenRequest,
  authorize,
  clientAssertion,
  clientKey,
  pkce,
  tokenRequest,
  unsignedAssertion,
} from './selftest-lib/smart-client.mjs';

// Whole-run bound: whatever hangs, the self-test ends.
const WATCHDOG_MS = 180_000;
const started = [];
const watchdog = setTimeout(async () => {
  console.log(`watchdog: self-test exceeded ${WATCHDOG_MS} ms`);
  await Promise.all(started.map((e) => e.stop()));
  console.log(`${results.passed} passed, ${results.failed + 1} failed`);
  process.exit(1);
}, WATCHDOG_MS);

// --- the client (Courier's stand-in) ------------------------------------------------

const esKey = await clientKey('ES384');
const rsKey = await clientKey('RS384');
const jwksServer = await startJwksServer(() => ({ keys: [esKey.publicJwk, rsKey.publicJwk] }));
const redirectUri = `${jwksServer.origin}/callback`;
const courier = {
  client_id: 'courier',
  jwks_url: jwksServer.url,
  redirect_uris: [redirectUri],
  scopes: [
    'launch', 'launch/patient', 'launch/encounter', 'openid', 'fhirUser', 'offline_access', 'online_access',
    'patient/*.rs', 'user/*.rs', 'user/AuditEvent.c', 'user/Communication.cru',
    'system/*.rs', 'system/AuditEvent.c', 'system/Communication.c',
  ],
};
// A second client registered with an inline JWKS instead of a URL.
const backendKey = await clientKey('RS384');
const backend = { client_id: 'courier-backend', jwks: { keys: [backendKey.publicJwk] }, redirect_uris: [], scopes: ['system/AuditEvent.c', 'system/AuditEvent.rs'] };

// EHR A gets its clients from a file; EHR B gets them through /_test/clients.
const dir = mkdtempSync(join(tmpdir(), 'courier-ehr-selftest-'));
const clientsFile = join(dir, 'clients.json');
writeFileSync(clientsFile, JSON.stringify([courier, backend]));

let ehrA;
let ehrB;
try {
  [ehrA, ehrB] = await Promise.all([
    startEhr(['--name', 'ehr-a', '--clients', clientsFile, '--quiet']),
    startEhr(['--name', 'ehr-b', '--quiet']),
  ]);
  started.push(ehrA, ehrB);
  await run();
} catch (err) {
  results.failed++;
  console.log(`FAIL setup: ${err.stack || err}`);
} finally {
  await Promise.all(started.map((e) => e.stop()));
  await jwksServer.close();
  rmSync(dir, { recursive: true, force: true });
  clearTimeout(watchdog);
}
if (results.failures.length) console.log(`failed checks: ${results.failures.join('; ')}`);
console.log(`${results.passed} passed, ${results.failed} failed`);
process.exit(results.failed ? 1 : 0);

// --- helpers bound to an EHR ------------------------------------------------------

function test(ehr, path) {
  return `${ehr.origin}/_test${path}`;
}

// The authorization request Courier would send; `extra` overrides any parameter.
function authParams(ehr, challenge, extra = {}) {
  return {
    response_type: 'code',
    client_id: courier.client_id,
    redirect_uri: redirectUri,
    scope: 'openid fhirUser offline_access patient/*.rs',
    state: `st-${Math.random().toString(36).slice(2)}`,
    aud: ehr.base,
    code_challenge: challenge,
    code_challenge_method: 'S256',
    ...extra,
  };
}

// /authorize -> code. Fails the check unless the EHR approved.
async function getCode(ehr, extra = {}, headers = {}) {
  const p = pkce();
  const params = authParams(ehr, p.challenge, extra);
  const auth = await authorize(ehr.authorize, params, headers);
  assertEq(auth.status, 302, `authorize status (${JSON.stringify(auth.body)})`);
  assert(auth.location.startsWith(redirectUri), `redirects to the registered redirect_uri, got ${auth.location}`);
  assert(auth.params.code, `redirect carries a code: ${auth.location}`);
  assertEq(auth.params.state, params.state, 'state echoed');
  return { code: auth.params.code, verifier: p.verifier, params };
}

function redeem(ehr, code, verifier, key = esKey, overrides = {}) {
  return authenticatedTokenRequest(ehr, courier, key, {
    grant_type: 'authorization_code',
    code,
    redirect_uri: redirectUri,
    code_verifier: verifier,
    ...overrides,
  });
}

function fhir(ehr, path, token, options = {}) {
  const headers = { Accept: 'application/fhir+json', ...options.headers };
  if (token) headers.Authorization = `Bearer ${token}`;
  return request(`${ehr.base}/${path}`, { ...options, headers });
}

function fhirPost(ehr, path, token, resource, headers = {}) {
  return fhir(ehr, path, token, {
    method: 'POST',
    headers: { 'Content-Type': 'application/fhir+json', ...headers },
    body: JSON.stringify(resource),
  });
}

function expectOAuthError(response, status, error, messagePart) {
  assertEq(response.status, status, `status (${JSON.stringify(response.body)})`);
  assertEq(response.body?.error, error, 'error code');
  if (messagePart) assert(String(response.body.error_description).includes(messagePart), `description mentions "${messagePart}": ${response.body.error_description}`);
}

function auditEvent(outboxId, patient) {
  return {
    resourceType: 'AuditEvent',
    type: { system: 'http://dicom.nema.org/resources/ontology/DCM', code: '110110', display: 'Patient Record' },
    action: 'R',
    recorded: new Date().toISOString(),
    outcome: '0',
    agent: [{ requestor: true, who: { display: 'Courier' } }],
    source: { observer: { display: 'Courier' } },
    // R4 AuditEvent has no identifier element: the outbox id travels as the
    // logical identifier of an entity, searchable as entity:identifier.
    entity: [{ what: { identifier: { system: 'urn:courier:outbox', value: outboxId } } }, { what: { reference: `Patient/${patient}` } }],
  };
}

// --- the checks ---------------------------------------------------------------------

async function run() {
  await postJson(test(ehrB, '/clients'), courier).then((r) => assertEq(r.status, 200, 'register client at EHR B'));
  await seed();

  let smartA;
  await check('two EHRs run at once on distinct loopback ports', async () => {
    assert(ehrA.port !== ehrB.port, 'ports differ');
    assert(ehrA.base.startsWith('http://127.0.0.1:') && ehrB.base.startsWith('http://127.0.0.1:'), 'loopback bases');
    assert(ehrA.pid !== ehrB.pid, 'separate processes');
  });

  await check('discovery: smart-configuration and metadata oauth-uris (public)', async () => {
    const smart = await request(`${ehrA.base}/.well-known/smart-configuration`);
    assertEq(smart.status, 200, 'smart-configuration status');
    smartA = smart.body;
    assertEq(smartA.issuer, ehrA.issuer, 'issuer');
    assertEq(smartA.authorization_endpoint, ehrA.authorize, 'authorization_endpoint');
    assertEq(smartA.token_endpoint, ehrA.token, 'token_endpoint');
    assertEq(smartA.token_endpoint_auth_methods_supported, ['private_key_jwt'], 'auth methods');
    assertEq(smartA.token_endpoint_auth_signing_alg_values_supported, ['RS384', 'ES384'], 'signing algs');
    assertEq(smartA.code_challenge_methods_supported, ['S256'], 'PKCE methods');
    for (const cap of ['launch-ehr', 'launch-standalone', 'client-confidential-asymmetric', 'context-ehr-patient', 'sso-openid-connect', 'permission-v2']) {
      assert(smartA.capabilities.includes(cap), `capability ${cap}`);
    }
    const meta = await request(`${ehrA.base}/metadata`);
    assertEq(meta.status, 200, 'metadata status without a token');
    assertEq(meta.body.fhirVersion, '4.0.1', 'fhirVersion');
    const ext = meta.body.rest[0].security.extension.find((e) => e.url.endsWith('/oauth-uris'));
    const uris = Object.fromEntries(ext.extension.map((e) => [e.url, e.valueUri]));
    assertEq(uris, { authorize: ehrA.authorize, token: ehrA.token }, 'oauth-uris');
    const jwks = await request(smartA.jwks_uri);
    assert(jwks.body.keys.length === 1 && jwks.body.keys[0].kty === 'RSA', 'fixture JWKS has its RSA key');
  });

  await check('FHIR without a token, or with a foreign token, is 401', async () => {
    const none = await fhir(ehrA, 'Patient/p1');
    assertEq(none.status, 401, 'no token');
    assert(none.headers.get('www-authenticate')?.startsWith('Bearer'), 'WWW-Authenticate: Bearer');
    const junk = await fhir(ehrA, 'Patient/p1', 'not-a-token');
    assertEq(junk.status, 401, 'junk token');
  });

  // EHR launch: launch id from the EHR -> authorize -> code -> token (PKCE + ES384 assertion).
  let launchTokens;
  await check('EHR launch: launch id -> authorize -> code -> token with PKCE + private_key_jwt (ES384)', async () => {
    const launch = await postJson(test(ehrA, '/launches'), {
      patient: 'p1',
      encounter: 'Encounter/e1',
      user: 'Practitioner/dr-1',
      need_patient_banner: false,
      smart_style_url: `${ehrA.origin}/style.json`,
      fhirContext: [{ reference: 'Encounter/e1' }],
      intent: 'message-review',
      tenant: 'tenant-a',
    });
    assertEq(launch.status, 200, 'launch created');
    const { code, verifier, params } = await getCode(ehrA, {
      launch: launch.body.launch,
      scope: 'launch openid fhirUser online_access patient/*.rs user/AuditEvent.c',
      nonce: 'n-0S6_WzA2Mj',
    });
    const response = await redeem(ehrA, code, verifier, esKey);
    assertEq(response.status, 200, `token status (${JSON.stringify(response.body)})`);
    const t = response.body;
    assertEq(response.headers.get('cache-control'), 'no-store', 'Cache-Control: no-store');
    assertEq(t.token_type, 'Bearer', 'token_type');
    assertEq(t.expires_in, 300, 'expires_in default');
    assertEq(t.scope, params.scope, 'scope granted as asked');
    assertEq(t.patient, 'p1', 'patient context');
    assertEq(t.encounter, 'e1', 'encounter context');
    assertEq(t.need_patient_banner, false, 'need_patient_banner');
    assertEq(t.smart_style_url, `${ehrA.origin}/style.json`, 'smart_style_url');
    assertEq(t.fhirContext, [{ reference: 'Encounter/e1' }], 'fhirContext');
    assertEq(t.intent, 'message-review', 'intent');
    assertEq(t.tenant, 'tenant-a', 'tenant');
    assert(t.refresh_token, 'online_access gives a refresh_token');
    // The id_token is checked against the keys the EHR publishes at jwks_uri.
    const { payload } = await jose.jwtVerify(t.id_token, jose.createRemoteJWKSet(new URL(smartA.jwks_uri)), {
      issuer: smartA.issuer,
      audience: courier.client_id,
      algorithms: ['RS256'],
    });
    assertEq(payload.sub, 'Practitioner/dr-1', 'id_token sub');
    assertEq(payload.fhirUser, `${ehrA.base}/Practitioner/dr-1`, 'id_token fhirUser');
    assertEq(payload.nonce, 'n-0S6_WzA2Mj', 'id_token nonce');
    assert(payload.iat && payload.exp > payload.iat, 'id_token iat/exp');
    launchTokens = t;
  });

  await check('FHIR read of the launch patient with the access token', async () => {
    const read = await fhir(ehrA, `Patient/${launchTokens.patient}`, launchTokens.access_token);
    assertEq(read.status, 200, 'read status');
    assertEq(read.body.name[0].family, 'Launch', 'patient name');
    assert(read.headers.get('etag')?.startsWith('W/"'), 'ETag');
    const search = await fhir(ehrA, `Encounter?patient=${launchTokens.patient}`, launchTokens.access_token);
    assertEq(search.status, 200, 'search status');
    assertEq(search.body.total, 1, 'one encounter for the patient (patient=<id> means Patient/<id>)');
    assertEq(search.body.entry[0].fullUrl, `${ehrA.base}/Encounter/e1`, 'fullUrl');
  });

  await check('a token from EHR A is refused by EHR B', async () => {
    const r = await fhir(ehrB, 'Patient/pb', launchTokens.access_token);
    assertEq(r.status, 401, 'cross-EHR token');
  });

  await check('scopes are enforced on /fhir (403 without a matching scope)', async () => {
    const r = await fhirPost(ehrA, 'Communication', launchTokens.access_token, {
      resourceType: 'Communication',
      status: 'completed',
    });
    assertEq(r.status, 403, 'create Communication without a c scope');
  });

  await check('standalone launch at EHR B (RS384 assertion, auto-approve user, patient picker stand-in)', async () => {
    const settings = await postJson(test(ehrB, '/settings'), { auto_approve_user: 'Practitioner/dr-b', standalone_patient: 'pb' });
    assertEq(settings.status, 200, 'settings');
    const smartB = (await request(`${ehrB.base}/.well-known/smart-configuration`)).body;
    assert(smartB.issuer !== smartA.issuer, 'distinct issuers');
    const { code, verifier } = await getCode(ehrB, { scope: 'launch/patient openid fhirUser offline_access patient/*.rs' });
    const response = await redeem(ehrB, code, verifier, rsKey);
    assertEq(response.status, 200, `token status (${JSON.stringify(response.body)})`);
    assertEq(response.body.patient, 'pb', 'picked patient');
    assert(response.body.encounter === undefined, 'no encounter without launch/encounter');
    const { payload } = await jose.jwtVerify(response.body.id_token, jose.createRemoteJWKSet(new URL(smartB.jwks_uri)), {
      issuer: smartB.issuer,
      audience: courier.client_id,
    });
    assertEq(payload.fhirUser, `${ehrB.base}/Practitioner/dr-b`, 'fhirUser from auto-approve');
    const read = await fhir(ehrB, 'Patient/pb', response.body.access_token);
    assertEq(read.status, 200, 'read at B');
    // X-Test-User decides the user for one request, over the auto-approve setting.
    const other = await getCode(ehrB, { scope: 'launch/patient openid fhirUser patient/*.rs' }, { 'X-Test-User': 'Practitioner/dr-x' });
    const r2 = await redeem(ehrB, other.code, other.verifier, rsKey);
    assertEq(jose.decodeJwt(r2.body.id_token).sub, 'Practitioner/dr-x', 'X-Test-User');
    assert(r2.body.refresh_token === undefined, 'no refresh_token without offline_access/online_access');
    // How the user signed in: amr by default ["pwd", "otp"]; id_token_amr/id_token_acr change it.
    assertEq(JSON.stringify(jose.decodeJwt(r2.body.id_token).amr), '["pwd","otp"]', 'default amr');
    assertEq((await postJson(test(ehrB, '/settings'), { id_token_amr: null, id_token_acr: 'urn:loa:2' })).status, 200, 'amr settings');
    assertEq((await postJson(test(ehrB, '/settings'), { id_token_amr: 'mfa' })).status, 400, 'amr must be an array');
    const third = await getCode(ehrB, { scope: 'launch/patient openid fhirUser patient/*.rs' });
    const r3 = jose.decodeJwt((await redeem(ehrB, third.code, third.verifier, rsKey)).body.id_token);
    assert(r3.amr === undefined && r3.acr === 'urn:loa:2', 'no amr, an acr');
    await postJson(test(ehrB, '/settings'), { id_token_amr: ['pwd', 'otp'], id_token_acr: null });
  });

  await check('refresh: rotating refresh token, narrowed scope, replay revokes the grant', async () => {
    const first = await authenticatedTokenRequest(ehrA, courier, rsKey, { grant_type: 'refresh_token', refresh_token: launchTokens.refresh_token });
    assertEq(first.status, 200, `refresh status (${JSON.stringify(first.body)})`);
    assert(first.body.refresh_token && first.body.refresh_token !== launchTokens.refresh_token, 'a new refresh token');
    assertEq(first.body.patient, 'p1', 'context again on refresh');
    assertEq((await fhir(ehrA, 'Patient/p1', first.body.access_token)).status, 200, 'refreshed token works');
    const narrowed = await authenticatedTokenRequest(ehrA, courier, esKey, {
      grant_type: 'refresh_token',
      refresh_token: first.body.refresh_token,
      scope: 'patient/*.rs',
    });
    assertEq(narrowed.status, 200, 'narrowing refresh');
    assertEq(narrowed.body.scope, 'patient/*.rs', 'narrowed scope');
    const wider = await authenticatedTokenRequest(ehrA, courier, esKey, {
      grant_type: 'refresh_token',
      refresh_token: narrowed.body.refresh_token,
      scope: 'patient/*.rs user/*.rs',
    });
    expectOAuthError(wider, 400, 'invalid_scope');
    // The first refresh token was rotated away: using it again revokes the whole grant.
    const replay = await authenticatedTokenRequest(ehrA, courier, esKey, { grant_type: 'refresh_token', refresh_token: launchTokens.refresh_token });
    expectOAuthError(replay, 400, 'invalid_grant', 'already used');
    assertEq((await fhir(ehrA, 'Patient/p1', narrowed.body.access_token)).status, 401, 'grant revoked after replay');
  });

  let backendToken;
  await check('client_credentials (backend services) with an inline-JWKS client', async () => {
    const r = await authenticatedTokenRequest(ehrA, backend, backendKey, {
      grant_type: 'client_credentials',
      scope: 'system/AuditEvent.c system/AuditEvent.rs system/Patient.rs',
    });
    assertEq(r.status, 200, `status (${JSON.stringify(r.body)})`);
    assertEq(r.body.scope, 'system/AuditEvent.c system/AuditEvent.rs', 'unregistered scope dropped');
    assert(r.body.refresh_token === undefined && r.body.id_token === undefined, 'no refresh_token or id_token');
    const claims = jose.decodeJwt(r.body.access_token);
    assertEq(claims.sub, backend.client_id, 'subject is the client');
    backendToken = r.body.access_token;
    const userOnly = await authenticatedTokenRequest(ehrA, backend, backendKey, { grant_type: 'client_credentials', scope: 'patient/*.rs' });
    expectOAuthError(userOnly, 400, 'invalid_scope');
  });

  await check('conditional create of an AuditEvent twice with one identifier stores exactly one', async () => {
    const outboxId = `outbox-${Date.now()}`;
    const ifNoneExist = `entity:identifier=urn:courier:outbox|${outboxId}`;
    const first = await fhirPost(ehrA, 'AuditEvent', backendToken, auditEvent(outboxId, 'p1'), { 'If-None-Exist': ifNoneExist });
    assertEq(first.status, 201, `first create (${JSON.stringify(first.body)})`);
    assert(first.headers.get('location')?.startsWith(`${ehrA.base}/AuditEvent/${first.body.id}/_history/`), 'Location');
    // A different outbox id must not match the first one.
    const other = await fhirPost(ehrA, 'AuditEvent', backendToken, auditEvent(`${outboxId}-other`, 'p1'), {
      'If-None-Exist': `entity:identifier=urn:courier:outbox|${outboxId}-other`,
    });
    assertEq(other.status, 201, 'another identifier creates');
    assert(other.body.id !== first.body.id, 'another resource');
    const second = await fhirPost(ehrA, 'AuditEvent', backendToken, auditEvent(outboxId, 'p1'), { 'If-None-Exist': ifNoneExist });
    assertEq(second.status, 200, 'second create matches');
    assertEq(second.body.id, first.body.id, 'same resource');
    const stored = await request(test(ehrA, '/resources/AuditEvent'));
    const mine = stored.body.resources.filter((r) => r.entity.some((e) => e.what.identifier?.value === outboxId));
    assertEq(mine.length, 1, 'exactly one stored');
    const search = await fhir(ehrA, `AuditEvent?entity:identifier=${encodeURIComponent(`urn:courier:outbox|${outboxId}`)}`, backendToken);
    assertEq(search.body.total, 1, 'searchable by entity:identifier');
    const writes = (await request(test(ehrA, '/writes'))).body.writes.filter((w) => w.id === first.body.id);
    assertEq(writes.map((w) => w.status), [201, 200], 'write log shows create then match');
  });

  await check('a write whose response is lost is retried once and still stored once', async () => {
    const outboxId = `outbox-lost-${Date.now()}`;
    const ifNoneExist = `entity:identifier=urn:courier:outbox|${outboxId}`;
    await postJson(test(ehrA, '/faults'), { drop_response_after_write: 1 });
    let lost = false;
    try {
      await fhirPost(ehrA, 'AuditEvent', backendToken, auditEvent(outboxId, 'p1'), { 'If-None-Exist': ifNoneExist });
    } catch {
      lost = true; // the connection was closed after the commit
    }
    assert(lost, 'first response was dropped');
    const retry = await fhirPost(ehrA, 'AuditEvent', backendToken, auditEvent(outboxId, 'p1'), { 'If-None-Exist': ifNoneExist });
    assertEq(retry.status, 200, 'retry finds the committed write');
    const stored = (await request(test(ehrA, '/resources/AuditEvent'))).body.resources;
    assertEq(stored.filter((r) => r.entity.some((e) => e.what.identifier?.value === outboxId)).length, 1, 'exactly one stored');
  });

  await check('writes are validated as R4, and unknown search parameters are 400, not a silent duplicate', async () => {
    const withIdentifier = { ...auditEvent('x', 'p1'), identifier: [{ value: 'x' }] }; // not an R4 element
    const r1 = await fhirPost(ehrA, 'AuditEvent', backendToken, withIdentifier);
    assertEq(r1.status, 400, 'R4 AuditEvent has no identifier');
    assertEq(r1.body.resourceType, 'OperationOutcome', 'OperationOutcome');
    const before = (await request(test(ehrA, '/resources/AuditEvent'))).body.count;
    const r2 = await fhirPost(ehrA, 'AuditEvent', backendToken, auditEvent('y', 'p1'), { 'If-None-Exist': 'identifier=urn:x|y' });
    assertEq(r2.status, 400, 'unknown parameter in If-None-Exist');
    assertEq((await request(test(ehrA, '/resources/AuditEvent'))).body.count, before, 'nothing stored');
  });

  await check('conditional create of a Communication by identifier (user token)', async () => {
    const { code, verifier } = await getCode(ehrA, { scope: 'openid fhirUser user/Communication.cru user/*.rs' }, { 'X-Test-User': 'Practitioner/dr-1' });
    const t = (await redeem(ehrA, code, verifier)).body;
    const msg = {
      resourceType: 'Communication',
      status: 'completed',
      identifier: [{ system: 'urn:courier:message', value: 'm-1' }],
      subject: { reference: 'Patient/p1' },
      payload: [{ contentString: 'hello' }],
    };
    const a = await fhirPost(ehrA, 'Communication', t.access_token, msg, { 'If-None-Exist': 'identifier=urn:courier:message|m-1' });
    const b = await fhirPost(ehrA, 'Communication', t.access_token, msg, { 'If-None-Exist': 'identifier=urn:courier:message|m-1' });
    assertEq([a.status, b.status], [201, 200], 'created then matched');
    assertEq(b.body.id, a.body.id, 'same id');
    const upd = await fhir(ehrA, `Communication/${a.body.id}`, t.access_token, {
      method: 'PUT',
      headers: { 'Content-Type': 'application/fhir+json' },
      body: JSON.stringify({ ...a.body, status: 'entered-in-error' }),
    });
    assertEq(upd.status, 200, 'update');
    assert(upd.body.meta.versionId !== a.body.meta.versionId, 'new version');
    const asCreate = await fhir(ehrA, 'Communication/chosen-id', t.access_token, {
      method: 'PUT',
      headers: { 'Content-Type': 'application/fhir+json' },
      body: JSON.stringify({ resourceType: 'Communication', id: 'chosen-id', status: 'completed' }),
    });
    assertEq(asCreate.status, 201, 'update-as-create is 201');
    assertEq(asCreate.headers.get('location').split('/_history/')[0], `${ehrA.base}/Communication/chosen-id`, 'Location');
  });

  await check('down mode: 503 everywhere but /_test, then back up', async () => {
    assertEq((await postJson(test(ehrA, '/down'), { retry_after: 1 })).status, 200, 'set down');
    const meta = await request(`${ehrA.base}/metadata`);
    assertEq(meta.status, 503, 'metadata while down');
    assertEq(meta.headers.get('retry-after'), '1', 'Retry-After');
    const tok = await authenticatedTokenRequest(ehrA, backend, backendKey, { grant_type: 'client_credentials', scope: 'system/AuditEvent.c' });
    assertEq(tok.status, 503, 'token while down');
    assertEq((await fhir(ehrA, 'AuditEvent', backendToken)).status, 503, 'FHIR while down');
    assertEq((await fhir(ehrB, 'Patient/pb')).status, 401, 'the other EHR is unaffected');
    assertEq((await postJson(test(ehrA, '/up'), {})).status, 200, 'set up');
    assertEq((await request(`${ehrA.base}/metadata`)).status, 200, 'metadata after up');
    assertEq((await fhir(ehrA, 'AuditEvent', backendToken)).status, 200, 'FHIR after up');
  });

  await check('deny mode: authorize redirects with error=access_denied', async () => {
    await postJson(test(ehrB, '/settings'), { deny: true });
    const p = pkce();
    const params = authParams(ehrB, p.challenge);
    const auth = await authorize(ehrB.authorize, params);
    await postJson(test(ehrB, '/settings'), { deny: false });
    assertEq(auth.status, 302, 'redirect');
    assertEq(auth.params.error, 'access_denied', 'error');
    assertEq(auth.params.state, params.state, 'state echoed on error');
    assert(!auth.params.code, 'no code');
  });

  await check('concurrent conditional creates with one identifier store exactly one', async () => {
    const outboxId = `outbox-race-${Date.now()}`;
    const send = () =>
      fhirPost(ehrA, 'AuditEvent', backendToken, auditEvent(outboxId, 'p1'), {
        'If-None-Exist': `entity:identifier=urn:courier:outbox|${outboxId}`,
      });
    const responses = await Promise.all([send(), send(), send(), send(), send()]);
    assertEq(responses.map((r) => r.status).sort(), [200, 200, 200, 200, 201], 'one 201, the rest 200');
    assertEq(new Set(responses.map((r) => r.body.id)).size, 1, 'all name the same resource');
  });

  await check('search paging: _count gives a next link that pages on', async () => {
    const page1 = await fhir(ehrA, 'AuditEvent?_count=2', backendToken);
    assertEq(page1.status, 200, 'status');
    assert(page1.body.total >= 3, `several AuditEvents (${page1.body.total})`);
    assertEq(page1.body.entry.length, 2, 'page size');
    const next = page1.body.link.find((l) => l.relation === 'next');
    assert(next, 'next link');
    const page2 = await request(next.url, { headers: { Authorization: `Bearer ${backendToken}` } });
    assertEq(page2.status, 200, 'next page');
    assert(!page2.body.entry.some((e) => page1.body.entry.some((f) => f.resource.id === e.resource.id)), 'pages do not overlap');
    const bad = await fhir(ehrA, 'AuditEvent?_has:Patient:link:id=x', backendToken);
    assertEq(bad.status, 400, 'unsupported search parameter is 400');
  });

  await check('POST /authorize with a form body (authorize-post)', async () => {
    const p = pkce();
    const params = authParams(ehrA, p.challenge);
    const r = await request(ehrA.authorize, {
      method: 'POST',
      headers: { 'Content-Type': 'application/x-www-form-urlencoded', 'X-Test-User': 'dr-1' },
      body: new URLSearchParams(params).toString(),
    });
    assertEq(r.status, 302, 'redirect');
    const code = new URL(r.headers.get('location')).searchParams.get('code');
    assertEq((await redeem(ehrA, code, p.verifier)).status, 200, 'code redeemed');
  });

  await check('settings: code_ttl and token_ttl expire codes and tokens; refresh without rotation', async () => {
    await postJson(test(ehrB, '/settings'), { code_ttl: 1, token_ttl: 1, refresh_rotation: false });
    try {
      const stale = await getCode(ehrB);
      const fresh = await getCode(ehrB);
      const t = await redeem(ehrB, fresh.code, fresh.verifier, rsKey);
      assertEq([t.status, t.body.expires_in], [200, 1], 'short-lived token');
      await new Promise((resolve) => setTimeout(resolve, 2100));
      expectOAuthError(await redeem(ehrB, stale.code, stale.verifier, rsKey), 400, 'invalid_grant', 'expired');
      const expired = await fhir(ehrB, 'Patient/pb', t.body.access_token);
      assertEq(expired.status, 401, 'expired access token');
      assert(expired.headers.get('www-authenticate').includes('expired'), 'says expired');
      const r1 = await authenticatedTokenRequest(ehrB, courier, rsKey, { grant_type: 'refresh_token', refresh_token: t.body.refresh_token });
      const r2 = await authenticatedTokenRequest(ehrB, courier, esKey, { grant_type: 'refresh_token', refresh_token: t.body.refresh_token });
      assertEq([r1.status, r2.status], [200, 200], 'the same refresh token works twice');
      assert(r1.body.refresh_token === undefined, 'no new refresh token without rotation');
    } finally {
      await postJson(test(ehrB, '/settings'), { code_ttl: 60, token_ttl: 300, refresh_rotation: true });
    }
  });

  await check('/_test/revoke: every grant of a client stops working', async () => {
    const t = await authenticatedTokenRequest(ehrA, backend, backendKey, { grant_type: 'client_credentials', scope: 'system/AuditEvent.rs' });
    assertEq((await fhir(ehrA, 'AuditEvent', t.body.access_token)).status, 200, 'works before');
    const r = await postJson(test(ehrA, '/revoke'), { client_id: backend.client_id });
    assert(r.body.revoked_grants >= 1, 'revoked some');
    assertEq((await fhir(ehrA, 'AuditEvent', t.body.access_token)).status, 401, 'revoked after');
    backendToken = null;
  });

  await rejectionChecks();

  await check('counters: token requests, JWKS fetches', async () => {
    const c = (await request(test(ehrA, '/counters'))).body;
    assert(c.token.requests >= 10, `token requests counted (${c.token.requests})`);
    assert(c.token.by_grant_type.authorization_code >= 1 && c.token.by_grant_type.client_credentials >= 1, 'by grant type');
    assert(c.token.errors.invalid_client >= 5, 'invalid_client errors counted');
    assert(c.jwks_fetches >= 1 && jwksServer.fetches() >= c.jwks_fetches, 'JWKS fetched from the client URL');
    assert(c.down_rejected >= 3, 'down rejections counted');
    const reset = await postJson(test(ehrA, '/counters/reset'), {});
    assertEq(reset.body.token.requests, 0, 'reset');
  });

  await check('settings: a backend token endpoint elsewhere, and /token without client_credentials', async () => {
    const bad = await postJson(test(ehrA, '/settings'), { backend_token_path: '/token' });
    assertEq(bad.status, 400, 'a path the fixture uses is refused');
    const set = await postJson(test(ehrA, '/settings'), { backend_token_path: '/backend/token', token_client_credentials: false });
    assertEq(set.body.backend_token_url, `${ehrA.origin}/backend/token`, 'its URL');
    const cc = { grant_type: 'client_credentials', scope: 'system/AuditEvent.c' };
    expectOAuthError(await authenticatedTokenRequest(ehrA, backend, backendKey, cc), 400, 'unsupported_grant_type');
    const elsewhere = { ...ehrA, token: set.body.backend_token_url };
    const ok = await authenticatedTokenRequest(elsewhere, backend, backendKey, cc);
    assertEq(ok.status, 200, `client_credentials at the backend endpoint (${JSON.stringify(ok.body)})`);
    // The assertion names the endpoint it is sent to: the launch one's URL is refused there.
    expectOAuthError(await authenticatedTokenRequest(elsewhere, backend, backendKey, cc, { claims: { aud: ehrA.token } }), 401, 'invalid_client', 'aud');
    expectOAuthError(await authenticatedTokenRequest(elsewhere, backend, backendKey, { grant_type: 'authorization_code', code: 'x' }), 400, 'unsupported_grant_type');
    const c = (await request(test(ehrA, '/counters'))).body.token.by_endpoint;
    assert(c['/backend/token'] >= 3, `counted by endpoint (${JSON.stringify(c)})`);
    await postJson(test(ehrA, '/settings'), { backend_token_path: null, token_client_credentials: true });
    assertEq((await request(`${ehrA.origin}/backend/token`, { method: 'POST' })).status, 404, 'gone when cleared');
    assertEq((await authenticatedTokenRequest(ehrA, backend, backendKey, cc)).status, 200, '/token grants it again');
  });

  // A fresh backend token (the revocation check above ended the earlier one).
  const freshToken = async () =>
    (await authenticatedTokenRequest(ehrA, backend, backendKey, { grant_type: 'client_credentials', scope: 'system/AuditEvent.c system/AuditEvent.rs' })).body.access_token;

  await check('settings: If-None-Exist refused (400, 412, 501) and Prefer handling refused, as OperationOutcomes', async () => {
    const backendToken = await freshToken();
    const id = `outbox-compat-${Date.now()}`;
    const condition = { 'If-None-Exist': `entity:identifier=urn:courier:outbox|${id}` };
    for (const status of [400, 412, 501]) {
      await postJson(test(ehrA, '/settings'), { if_none_exist: status });
      const r = await fhirPost(ehrA, 'AuditEvent', backendToken, auditEvent(id, 'p1'), condition);
      assertEq([r.status, r.body.resourceType, r.body.issue?.[0]?.code], [status, 'OperationOutcome', 'not-supported'], `refused with ${status}`);
    }
    assertEq((await postJson(test(ehrA, '/settings'), { if_none_exist: 'maybe' })).status, 400, 'an unknown value is refused');
    const plain = await fhirPost(ehrA, 'AuditEvent', backendToken, auditEvent(id, 'p1'));
    assertEq(plain.status, 201, 'a plain create is taken');
    await postJson(test(ehrA, '/settings'), { if_none_exist: 'honoured', prefer_handling: 'refused' });
    const strict = { Prefer: 'handling=strict' };
    assertEq((await fhirPost(ehrA, 'AuditEvent', backendToken, auditEvent(id, 'p1'), { ...condition, ...strict })).status, 400, 'a create with Prefer: handling');
    const search = `AuditEvent?entity:identifier=${encodeURIComponent(`urn:courier:outbox|${id}`)}`;
    assertEq((await fhir(ehrA, search, backendToken, { headers: strict })).status, 400, 'a search with Prefer: handling');
    assertEq((await fhir(ehrA, search, backendToken)).body.total, 1, 'without it: searchable');
    const again = await fhirPost(ehrA, 'AuditEvent', backendToken, auditEvent(id, 'p1'), condition);
    assertEq(again.status, 200, 'the conditional create without Prefer matches the plain one');
    const refused = (await request(test(ehrA, '/counters'))).body.fhir.refused;
    assert(refused.if_none_exist >= 3 && refused.prefer >= 2, `refusals counted (${JSON.stringify(refused)})`);
    await postJson(test(ehrA, '/settings'), { prefer_handling: 'honoured' });
  });

  await check('settings: AuditEvents only at another FHIR base (audit_path)', async () => {
    const backendToken = await freshToken();
    const set = await postJson(test(ehrA, '/settings'), { audit_path: '/fhir/audit' });
    const auditBase = set.body.audit_base;
    assertEq(auditBase, `${ehrA.base}/audit`, 'its URL');
    const id = `outbox-base-${Date.now()}`;
    const condition = { 'If-None-Exist': `entity:identifier=urn:courier:outbox|${id}` };
    const atBase = await fhirPost(ehrA, 'AuditEvent', backendToken, auditEvent(id, 'p1'), condition);
    assertEq([atBase.status, atBase.body.issue?.[0]?.code], [404, 'not-supported'], 'no AuditEvent at the FHIR base');
    const audit = { ...ehrA, base: auditBase };
    const created = await fhirPost(audit, 'AuditEvent', backendToken, auditEvent(id, 'p1'), condition);
    assertEq(created.status, 201, `created at the audit base (${JSON.stringify(created.body)})`);
    assert(created.headers.get('location').startsWith(`${auditBase}/AuditEvent/`), 'Location at the audit base');
    assertEq((await fhirPost(audit, 'AuditEvent', backendToken, auditEvent(id, 'p1'), condition)).status, 200, 'conditional there too');
    assertEq((await fhir(audit, 'Patient/p1', backendToken)).status, 404, 'the audit base has only AuditEvent');
    const writes = (await request(test(ehrA, '/writes'))).body.writes.filter((w) => w.id === created.body.id);
    assertEq(writes.map((w) => w.base), [auditBase, auditBase], 'the write log names the base');
    await postJson(test(ehrA, '/settings'), { audit_path: null });
    assertEq((await fhir(ehrA, 'AuditEvent', backendToken)).status, 200, 'back at the FHIR base');
  });
}

async function rejectionChecks() {
  await check('reject: replayed authorization code (and revoke what it issued)', async () => {
    const { code, verifier } = await getCode(ehrA, {}, { 'X-Test-User': 'dr-1', 'X-Test-Patient': 'p1' });
    const ok = await redeem(ehrA, code, verifier);
    assertEq(ok.status, 200, 'first redemption');
    expectOAuthError(await redeem(ehrA, code, verifier), 400, 'invalid_grant', 'already used');
    assertEq((await fhir(ehrA, 'Patient/p1', ok.body.access_token)).status, 401, 'token from the replayed code revoked');
  });

  await check('reject: wrong PKCE verifier', async () => {
    const { code } = await getCode(ehrA, {}, { 'X-Test-User': 'dr-1', 'X-Test-Patient': 'p1' });
    expectOAuthError(await redeem(ehrA, code, pkce().verifier), 400, 'invalid_grant', 'PKCE');
  });

  await check('reject: wrong redirect_uri (token and authorize)', async () => {
    const { code, verifier } = await getCode(ehrA, {}, { 'X-Test-User': 'dr-1', 'X-Test-Patient': 'p1' });
    expectOAuthError(await redeem(ehrA, code, verifier, esKey, { redirect_uri: `${redirectUri}/other` }), 400, 'invalid_grant', 'redirect_uri');
    const auth = await authorize(ehrA.authorize, authParams(ehrA, pkce().challenge, { redirect_uri: 'http://127.0.0.1:9/evil' }));
    assertEq(auth.status, 400, 'authorize with an unregistered redirect_uri does not redirect');
    assert(!auth.location, 'no Location');
  });

  await check('reject: unregistered client (token and authorize)', async () => {
    const stranger = { client_id: 'stranger' };
    expectOAuthError(
      await authenticatedTokenRequest(ehrA, stranger, esKey, { grant_type: 'client_credentials', scope: 'system/*.rs' }),
      401,
      'invalid_client',
      'unknown client_id'
    );
    const auth = await authorize(ehrA.authorize, authParams(ehrA, pkce().challenge, { client_id: 'stranger' }));
    assertEq(auth.status, 400, 'authorize for an unknown client');
  });

  const cc = { grant_type: 'client_credentials', scope: 'system/AuditEvent.c' };

  await check('reject: replayed assertion jti', async () => {
    const assertion = await clientAssertion(backendKey, backend.client_id, ehrA.token);
    const form = { ...cc, client_assertion_type: ASSERTION_TYPE, client_assertion: assertion };
    assertEq((await tokenRequest(ehrA.token, form)).status, 200, 'first use');
    expectOAuthError(await tokenRequest(ehrA.token, form), 401, 'invalid_client', 'jti');
  });

  await check('reject: expired assertion, and exp more than 5 minutes ahead', async () => {
    const now = Math.floor(Date.now() / 1000);
    expectOAuthError(await authenticatedTokenRequest(ehrA, backend, backendKey, cc, { claims: { exp: now - 10 } }), 401, 'invalid_client', 'expired');
    expectOAuthError(await authenticatedTokenRequest(ehrA, backend, backendKey, cc, { claims: { exp: now + 600 } }), 401, 'invalid_client', '5 minutes');
  });

  await check('reject: wrong assertion aud (e.g. the FHIR base, or the other EHR\'s token URL)', async () => {
    expectOAuthError(await authenticatedTokenRequest(ehrA, backend, backendKey, cc, { claims: { aud: ehrA.base } }), 401, 'invalid_client', 'aud');
    expectOAuthError(await authenticatedTokenRequest(ehrA, backend, backendKey, cc, { claims: { aud: ehrB.token } }), 401, 'invalid_client', 'aud');
  });

  await check('reject: alg none, alg RS256, and a key not in the client\'s JWKS', async () => {
    const none = unsignedAssertion(backend.client_id, ehrA.token, backendKey.kid);
    expectOAuthError(await tokenRequest(ehrA.token, { ...cc, client_assertion_type: ASSERTION_TYPE, client_assertion: none }), 401, 'invalid_client', 'alg');
    const rs256 = { ...(await clientKey('RS256')), kid: backendKey.kid };
    expectOAuthError(await authenticatedTokenRequest(ehrA, backend, rs256, cc), 401, 'invalid_client', 'alg');
    const impostor = { ...(await clientKey('RS384')), kid: backendKey.kid }; // right kid, wrong key
    expectOAuthError(await authenticatedTokenRequest(ehrA, backend, impostor, cc), 401, 'invalid_client', 'signature');
  });

  await check('reject: sub != iss, client_secret, missing assertion type', async () => {
    expectOAuthError(await authenticatedTokenRequest(ehrA, backend, backendKey, cc, { claims: { sub: 'someone' } }), 401, 'invalid_client', 'sub');
    expectOAuthError(await tokenRequest(ehrA.token, { ...cc, client_id: backend.client_id, client_secret: 's3cret' }), 401, 'invalid_client');
    expectOAuthError(await tokenRequest(ehrA.token, { ...cc, client_assertion: 'x' }), 401, 'invalid_client', 'client_assertion_type');
  });

  await check('reject at /authorize: wrong aud, plain PKCE, no state, forged launch, launch scope without launch', async () => {
    const challenge = pkce().challenge;
    const cases = [
      [{ aud: ehrB.base }, 'invalid_request'],
      [{ code_challenge_method: 'plain' }, 'invalid_request'],
      [{ code_challenge: undefined }, 'invalid_request'],
      [{ launch: 'made-up', scope: 'launch openid' }, 'invalid_request'],
      [{ scope: 'launch openid' }, 'invalid_request'],
      [{ response_type: 'token' }, 'unsupported_response_type'],
      [{ scope: 'system/*.rs' }, 'invalid_scope'],
    ];
    for (const [extra, error] of cases) {
      const params = authParams(ehrA, challenge, extra);
      const auth = await authorize(ehrA.authorize, params, { 'X-Test-User': 'dr-1' });
      assertEq([auth.status, auth.params.error], [302, error], `error for ${JSON.stringify(extra)}`);
      assertEq(auth.params.state, params.state, 'state echoed');
    }
    const noState = await authorize(ehrA.authorize, authParams(ehrA, challenge, { state: undefined }), { 'X-Test-User': 'dr-1' });
    assertEq([noState.status, noState.params.error, noState.params.state], [302, 'invalid_request', undefined], 'missing state');
  });

  await check('reject: a code redeemed by another client, and an unsupported grant type', async () => {
    const { code, verifier } = await getCode(ehrA, {}, { 'X-Test-User': 'dr-1', 'X-Test-Patient': 'p1' });
    const r = await authenticatedTokenRequest(ehrA, backend, backendKey, {
      grant_type: 'authorization_code',
      code,
      redirect_uri: redirectUri,
      code_verifier: verifier,
    });
    expectOAuthError(r, 400, 'invalid_grant', 'another client');
    expectOAuthError(await authenticatedTokenRequest(ehrA, backend, backendKey, { grant_type: 'password' }), 400, 'unsupported_grant_type');
  });
}

async function seed() {
  const a = await postJson(test(ehrA, '/seed'), {
    resourceType: 'Bundle',
    type: 'collection',
    entry: [
      { resource: { resourceType: 'Patient', id: 'p1', name: [{ family: 'Launch', given: ['Pat'] }] } },
      { resource: { resourceType: 'Practitioner', id: 'dr-1', name: [{ family: 'One' }] } },
      {
        resource: {
          resourceType: 'Encounter',
          id: 'e1',
          status: 'in-progress',
          class: { system: 'http://terminology.hl7.org/CodeSystem/v3-ActCode', code: 'AMB' },
          subject: { reference: 'Patient/p1' },
        },
      },
    ],
  });
  assertEq(a.status, 200, `seed A (${JSON.stringify(a.body)})`);
  const b = await postJson(test(ehrB, '/seed'), [
    { resourceType: 'Patient', id: 'pb', name: [{ family: 'Standalone' }] },
    { resourceType: 'Practitioner', id: 'dr-b' },
  ]);
  assertEq(b.status, 200, `seed B (${JSON.stringify(b.body)})`);
}
