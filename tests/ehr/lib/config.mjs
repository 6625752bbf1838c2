// Configuration: CLI flags win over environment variables, which win over defaults.
// Everything a test may want to change *during* a run is also settable through
// /_test/settings, so flags only matter for what must be known at start.

import { readFileSync } from 'node:fs';
import { normalizeClient } from './clients.mjs';

const FLAGS = {
  port: { env: 'EHR_PORT', type: 'int', default: 0 },
  name: { env: 'EHR_NAME', type: 'string', default: 'ehr' },
  clients: { env: 'EHR_CLIENTS_FILE', type: 'string', default: '' }, // path to a JSON file
  'clients-json': { env: 'EHR_CLIENTS', type: 'string', default: '' }, // inline JSON
  'token-ttl': { env: 'EHR_TOKEN_TTL', type: 'int', default: 300 },
  'refresh-ttl': { env: 'EHR_REFRESH_TTL', type: 'int', default: 86400 },
  'refresh-rotation': { env: 'EHR_REFRESH_ROTATION', type: 'bool', default: true },
  'auto-approve': { env: 'EHR_AUTO_APPROVE', type: 'string', default: '' }, // e.g. Practitioner/dr-1
  'standalone-patient': { env: 'EHR_STANDALONE_PATIENT', type: 'string', default: '' },
  deny: { env: 'EHR_DENY', type: 'bool', default: false },
  'max-lifetime': { env: 'EHR_MAX_LIFETIME', type: 'int', default: 0 }, // seconds; 0 = run until killed
  'exit-on-stdin-eof': { env: 'EHR_EXIT_ON_STDIN_EOF', type: 'bool', default: false },
  quiet: { env: 'EHR_QUIET', type: 'bool', default: false },
};

export const USAGE = `usage: node server.mjs [--port N] [--name NAME] [--clients FILE | --clients-json JSON]
  [--token-ttl S] [--refresh-ttl S] [--refresh-rotation true|false]
  [--auto-approve Practitioner/ID] [--standalone-patient ID] [--deny true|false]
  [--max-lifetime S] [--exit-on-stdin-eof] [--quiet]
Every flag has an environment variable (see README.md).`;

function convert(name, spec, raw) {
  if (spec.type === 'int') {
    const n = Number(raw);
    if (!Number.isInteger(n) || n < 0) throw new Error(`--${name}: not a non-negative integer: ${raw}`);
    return n;
  }
  if (spec.type === 'bool') {
    if (raw === true || raw === 'true' || raw === '1' || raw === 'yes') return true;
    if (raw === false || raw === 'false' || raw === '0' || raw === 'no' || raw === '') return false;
    throw new Error(`--${name}: not a boolean: ${raw}`);
  }
  return String(raw);
}

export function parseConfig(argv, env) {
  const values = {};
  for (const [name, spec] of Object.entries(FLAGS)) {
    values[name] = env[spec.env] !== undefined ? convert(name, spec, env[spec.env]) : spec.default;
  }
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (!arg.startsWith('--')) throw new Error(`unexpected argument ${arg}\n${USAGE}`);
    let [name, inline] = arg.slice(2).split(/=(.*)/s, 2);
    const spec = FLAGS[name];
    if (!spec) throw new Error(`unknown flag --${name}\n${USAGE}`);
    let raw = inline;
    if (raw === undefined) {
      // Boolean flags may stand alone; everything else takes the next argument.
      if (spec.type === 'bool' && (i + 1 >= argv.length || argv[i + 1].startsWith('--'))) raw = true;
      else raw = argv[++i];
    }
    if (raw === undefined) throw new Error(`--${name} needs a value`);
    values[name] = convert(name, spec, raw);
  }

  let clientList = [];
  if (values.clients) clientList = clientList.concat(loadClients(readFileSync(values.clients, 'utf8'), values.clients));
  if (values['clients-json']) clientList = clientList.concat(loadClients(values['clients-json'], 'EHR_CLIENTS'));

  return {
    port: values.port,
    name: values.name,
    clients: clientList.map(normalizeClient),
    tokenTtl: values['token-ttl'],
    refreshTtl: values['refresh-ttl'],
    refreshRotation: values['refresh-rotation'],
    autoApproveUser: values['auto-approve'] || null,
    standalonePatient: values['standalone-patient'] || null,
    deny: values.deny,
    maxLifetime: values['max-lifetime'],
    exitOnStdinEof: values['exit-on-stdin-eof'],
    quiet: values.quiet,
  };
}

// Accepts a JSON array of clients, a single client object, or {"clients": [...]}.
function loadClients(text, origin) {
  let parsed;
  try {
    parsed = JSON.parse(text);
  } catch (e) {
    throw new Error(`${origin}: not valid JSON: ${e.message}`);
  }
  if (Array.isArray(parsed)) return parsed;
  if (parsed && Array.isArray(parsed.clients)) return parsed.clients;
  if (parsed && typeof parsed === 'object') return [parsed];
  throw new Error(`${origin}: expected a client, a list of clients or {"clients": [...]}`);
}
