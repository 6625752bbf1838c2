"""Independent validation of what Courier emits, with PyPI fhir.resources (R4B models, which accept
R4 JSON for the resources Courier serves).

Reads a JSON array of resources on stdin; prints one line per invalid resource and exits 1 if any.
Bundles are validated whole (which validates every entry's resource too).
"""
import json
import sys

from fhir.resources.R4B import get_fhir_model_class


def main() -> int:
    docs = json.load(sys.stdin)
    bad = 0
    for i, doc in enumerate(docs):
        rt = doc.get("resourceType", "?")
        try:
            get_fhir_model_class(rt).model_validate(doc)
        except Exception as e:  # noqa: BLE001 - report every failure, whatever its kind
            bad += 1
            print(f"[{i}] {rt} INVALID: {e}")
    print(f"validated {len(docs)} resources: {len(docs) - bad} valid, {bad} invalid")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
