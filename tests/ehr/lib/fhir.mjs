// FHIR R4 REST API at /fhir/*: bearer-token check, scope check, R4 validation of
// writes, then Medplum's FhirRouter over the strict in-memory repository, and the
// HTTP details the router leaves to its host (status, Location, ETag, fullUrl).

import { created, getStatus, isOk, normalizeOperationOutcome, validateResource } from '@medplum/core';
import { FhirRouter } from '@medplum/fhir-router';
import { capabilityStatement, RESOURCE_TYPES } from './discovery.mjs';
import { mediaType, Mutex, parseForm, readBody } from './http.mjs';
import { loadR4Definitions, StrictMemoryRepository } from './repository.mjs';
import { allows } from './scopes.mjs';
import { bump } from './state.mjs';

const FHIR_JSON = 'application/fhir+json; charset=utf-8';

// Interaction -> the SMART v2 permission letter it needs.
const PERMISSION = { read: 'r', vread: 'r', 'history-instance': 'r', 'search-type': 's', create: 'c', update: 'u' };

function outcome(severity, code, text) {
  return { resourceType: 'OperationOutcome', issue: [{ severity, code, details: { text } }] };
}

// Which interaction a request is, from method and path segments below /fhir.
function classify(method, segments) {
  const [type, id, history, vid, ...rest] = segments;
  if (rest.length) return null;
  if (segments.length === 1 && method === 'GET') return { interaction: 'search-type', type };
  if (segments.length === 1 && method === 'POST') return { interaction: 'create', type };
  if (segments.length === 2 && id === '_search' && method === 'POST') return { interaction: 'search-type', type, postSearch: true };
  if (segments.length === 2 && method === 'GET') return { interaction: 'read', type, id };
  if (segments.length === 2 && method === 'PUT') return { interaction: 'update', type, id };
  if (segments.length === 3 && history === '_history' && method === 'GET') return { interaction: 'history-instance', type, id };
  if (segments.length === 4 && history === '_history' && method === 'GET') return { interaction: 'vread', type, id, vid };
  return null;
}

export class FhirService {
  constructor(state, tokens) {
    loadR4Definitions();
    this.state = state;
    this.tokens = tokens;
    this.repo = new StrictMemoryRepository();
    this.router = new FhirRouter();
    this.writeLock = new Mutex();
    this.startedAt = new Date().toISOString();
  }

  send(res, status, body, headers = {}) {
    const counters = this.state.counters.fhir;
    bump(counters.by_status, String(status));
    if (body === undefined) {
      res.writeHead(status, { 'Content-Length': 0, ...headers });
      res.end();
      return;
    }
    const text = JSON.stringify(body, null, 2);
    res.writeHead(status, { 'Content-Type': FHIR_JSON, 'Content-Length': Buffer.byteLength(text), ...headers });
    res.end(text);
  }

