"""The Starlette app driven directly through ASGI (no sockets): routing, body caps and
timeouts, reload before the answer, and a hub-side fault as a JSON 500."""

import asyncio
import json
import shutil
from typing import Dict, List, Optional, Tuple

import jsonschema_rs

from tinc_hub import app as app_mod
from tinc_hub.app import create_app
from tinc_hub.enroll import MAX_BODY_BYTES
from tinc_hub.reload import ReloadBatcher
from hub_fixtures import HubEnv, hub, rsa_public_pem  # noqa: F401


def call(asgi, method: str, path: str, chunks: List[bytes], headers: Dict[str, str],
         stall: bool = False) -> Tuple[int, Dict[str, str], bytes]:
    """Run one request through the ASGI app; ``stall`` leaves the body unfinished."""

    async def run() -> Tuple[int, Dict[str, str], bytes]:
        pending = list(chunks)
        sent: List[dict] = []

        async def receive() -> dict:
            if pending:
                chunk = pending.pop(0)
                return {"type": "http.request", "body": chunk, "more_body": bool(pending) or stall}
            if stall:
                await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "https", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 8655),
                 "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
        try:
            await asgi(scope, receive, send)
        except Exception:  # Starlette re-raises to the server after sending its 500
            pass
        start = next(m for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body

    return asyncio.run(run())


class CountingSighup:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return True


def make(hub: HubEnv, source: Optional[bytes] = b"print('hi')\n"):
    sighup = CountingSighup()
    return create_app(hub.config, hub.registry, ReloadBatcher(sighup, 0.01), source), sighup


def test_enrol_sends_sighup_before_answering_and_not_on_replay(hub: HubEnv) -> None:
    asgi, sighup = make(hub)
    token = hub.token().token
    raw = json.dumps({"name": "n1", "public_key": rsa_public_pem(1)}).encode()
    headers = {"authorization": "Bearer " + token, "content-length": str(len(raw))}
    status, _, body = call(asgi, "POST", "/v1/enroll", [raw[:10], raw[10:]], headers)
    assert status == 200 and json.loads(body)["address"] == "10.77.0.2"
    assert sighup.calls == 1
    status, _, _ = call(asgi, "POST", "/v1/enroll", [raw], headers)
    assert status == 200 and sighup.calls == 1  # replay: host file unchanged, no SIGHUP


def test_body_caps_and_timeout(hub: HubEnv, monkeypatch) -> None:
    asgi, sighup = make(hub)
    auth = {"authorization": "Bearer " + hub.token().token}
    status, headers, body = call(asgi, "POST", "/v1/enroll", [b"x"],
                                 {**auth, "content-length": str(MAX_BODY_BYTES + 1)})
    assert status == 413 and headers.get("connection") == "close" and "error" in json.loads(body)
    status, _, _ = call(asgi, "POST", "/v1/enroll", [b" " * 8192] * 3, auth)  # no length: counted
    assert status == 413
    status, _, _ = call(asgi, "POST", "/v1/enroll", [b"{}"], {**auth, "content-length": "abc"})
    assert status == 400
    monkeypatch.setattr(app_mod, "BODY_TIMEOUT", 0.2)
    asgi, _ = make(hub)
    status, _, body = call(asgi, "POST", "/v1/enroll", [b"{"], {**auth, "content-length": "50"}, stall=True)
    assert status == 408 and "error" in json.loads(body)
    assert sighup.calls == 0


def test_routes(hub: HubEnv) -> None:
    asgi, _ = make(hub, source=b"#!/usr/bin/env python3\n")
    status, headers, body = call(asgi, "GET", "/bootstrap.py", [], {})
    assert status == 200 and headers["content-type"].startswith("text/x-python")
    assert body == b"#!/usr/bin/env python3\n"
    assert call(asgi, "GET", "/healthz", [], {})[0] == 200
    assert json.loads(call(asgi, "GET", "/openapi.json", [], {})[2])["openapi"].startswith("3.")
    status, _, body = call(asgi, "GET", "/nope", [], {})
    assert status == 404 and set(json.loads(body)) == {"error"}
    status, headers, body = call(asgi, "GET", "/v1/enroll", [], {})
    assert status == 405 and "POST" in headers["allow"] and set(json.loads(body)) == {"error"}


def test_hub_fault_is_json_500_without_details(hub: HubEnv) -> None:
    asgi, _ = make(hub)
    shutil.rmtree(hub.config.hosts_dir)  # the hub's hosts/ is not a directory: a hub fault
    hub.config.hosts_dir.write_text("")
    raw = json.dumps({"name": "n1", "public_key": rsa_public_pem(1)}).encode()
    status, _, body = call(asgi, "POST", "/v1/enroll", [raw],
                           {"authorization": "Bearer " + hub.token().token})
    assert status == 500 and set(json.loads(body)) == {"error"}
    assert "hosts" not in json.loads(body)["error"]


def _validator(schema: dict, name: str):
    """A format-checking validator of the document's component ``name`` (OpenAPI 3.0's
    schemas here use only JSON Schema draft 7 keywords)."""
    return jsonschema_rs.Draft7Validator(schema["components"]["schemas"][name], validate_formats=True)


def _assert_answer_documented(schema: dict, name: str, answer: dict) -> None:
    """``answer`` is valid against component ``name`` and carries no key the document does not
    name (an undocumented field would be a silent contract)."""
    _validator(schema, name).validate(answer)
    assert set(answer) <= set(schema["components"]["schemas"][name]["properties"]), name


def test_every_route_is_documented_and_every_answer_matches_the_document(hub: HubEnv) -> None:
    """openapi.json names each route and method the app serves, and real answers of enrol,
    sync, rotate-key, healthz and a refusal validate against their documented schemas."""
    asgi, _ = make(hub)
    schema = json.loads(call(asgi, "GET", "/openapi.json", [], {})[2])
    routed = {(route.path, method) for route in asgi.app.routes for method in route.methods - {"HEAD"}}
    documented = {(path, method.upper()) for path, ops in schema["paths"].items() for method in ops}
    assert routed == documented

    raw = json.dumps({"name": "n1", "public_key": rsa_public_pem(1)}).encode()
    status, _, body = call(asgi, "POST", "/v1/enroll", [raw], {"authorization": "Bearer " + hub.token().token})
    enrolled = json.loads(body)
    assert status == 200 and "credential" in enrolled and enrolled["hubs"]
    _assert_answer_documented(schema, "EnrollResponse", enrolled)

    sync = {"name": "n1", "credential": enrolled["credential"]}
    status, _, body = call(asgi, "POST", "/v1/sync", [json.dumps(sync).encode()], {})
    synced = json.loads(body)
    assert status == 200 and "names" in synced
    _assert_answer_documented(schema, "SyncResponse", synced)
    _validator(schema, "SyncRequest").validate(sync)

    new_credential = "ab" * 32
    rotation = {"name": "n1", "credential": enrolled["credential"], "public_key": rsa_public_pem(2),
                "new_credential": new_credential}
    _validator(schema, "RotateKeyRequest").validate(rotation)
    status, _, body = call(asgi, "POST", "/v1/rotate-key", [json.dumps(rotation).encode()], {})
    assert status == 200
    _assert_answer_documented(schema, "RotateKeyResponse", json.loads(body))

    status, _, body = call(asgi, "POST", "/v1/sync", [json.dumps(sync).encode()], {})
    assert status == 401 and str(status) in schema["paths"]["/v1/sync"]["post"]["responses"]
    _assert_answer_documented(schema, "Error", json.loads(body))
    _assert_answer_documented(schema, "Health", json.loads(call(asgi, "GET", "/healthz", [], {})[2]))

    broken = dict(synced, interval="30")  # the validator does reject what the document forbids
    assert not _validator(schema, "SyncResponse").is_valid(broken)
