import json, glob, os, re, sys
from fhir.resources.R4B.searchparameter import SearchParameter
files = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "fhir-profiles", "SearchParameter", "*.json")))
ok = bad = 0
# FHIRPath subset accepted by the Courier indexer
# (a cast may be followed by more path: Communication.payload.content.ofType(Attachment).url)
term = r"(?:\(\s*{b}(?:\.[A-Za-z][A-Za-z0-9]*)+ as [A-Za-z]+\s*\)|{b}(?:\.[A-Za-z][A-Za-z0-9]*)+(?:\.where\(resolve\(\) is [A-Z][A-Za-z]+\)|\.as\([A-Za-z]+\)|\.ofType\([A-Za-z]+\)|\.[A-Za-z][A-Za-z0-9]*)*)"
for f in files:
    errs = []
    try:
        raw = open(f).read()
        d = json.loads(raw)
    except Exception as e:
        print("JSON FAIL", f, e); bad += 1; continue
    try:
        SearchParameter.model_validate_json(raw)
    except Exception as e:
        errs.append(f"model: {e}")
    for k in ("code", "base", "type", "expression"):
        if not d.get(k): errs.append(f"missing {k}")
    # fhir.resources does not enforce required code bindings, so check them here
    if d.get("status") not in {"draft","active","retired","unknown"}: errs.append(f"bad status {d.get('status')}")
    if d.get("type") not in {"number","date","string","token","reference","composite","quantity","uri","special"}: errs.append(f"bad type {d.get('type')}")
    if d.get("version") != "4.0.1": errs.append("version != 4.0.1")
    if not set(d.get("comparator", [])) <= {"eq","ne","gt","lt","ge","le","sa","eb","ap"}: errs.append("bad comparator")
    if d.get("xpathUsage", "normal") not in {"normal","phonetic","nearby","distance","other"}: errs.append("bad xpathUsage")
    if d.get("type") in ("token","string","uri","reference") and "comparator" in d: errs.append("comparator on non-ordered type")
    base = d.get("base") or []
    if len(base) != 1: errs.append(f"base must have exactly one entry: {base}")
    else:
        b = base[0]
        expr = d.get("expression", "")
        parts = [p.strip() for p in expr.split(" | ")]
        for p in parts:
            if not re.fullmatch(term.format(b=re.escape(b)), p):
                errs.append(f"expression part outside subset / not rooted at {b}: {p!r}")
        name = os.path.basename(f)[:-5]
        if name != f"{b}-{d.get('code')}": errs.append(f"filename {name} != {b}-{d.get('code')}")
        if d.get("type") == "reference" and not d.get("target"): errs.append("reference without target")
    if errs:
        bad += 1; print("FAIL", os.path.basename(f)); [print("   ", e) for e in errs]
    else:
        ok += 1
print(f"{ok} passed, {bad} failed")
sys.exit(1 if bad else 0)
