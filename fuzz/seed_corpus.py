"""Seeds fuzz/corpus/<target>/ with the payloads of fixtures/formats/ (good and malformed)."""
import base64, json, pathlib, hashlib

root = pathlib.Path(__file__).resolve().parent
targets = {"senml-json": "senml_json", "senml-cbor": "senml_cbor", "ble-2a37": "ble_2a37",
           "ble-2a1c": "ble_2a1c", "ble-2a35": "ble_2a35", "ble-2a5e": "ble_2a5e",
           "ble-2a5f": "ble_2a5f", "ble-gatt": "ble_gatt", "fhir": "fhir", "omh": "omh",
           "csv": "csv", "json": "json"}
for fixture, target in targets.items():
    out = root / "corpus" / target
    out.mkdir(parents=True, exist_ok=True)
    for line in (root.parent / "fixtures" / "formats" / f"{fixture}.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "payload_b64" in m:
            data = base64.b64decode(m["payload_b64"])
        elif isinstance(m["payload"], str):
            data = m["payload"].encode()
        else:
            data = json.dumps(m["payload"], separators=(",", ":")).encode()
        (out / hashlib.sha1(data).hexdigest()).write_bytes(data)
