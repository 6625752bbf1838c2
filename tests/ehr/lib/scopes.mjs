// SMART scopes: what a client may be granted, and what a granted scope allows on /fhir.
import { scopeVersion } from './discovery.mjs';
//
// Both SMART v1 (patient/Patient.read, user/*.write, system/*.*) and v2
// (patient/Patient.rs, user/AuditEvent.c, system/*.cruds) are understood.
// A v2 scope with a query (patient/Observation.rs?category=...) grants nothing
// here: the fixture does not implement the filter, and granting it unfiltered
// would be wider than asked.

const CLINICAL = /^(patient|user|system)\/(\*|[A-Z][A-Za-z]+)\.(read|write|\*|c?r?u?d?s?)(\?.*)?$/;

// Scopes that carry no resource permission, only launch/identity/refresh meaning.
export const CONTEXT_SCOPES = new Set([
  'openid',
  'fhirUser',
  'profile',
  'launch',
  'launch/patient',
  'launch/encounter',
  'offline_access',
  'online_access',
]);

export function splitScopes(text) {
  return typeof text === 'string' ? text.split(/\s+/).filter(Boolean) : [];
}

export function parseClinicalScope(scope) {
  const m = CLINICAL.exec(scope);
  if (!m || m[3] === '') return null;
  const [, context, resourceType, perm, query] = m;
  let permissions;
  if (perm === 'read') permissions = 'rs';
  else if (perm === 'write') permissions = 'cud';
  else if (perm === '*') permissions = 'cruds';
  else permissions = perm;
  return { context, resourceType, permissions, query: query || null };
}

// The scopes this fixture grants: the requested ones the client is registered
// for, limited to what the grant type may carry. Real servers narrow rather than
// fail, so the token response's `scope` is what the client must look at.
//   flow 'user'   (authorization_code): context scopes + patient/ and user/ scopes
//   flow 'system' (client_credentials): system/ scopes only
export function grantScopes(requested, client, flow, scopesVersion = 'both') {
  const registered = new Set(client.scopes);
  const any = registered.has('*');
  return requested.filter((scope) => {
    if (!any && !registered.has(scope)) return false;
    // An EHR that speaks one scope syntax ignores the other (it narrows; it does not fail).
    const v = scopeVersion(scope);
    if (scopesVersion !== 'both' && v !== 0 && v !== scopesVersion) return false;
    const clinical = parseClinicalScope(scope);
    if (flow === 'system') return clinical !== null && clinical.context === 'system';
    if (clinical) return clinical.context !== 'system';
    return true;
  });
}

// Does any granted scope allow `permission` (one of c r u d s) on `resourceType`?
export function allows(grantedScopes, resourceType, permission) {
  return grantedScopes.some((scope) => {
    const parsed = parseClinicalScope(scope);
    if (!parsed || parsed.query) return false;
    if (parsed.resourceType !== '*' && parsed.resourceType !== resourceType) return false;
    return parsed.permissions.includes(permission);
  });
}