  // `base`: which FHIR base the request came to — /fhir (every type but AuditEvent when the
  // setting audit_path names another base for it), or that AuditEvent base.
  async handle(req, res, url, base = undefined) {
    const { state } = this;
    base ??= {
      prefix: '/fhir',
      url: state.urls.fhirBase,
      types: state.settings.auditPath ? RESOURCE_TYPES.filter((t) => t !== 'AuditEvent') : RESOURCE_TYPES,
    };
    state.counters.fhir.requests++;
    let segments;
    try {
      segments = url.pathname.slice(base.prefix.length).split('/').filter(Boolean).map(decodeURIComponent);
    } catch {
      return this.send(res, 400, outcome('error', 'invalid', 'malformed percent-encoding in the path'));
    }

    // The CapabilityStatement is public: clients read it to discover the SMART endpoints.
    if (segments.length === 1 && segments[0] === 'metadata') {
      if (req.method !== 'GET') return this.send(res, 405, outcome('error', 'not-supported', 'metadata is GET only'));
      return this.send(res, 200, capabilityStatement(state.urls, state.name, this.startedAt, state.settings.metadataOauthUris));
    }

    const claims = await this.authenticate(req, res);
    if (!claims) return;

    const op = classify(req.method, segments);
    if (!op) {
      return this.send(res, 405, outcome('error', 'not-supported', `${req.method} ${url.pathname} is not supported by this test server`));
    }
    if (!base.types.includes(op.type)) {
      return this.send(res, 404, outcome('error', 'not-supported', `Resource type not supported: ${op.type}`));
    }
    const scopes = claims.scope.split(' ');
    if (!allows(scopes, op.type, PERMISSION[op.interaction])) {
      state.counters.fhir.forbidden++;
      return this.send(
        res,
        403,
        outcome('error', 'forbidden', `Granted scopes do not allow ${op.interaction} on ${op.type} (needs "${PERMISSION[op.interaction]}")`)
      );
    }

    // An EHR without some of R4's optional HTTP features, refusing them as such a server does.
    const prefer = String(req.headers.prefer || '');
    if (state.settings.preferHandling === 'refused' && /(^|[\s,;])handling\s*=/.test(prefer)) {
      state.counters.fhir.refused.prefer++;
      return this.send(res, 400, outcome('error', 'not-supported', `Unsupported Prefer header: ${prefer}`));
    }
    const refusal = state.settings.ifNoneExist;
    if (op.interaction === 'create' && req.headers['if-none-exist'] !== undefined && refusal !== 'honoured') {
      state.counters.fhir.refused.if_none_exist++;
      return this.send(res, refusal, outcome('error', 'not-supported', 'Conditional create (If-None-Exist) is not supported'));
    }

    const prepared = await this.prepare(req, res, url, op, base);
    if (!prepared) return;

    const isWrite = op.interaction === 'create' || op.interaction === 'update';
    const run = async () => {
      // Update-as-create is a create (R4 http §3.1.0.4.1: 201), which Medplum's
      // in-memory update does not tell apart; so look first, under the write lock.
      const existed = op.interaction !== 'update' || (await this.exists(op.type, op.id));
      const answer = await this.router.handleRequest(prepared, this.repo);
      return !existed && isOk(answer[0]) ? [created, ...answer.slice(1)] : answer;
    };
    let result;
    try {
      result = isWrite ? await this.writeLock.run(run) : await run();
    } catch (err) {
      result = [normalizeOperationOutcome(err)];
    }
    const [resultOutcome, resource] = result;
    const status = getStatus(resultOutcome);

    if (isWrite && status < 300) {
      state.writes.push({
        seq: state.writes.length + 1,
        at: new Date().toISOString(),
        interaction: op.interaction,
        resourceType: resource.resourceType,
        id: resource.id,
        versionId: resource.meta?.versionId,
        status,
        if_none_exist: req.headers['if-none-exist'] ?? null,
        prefer: req.headers.prefer ?? null,
        base: base.url,
        client_id: claims.client_id,
      });
      // Fault injection: the write is committed, but the client never hears back,
      // as when a connection drops after the EHR's commit. Exactly-once write-back
      // has to survive this by retrying with the same If-None-Exist.
      if (state.faults.drop_response_after_write > 0) {
        state.faults.drop_response_after_write--;
        state.counters.dropped_responses++;
        req.socket.destroy();
        return;
      }
    }

    if (!resource) return this.send(res, status, resultOutcome);
    if (resource.resourceType === 'Bundle' && resource.type === 'searchset') {
      return this.send(res, status, this.decorateSearchset(resource, url, op, prepared, base.url));
    }
    const headers = this.versionHeaders(resource);
    if (status === 201) headers.Location = `${base.url}/${resource.resourceType}/${resource.id}/_history/${resource.meta?.versionId}`;
    if (isWrite && prefer.includes('return=minimal')) return this.send(res, status, undefined, headers);
    if (isWrite && prefer.includes('return=OperationOutcome')) return this.send(res, status, resultOutcome, headers);
    return this.send(res, status, resource, headers);
  }

  // Bearer token from this EHR, unexpired and unrevoked; else 401 (RFC 6750 §3).
  async authenticate(req, res) {
    const header = req.headers.authorization || '';
    const match = /^Bearer\s+(\S+)$/i.exec(header);
    let message = 'missing bearer token';
    if (match) {
      try {
        return await this.tokens.verifyAccessToken(match[1]);
      } catch (e) {
        message = e.message;
      }
    }
    this.state.counters.fhir.unauthorized++;
    const challenge = match
      ? `Bearer realm="${this.state.name}", error="invalid_token", error_description="${message}"`
      : `Bearer realm="${this.state.name}"`;
    this.send(res, 401, outcome('error', 'login', message), { 'WWW-Authenticate': challenge });
    return null;
  }

