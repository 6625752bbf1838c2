"""Validates Courier's own conformance resources in fhir-profiles/ (everything but the
SearchParameters, which check_search_parameters.py covers) with the independent fhir.resources
models (R4B, which also defines SubscriptionTopic)."""
import glob, importlib, json, os, sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "fhir-profiles")
ok = bad = 0
for f in sorted(glob.glob(os.path.join(root, "*", "*.json"))):
    if os.sep + "SearchParameter" + os.sep in f:
        continue
    raw = open(f).read()
    d = json.loads(raw)
    rt = d["resourceType"]
    model = getattr(importlib.import_module(f"fhir.resources.R4B.{rt.lower()}"), rt)
    try:
        model.model_validate_json(raw)
        assert d["url"].endswith("/" + rt + "/" + d["id"]), f"url {d['url']} does not end with {rt}/{d['id']}"
        ok += 1
    except Exception as e:
        print("FAIL", os.path.relpath(f, root), e)
        bad += 1
print(f"profiles: {ok} valid, {bad} invalid")
sys.exit(1 if bad else 0)
