#!/usr/bin/env node
// The peer in `cargo bench --bench versus` (issue 24): Medplum's FhirRouter over the strict
// in-memory repository the test EHR uses, with R4 validation of writes, behind a bare HTTP
// server: no authorization, no audit, no encryption, no disk. Only what the benchmark sends:
//   POST /fhir/Communication   (201 with the stored resource)
//   GET  /fhir/Communication?… (200 with the search Bundle)
// Prints one JSON line {"base": "http://127.0.0.1:PORT/fhir"} when it listens.
import { createServer } from 'node:http';
import { getStatus, normalizeOperationOutcome, validateResource } from '@medplum/core';
import { FhirRouter } from '@medplum/fhir-router';
import { loadR4Definitions, StrictMemoryRepository } from './lib/repository.mjs';

loadR4Definitions();
const repo = new StrictMemoryRepository();
const router = new FhirRouter();

function send(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/fhir+json; charset=utf-8', 'Content-Length': Buffer.byteLength(text) });
  res.end(text);
}

const server = createServer(async (req, res) => {
  const url = new URL(req.url, 'http://localhost');
  const path = url.pathname.replace(/^\/fhir\//, '');
  try {
    let body;
    if (req.method === 'POST') {
      const chunks = [];
      for await (const c of req) chunks.push(c);
      body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
      delete body.id;
      validateResource(body);
    }
    const qs = url.searchParams.toString();
    const [outcome, resource] = await router.handleRequest(
      { method: req.method, url: qs ? `${path}?${qs}` : path, pathname: '', body, params: {}, query: {}, headers: req.headers },
      repo
    );
    send(res, getStatus(outcome), resource ?? outcome);
  } catch (err) {
    send(res, 400, normalizeOperationOutcome(err));
  }
});

server.keepAliveTimeout = 120000;
server.headersTimeout = 130000;
server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`${JSON.stringify({ base: `http://127.0.0.1:${server.address().port}/fhir` })}\n`);
});
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