  // Builds the FhirRequest for Medplum's router, with the request body checked the
  // way a real server checks it (media type, JSON, R4 structure).
  async prepare(req, res, url, op, base) {
    const query = new URLSearchParams(url.search);
    // Format parameters are about the wire, not the search; JSON is the only format here.
    query.delete('_format');
    query.delete('_pretty');
    let body;
    if (op.postSearch) {
      if (mediaType(req) !== 'application/x-www-form-urlencoded') {
        this.send(res, 415, outcome('error', 'not-supported', 'POST _search needs application/x-www-form-urlencoded'));
        return null;
      }
      body = parseForm(await readBody(req)).params;
    } else if (op.interaction === 'create' || op.interaction === 'update') {
      const type = mediaType(req);
      if (type !== 'application/fhir+json' && type !== 'application/json') {
        this.send(res, 415, outcome('error', 'not-supported', `Content-Type must be application/fhir+json, got "${type}"`));
        return null;
      }
      try {
        body = JSON.parse(await readBody(req));
      } catch {
        this.send(res, 400, outcome('error', 'structure', 'Request body is not valid JSON'));
        return null;
      }
      if (!body || typeof body !== 'object' || body.resourceType !== op.type) {
        this.send(res, 400, outcome('error', 'invalid', `Body must be a ${op.type} resource`));
        return null;
      }
      if (op.interaction === 'create') {
        // R4 http §3.1.0.8: on create the server ignores a client id and meta
        // versioning. Medplum's MemoryRepository would keep them (and overwrite an
        // existing resource with that id), so they are removed here.
        delete body.id;
        if (body.meta) {
          delete body.meta.versionId;
          delete body.meta.lastUpdated;
        }
      }
      try {
        validateResource(body); // throws an OperationOutcomeError on any error issue
      } catch (err) {
        this.send(res, 400, normalizeOperationOutcome(err));
        return null;
      }
    }
    const path = url.pathname.slice(base.prefix.length + 1);
    const qs = query.toString();
    return {
      method: req.method,
      url: qs ? `${path}?${qs}` : path,
      pathname: '', // Medplum's router insists on url, not pathname
      body,
      params: {},
      query: {},
      headers: req.headers,
    };
  }

  exists(type, id) {
    return this.repo.readResource(type, id).then(
      () => true,
      () => false
    );
  }

  versionHeaders(resource) {
    const headers = {};
    if (resource.meta?.versionId) headers.ETag = `W/"${resource.meta.versionId}"`;
    if (resource.meta?.lastUpdated) headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
    return headers;
  }

  // MemoryRepository returns bare entries; a real server adds fullUrl, search.mode
  // and self/next links (clients page by following "next").
  decorateSearchset(bundle, url, op, prepared, base) {
    const params = new URLSearchParams(op.postSearch ? prepared.body : url.search);
    params.delete('_format');
    params.delete('_pretty');
    const self = `${base}/${op.type}${params.size ? `?${params}` : ''}`;
    const link = [{ relation: 'self', url: self }];
    const count = params.has('_count') ? Number(params.get('_count')) : undefined;
    const offset = params.has('_offset') ? Number(params.get('_offset')) : 0;
    if (count > 0 && bundle.total !== undefined && offset + count < bundle.total) {
      params.set('_offset', String(offset + count));
      link.push({ relation: 'next', url: `${base}/${op.type}?${params}` });
    }
    return {
      resourceType: 'Bundle',
      type: 'searchset',
      total: bundle.total,
      link,
      entry: (bundle.entry ?? []).map((e) => ({
        fullUrl: `${base}/${e.resource.resourceType}/${e.resource.id}`,
        resource: e.resource,
        search: { mode: 'match' },
      })),
    };
  }

  // --- used by /_test/ ---------------------------------------------------------

  // Stores resources as given (PUT semantics when they carry an id), validated.
  async seed(resources) {
    const stored = [];
    for (const resource of resources) {
      if (!resource || !RESOURCE_TYPES.includes(resource.resourceType)) {
        throw new Error(`cannot seed ${resource?.resourceType}: supported types are ${RESOURCE_TYPES.join(', ')}`);
      }
      validateResource(resource);
      const saved = await this.writeLock.run(() =>
        resource.id ? this.repo.updateResource(resource) : this.repo.createResource(resource)
      );
      stored.push(`${saved.resourceType}/${saved.id}`);
    }
    return stored;
  }

  async list(resourceType) {
    if (!RESOURCE_TYPES.includes(resourceType)) throw new Error(`unsupported resource type ${resourceType}`);
    const bundle = await this.repo.search({ resourceType, filters: [] });
    return (bundle.entry ?? []).map((e) => e.resource);
  }
}
