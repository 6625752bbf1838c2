// One EHR: state, keys, the HTTP server and the top-level routing.

import { createServer } from 'node:http';
import { handleAuthorize } from './authorize.mjs';
import { openidConfiguration, smartConfiguration } from './discovery.mjs';
import { FhirService } from './fhir.mjs';
import { HttpError, sendJson } from './http.mjs';
import { createState, setUrls } from './state.mjs';
import { createTestControl } from './test-control.mjs';
import { handleToken } from './token-endpoint.mjs';
import { createSigningKey, TokenService } from './tokens.mjs';

// Bounds on how long one request may take, so a stuck client cannot hold the
// fixture (and the test run) forever.
const REQUEST_TIMEOUT_MS = 15_000;
/** A SMART style sheet (SMART App Launch, "Styling"): a recognisable highlight colour. */
export const SMART_STYLE = {
  color_background: '#fdfcf7',
  color_error: '#9e2a2b',
  color_highlight: '#7a2e8c',
  color_modal_backdrop: '',
  color_success: '#2b7a3d',
  color_text: '#1b1b1b',
  dim_border_radius: '2px',
  dim_font_size: '15px',
  dim_spacing_size: '8px',
  font_family_body: 'Georgia, serif',
  font_family_heading: 'Georgia, serif',
};
const HEADERS_TIMEOUT_MS = 10_000;

export async function createEhr(config, log = () => {}) {
  const state = createState(config, await createSigningKey());
  const tokens = new TokenService(state);
  const fhir = new FhirService(state, tokens);
  const handleTest = createTestControl(state, tokens, fhir);

  async function route(req, res) {
    const url = new URL(req.url, state.urls.origin);
    const path = url.pathname;

    // Test control first: it must keep answering while the EHR is "down".
    if (path === '/_test' || path.startsWith('/_test/')) return handleTest(req, res, url);

    if (state.down) {
      state.counters.down_rejected++;
      const headers = state.down.retry_after != null ? { 'Retry-After': String(state.down.retry_after) } : {};
      const body = path.startsWith('/fhir')
        ? { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'transient', details: { text: 'EHR is down (test mode)' } }] }
        : { error: 'temporarily_unavailable', error_description: 'EHR is down (test mode)' };
      return sendJson(res, state.down.status, body, headers);
    }

    const get = req.method === 'GET';
    if (get && path === '/fhir/.well-known/smart-configuration') {
      if (!state.settings.smartConfiguration) return sendJson(res, 404, { error: 'not served (test setting smart_configuration)' });
      return sendJson(res, 200, smartConfiguration(state.urls, state.settings.scopesVersion));
    }
    if (get && path === '/fhir/.well-known/openid-configuration') return sendJson(res, 200, openidConfiguration(state.urls));
    if (get && path === '/jwks.json') {
      const decoys = state.decoyKeys.slice(0, state.settings.jwksDecoys);
      const ec = state.ecKey ? [state.ecKey.jwk] : [];
      return sendJson(res, 200, { keys: [...decoys, ...state.key.jwks.keys, ...ec] });
    }
    // The EHR's SMART style (the launch's smart_style_url points here), readable cross-origin.
    if (get && path === '/smart-style.json') {
      return sendJson(res, 200, SMART_STYLE, { 'Access-Control-Allow-Origin': '*' });
    }
    if (path === '/authorize') return handleAuthorize(state, req, res, url);
    if (path === '/token') return handleToken(state, tokens, req, res);
    if (state.urls.backendToken && path === state.settings.backendTokenPath) {
      return handleToken(state, tokens, req, res, { url: state.urls.backendToken, backendOnly: true });
    }
    // The AuditEvent base (setting audit_path), before /fhir: it may sit below it.
    const audit = state.settings.auditPath;
    if (audit && (path === audit || path.startsWith(`${audit}/`))) {
      return fhir.handle(req, res, url, { prefix: audit, url: state.urls.auditBase, types: ['AuditEvent'] });
    }
    if (path === '/fhir' || path.startsWith('/fhir/')) return fhir.handle(req, res, url);
    throw new HttpError(404, `no route ${req.method} ${path}`);
  }

  const server = createServer((req, res) => {
    res.on('finish', () => log(`${req.method} ${req.url} -> ${res.statusCode}`));
    route(req, res).catch((err) => {
      if (!(err instanceof HttpError)) log(`error on ${req.method} ${req.url}: ${err.stack || err}`);
      if (res.headersSent) return res.destroy();
      const status = err instanceof HttpError ? err.status : 500;
      sendJson(res, status, { error: status === 500 ? 'server_error' : 'invalid_request', error_description: err.message });
    });
  });
  server.requestTimeout = REQUEST_TIMEOUT_MS;
  server.headersTimeout = HEADERS_TIMEOUT_MS;

  return {
    state,
    async listen(port) {
      await new Promise((resolve, reject) => {
        server.once('error', reject);
        server.listen(port, '127.0.0.1', resolve);
      });
      setUrls(state, server.address().port);
      return state.urls;
    },
    close() {
      server.closeAllConnections();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}
