// The fixture's own signing key, the tokens it issues, and their verification.
//
// Access tokens are JWTs signed with the same RS256 key as id_tokens. Clients must
// treat them as opaque (SMART says so); they are JWTs only so that /fhir can check
// them without a lookup. Every token belongs to a "family" (one authorization code
// or one client_credentials grant, plus every refresh from it), so that a replayed
// code or refresh token can revoke everything issued from it, as RFC 6749 §4.1.2
// and the OAuth security BCP ask.

import * as jose from 'jose';
import { nowSeconds, randomToken } from './http.mjs';

const SIGNING_ALG = 'RS256';

export async function createSigningKey() {
  const { publicKey, privateKey } = await jose.generateKeyPair(SIGNING_ALG, { extractable: true });
  const publicJwk = await jose.exportJWK(publicKey);
  const kid = await jose.calculateJwkThumbprint(publicJwk);
  const jwks = { keys: [{ ...publicJwk, kid, alg: SIGNING_ALG, use: 'sig' }] };
  return { kid, privateKey, jwks, keySet: jose.createLocalJWKSet(jwks) };
}

export class TokenService {
  constructor(state) {
    this.state = state; // see state.mjs: key, settings, families, urls
  }

  newFamily(clientId) {
    const id = randomToken(12);
    this.state.families.set(id, { client_id: clientId, revoked: false, created: nowSeconds() });
    return id;
  }

  familyRevoked(id) {
    const family = this.state.families.get(id);
    return !family || family.revoked;
  }

  revokeFamily(id) {
    const family = this.state.families.get(id);
    if (family) family.revoked = true;
  }

  // Revokes every family (optionally only one client's). Used by /_test/revoke.
  revokeAll(clientId) {
    let n = 0;
    for (const family of this.state.families.values()) {
      if (!family.revoked && (!clientId || family.client_id === clientId)) {
        family.revoked = true;
        n++;
      }
    }
    return n;
  }

  async accessToken({ family, clientId, subject, scopes, context }) {
    const { key, urls, settings } = this.state;
    const ttl = settings.tokenTtl;
    const claims = { client_id: clientId, scope: scopes.join(' '), fam: family };
    if (context?.patient) claims.patient = context.patient;
    if (context?.encounter) claims.encounter = context.encounter;
    const token = await new jose.SignJWT(claims)
      .setProtectedHeader({ alg: SIGNING_ALG, kid: key.kid, typ: 'at+jwt' })
      .setIssuer(urls.issuer)
      .setAudience(urls.fhirBase)
      .setSubject(subject)
      .setJti(randomToken(16))
      .setIssuedAt()
      .setExpirationTime(nowSeconds() + ttl)
      .sign(key.privateKey);
    return { token, expiresIn: ttl };
  }

  // Returns the claims of a valid, unexpired, unrevoked access token, or throws
  // with a message suitable for WWW-Authenticate's error_description.
  async verifyAccessToken(token) {
    const { key, urls } = this.state;
    let payload;
    try {
      ({ payload } = await jose.jwtVerify(token, key.keySet, {
        algorithms: [SIGNING_ALG],
        issuer: urls.issuer,
        audience: urls.fhirBase,
        typ: 'at+jwt',
        requiredClaims: ['exp', 'jti', 'fam'],
      }));
    } catch (e) {
      throw new Error(e.code === 'ERR_JWT_EXPIRED' ? 'access token expired' : `invalid access token (${e.code || e.message})`);
    }
    if (this.familyRevoked(payload.fam)) throw new Error('access token revoked');
    return payload;
  }

  async idToken({ clientId, user, scopes, nonce, authTime }) {
    const { key, urls, settings } = this.state;
    const skew = settings.clockSkewSecs || 0;
    const claims = { auth_time: authTime + skew };
    if (nonce) claims.nonce = nonce;
    if (settings.idTokenAmr) claims.amr = settings.idTokenAmr;
    if (settings.idTokenAcr) claims.acr = settings.idTokenAcr;
    // "$client" stands for the client's id (in azp and aud).
    const client = (a) => (a === '$client' ? clientId : a);
    if (settings.idTokenAzp) claims.azp = client(settings.idTokenAzp);
    // fhirUser is an absolute URL of the user's FHIR resource (SMART App Launch 2, §fhirUser);
    // some EHRs send it relative (fhir_user_form).
    if (scopes.includes('fhirUser')) {
      claims.fhirUser = settings.fhirUserForm === 'relative' ? user : `${urls.fhirBase}/${user}`;
    }
    const ec = settings.idTokenAlg === 'ES384' && this.state.ecKey;
    const alg = ec ? 'ES384' : SIGNING_ALG;
    const kid = ec ? this.state.ecKey.kid : key.kid;
    return new jose.SignJWT(claims)
      .setProtectedHeader(settings.idTokenKid ? { alg, kid, typ: 'JWT' } : { alg, typ: 'JWT' })
      .setIssuer(urls.issuer)
      .setAudience(Array.isArray(settings.idTokenAud) ? settings.idTokenAud.map(client) : client(settings.idTokenAud ?? clientId))
      .setSubject(user)
      .setIssuedAt(nowSeconds() + skew)
      .setExpirationTime(nowSeconds() + skew + settings.tokenTtl)
      .sign(ec ? this.state.ecKey.privateKey : key.privateKey);
  }
}
