"""An independent SMART Backend Services client against Courier: discovery with `requests`, the
client assertion signed by PyJWT, then FHIR create/read/search through the `fhirpy` client.

Usage: backend_services.py BASE_URL CLIENT_ID KEY_PEM_FILE KID ALG(RS384|ES384)
Prints one JSON line with what it did; exits non-zero on any failure.
"""
import json
import sys
import time
import uuid

import jwt
import requests
from fhirpy import SyncFHIRClient

base, client_id, key_file, kid, alg = sys.argv[1:6]
key = open(key_file).read()

config = requests.get(f"{base}/.well-known/smart-configuration", timeout=10).json()
assert alg in config["token_endpoint_auth_signing_alg_values_supported"], config
assert "client_credentials" in config["grant_types_supported"], config
token_url = config["token_endpoint"]

assertion = jwt.encode(
    {"iss": client_id, "sub": client_id, "aud": token_url,
     "exp": int(time.time()) + 300, "jti": str(uuid.uuid4())},
    key, algorithm=alg, headers={"kid": kid, "typ": "JWT"})
r = requests.post(token_url, data={
    "grant_type": "client_credentials",
    "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
    "client_assertion": assertion,
    "scope": "system/Communication.cruds",
}, timeout=10)
assert r.status_code == 200, (r.status_code, r.text)
token = r.json()
assert token["token_type"].lower() == "bearer" and token["expires_in"] <= 300, token
assert r.headers.get("Cache-Control") == "no-store", r.headers

fhir = SyncFHIRClient(base, authorization=f"Bearer {token['access_token']}")
recipient = f"Patient/py-{uuid.uuid4().hex[:8]}"
created = fhir.resource("Communication", status="completed", recipient=[{"reference": recipient}],
                        sent="2026-11-28T10:00:00Z", payload=[{"contentString": f"from {alg} client"}])
created.save()
assert created.id, "the server assigned an id"
again = fhir.reference("Communication", created.id).to_resource()
assert again["payload"][0]["contentString"] == f"from {alg} client"
found = fhir.resources("Communication").search(recipient=recipient).fetch_all()
assert [c.id for c in found] == [created.id], found

# Without the token the same client is refused.
anonymous = SyncFHIRClient(base)
try:
    anonymous.resources("Communication").search(recipient=recipient).fetch_all()
    raise SystemExit("an anonymous search was answered")
except Exception as e:  # fhirpy raises on 401
    assert "401" in str(e) or "Unauthorized" in str(e) or "login" in str(e), repr(e)

print(json.dumps({"id": created.id, "recipient": recipient, "found": len(found), "scope": token["scope"]}))
