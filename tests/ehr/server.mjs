#!/usr/bin/env node
// One process = one test EHR (FHIR R4 + SMART authorization server) on 127.0.0.1.
// When ready it prints exactly one JSON line on stdout:
//   {"base": "http://127.0.0.1:PORT/fhir", "issuer": ..., "pid": ..., ...}
// Everything else (request log, errors) goes to stderr. See README.md.

import { createEhr } from './lib/app.mjs';
import { parseConfig, USAGE } from './lib/config.mjs';

if (process.argv.includes('--help') || process.argv.includes('-h')) {
  process.stdout.write(`${USAGE}\n`);
  process.exit(0);
}

let config;
try {
  config = parseConfig(process.argv.slice(2), process.env);
} catch (e) {
  process.stderr.write(`${e.message}\n`);
  process.exit(2);
}

const log = config.quiet ? () => {} : (line) => process.stderr.write(`[${config.name}] ${line}\n`);
const ehr = await createEhr(config, log);
const urls = await ehr.listen(config.port);

let stopping = false;
async function stop(reason) {
  if (stopping) return;
  stopping = true;
  log(`stopping: ${reason}`);
  // Do not wait forever for clients that keep connections open.
  setTimeout(() => process.exit(0), 2000).unref();
  await ehr.close();
  process.exit(0);
}
process.on('SIGTERM', () => stop('SIGTERM'));
process.on('SIGINT', () => stop('SIGINT'));
// A test harness that dies without killing us closes our stdin; leave with it.
if (config.exitOnStdinEof) {
  process.stdin.on('end', () => stop('stdin closed'));
  process.stdin.on('error', () => stop('stdin error'));
  process.stdin.resume();
}
// A hard upper bound on the lifetime, so a forgotten fixture cannot outlive a test run.
if (config.maxLifetime > 0) setTimeout(() => stop('max lifetime reached'), config.maxLifetime * 1000).unref();

process.stdout.write(
  `${JSON.stringify({
    name: config.name,
    base: urls.fhirBase,
    issuer: urls.issuer,
    pid: process.pid,
    port: Number(new URL(urls.origin).port),
    authorize: urls.authorize,
    token: urls.token,
    jwks_uri: urls.jwks,
    test_api: `${urls.origin}/_test`,
  })}\n`
);
