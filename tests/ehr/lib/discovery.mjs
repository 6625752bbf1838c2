// Public discovery documents: the FHIR CapabilityStatement (/fhir/metadata), the
// SMART configuration (/fhir/.well-known/smart-configuration) and the OpenID
// provider metadata (/fhir/.well-known/openid-configuration).

export const RESOURCE_TYPES = ['Patient', 'Practitioner', 'RelatedPerson', 'CareTeam', 'Encounter', 'AuditEvent', 'Communication'];

const INTERACTIONS = ['read', 'vread', 'history-instance', 'search-type', 'create', 'update'];

export const SCOPES_SUPPORTED = [
  'openid',
  'fhirUser',
  'launch',
  'launch/patient',
  'launch/encounter',
  'offline_access',
  'online_access',
  'patient/*.rs',
  'patient/*.cruds',
  'user/*.rs',
  'user/*.cruds',
  'system/*.rs',
  'system/*.cruds',
  'patient/*.read',
  'user/*.read',
  'user/*.write',
  'system/*.read',
  'system/*.write',
];

export function smartConfiguration(urls, scopesVersion = 'both') {
  return {
    issuer: urls.issuer,
    jwks_uri: urls.jwks,
    authorization_endpoint: urls.authorize,
    token_endpoint: urls.token,
    token_endpoint_auth_methods_supported: ['private_key_jwt'],
    token_endpoint_auth_signing_alg_values_supported: ['RS384', 'ES384'],
    grant_types_supported: ['authorization_code', 'client_credentials', 'refresh_token'],
    scopes_supported: SCOPES_SUPPORTED.filter((x) => scopesVersion === 'both' || scopeVersion(x) === 0 || scopeVersion(x) === scopesVersion),
    response_types_supported: ['code'],
    code_challenge_methods_supported: ['S256'],
    capabilities: [
      'launch-ehr',
      'launch-standalone',
      'authorize-post',
      'client-confidential-asymmetric',
      'context-ehr-patient',
      'context-ehr-encounter',
      'context-standalone-patient',
      'context-standalone-encounter',
      'context-banner',
      'context-style',
      'sso-openid-connect',
      'permission-offline',
      'permission-online',
      'permission-patient',
      'permission-user',
      ...(scopesVersion === 2 ? [] : ['permission-v1']),
      ...(scopesVersion === 1 ? [] : ['permission-v2']),
    ],
  };
}

export function openidConfiguration(urls) {
  return {
    issuer: urls.issuer,
    authorization_endpoint: urls.authorize,
    token_endpoint: urls.token,
    jwks_uri: urls.jwks,
    response_types_supported: ['code'],
    subject_types_supported: ['public'],
    id_token_signing_alg_values_supported: ['RS256'],
    token_endpoint_auth_methods_supported: ['private_key_jwt'],
    token_endpoint_auth_signing_alg_values_supported: ['RS384', 'ES384'],
    scopes_supported: ['openid', 'fhirUser'],
    claims_supported: ['iss', 'sub', 'aud', 'exp', 'iat', 'auth_time', 'nonce', 'fhirUser'],
    code_challenge_methods_supported: ['S256'],
  };
}

export function capabilityStatement(urls, name, startedAt, oauthUris = 'same') {
  // 'elsewhere': endpoints that answer nothing (an EHR whose documents disagree).
  const other = (u) => (oauthUris === 'elsewhere' ? u.replace(/\/([^/]*)$/, '/moved-$1') : u);
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: startedAt,
    kind: 'instance',
    software: { name: `Courier test EHR (Medplum MemoryRepository)` },
    implementation: { description: `test EHR "${name}"`, url: urls.fhirBase },
    fhirVersion: '4.0.1',
    format: ['application/fhir+json', 'json'],
    rest: [
      {
        mode: 'server',
        security: {
          cors: false,
          service: [
            {
              coding: [
                {
                  system: 'http://terminology.hl7.org/CodeSystem/restful-security-service',
                  code: 'SMART-on-FHIR',
                },
              ],
            },
          ],
          extension: [
            {
              url: 'http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris',
              extension: [
                { url: 'authorize', valueUri: other(urls.authorize) },
                { url: 'token', valueUri: other(urls.token) },
              ],
            },
          ],
        },
        resource: RESOURCE_TYPES.map((type) => ({
          type,
          interaction: INTERACTIONS.map((code) => ({ code })),
          versioning: 'versioned-update',
          readHistory: true,
          updateCreate: true,
          conditionalCreate: true,
        })),
      },
    ],
  };
}

// 1 for a SMART v1 clinical scope (…read, …write, ….*), 2 for a v2 one (….cruds), 0 otherwise.
export function scopeVersion(scope) {
  const m = /^(patient|user|system)\/(\*|[A-Z][A-Za-z]+)\.([a-z*]+)/.exec(scope);
  if (!m) return 0;
  return ['read', 'write', '*'].includes(m[3]) ? 1 : 2;
}
