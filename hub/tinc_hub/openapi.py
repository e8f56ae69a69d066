"""The hand-written OpenAPI 3 description of the hub's HTTP API."""

from typing import Any, Dict

from . import __version__
from .enroll import MAX_BODY_BYTES
from .node_sync import MAX_SYNC_BODY_BYTES, SYNC_INTERVAL_MAX, SYNC_INTERVAL_MIN

_ERROR = {"$ref": "#/components/schemas/Error"}


# What the enrolment and the key rotation both answer about the node.
NODE_ADDRESS_PROPERTIES: Dict[str, Any] = {
    "net": {"type": "string"},
    "name": {"type": "string"},
    "address": {"type": "string", "format": "ipv4", "description": "The node's VPN address (no prefix)"},
    "prefix": {"type": "integer", "minimum": 0, "maximum": 32, "description": "VPN prefix length"},
}


# Every active hub, as an enrolment and a sync answer list them (roster.hubs_for_nodes).
HUBS_PROPERTY: Dict[str, Any] = {
    "type": "array",
    "description": "Every active hub, the answering one first",
    "items": {
        "type": "object",
        "required": ["name", "host_file", "api"],
        "properties": {
            "name": {"type": "string"},
            "host_file": {"type": "string", "description": "Full text of the hub's hosts/HUB"},
            "api": {"type": "object", "required": ["host", "port", "pin"],
                    "properties": {"host": {"type": "string"}, "port": {"type": "integer"},
                                   "pin": {"type": "string", "pattern": "^sha256//[A-Za-z0-9+/]{43}=$",
                                           "description": "curl's --pinnedpubkey form of the "
                                                          "hub's TLS public key"}}},
        },
    },
}
NAMES_PROPERTY: Dict[str, Any] = {
    "type": "object", "additionalProperties": {"type": "string", "format": "ipv4"},
    "description": "Tinc name -> VPN address of every hub and node not revoked (the node "
                   "resolves NAME.NET); left out when the node's names_tag shows it has them"}


def _with_retry_after(response: Dict[str, Any]) -> Dict[str, Any]:
    """An error response that says in Retry-After when to try again (429, 503)."""
    return dict(response, headers={"Retry-After": {"description": "Seconds to wait before retrying",
                                                   "schema": {"type": "integer"}}})


def _error_response(description: str) -> Dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


def _schema_content(schema: str) -> Dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}


def _json_body(schema: str) -> Dict[str, Any]:
    """A required JSON request body of the component ``schema``."""
    return {"required": True, "content": _schema_content(schema)}


def _json_answer(description: str, schema: str) -> Dict[str, Any]:
    """A JSON response of the component ``schema``."""
    return {"description": description, "content": _schema_content(schema)}


def openapi_schema() -> Dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "tinc-hub enrolment API",
            "version": __version__,
            "description": "Nodes fetch bootstrap.py and enrol into a tinc 1.0 VPN with a token "
                           "made by 'tinc-hub token create'. The server certificate is self-signed; "
                           "clients pin its SubjectPublicKeyInfo (the 'k' field of the token).",
        },
        "paths": {
            "/bootstrap.py": {
                "get": {
                    "summary": "The node-side enrolment script (Python 3, standard library only)",
                    "responses": {"200": {"description": "The script",
                                          "content": {"text/x-python": {"schema": {"type": "string"}}}}},
                }
            },
            "/v1/enroll": {
                "post": {
                    "summary": "Enrol a node: register its RSA public key, allocate its VPN address",
                    "description": "Idempotent for the same name and key: replaying the request "
                                   "returns the same answer and spends no token use. The answer "
                                   "is sent after the hub's tincd was told (SIGHUP) about the node.",
                    "security": [{"token": []}],
                    "requestBody": _json_body("EnrollRequest"),
                    "responses": {
                        "200": _json_answer("Enrolled", "EnrollResponse"),
                        "400": _error_response("Malformed body, invalid name or public key"),
                        "401": _error_response("Missing, malformed, unknown, expired, spent or revoked "
                                               "token (tinc-hub token revoke); a revoked token is "
                                               "refused for replays of its own enrolments too"),
                        "403": _error_response("Token bound to another name (token create --name), or "
                                               "node revoked"),
                        "408": _error_response("Request body not received in time"),
                        "409": _error_response("Name enrolled with another key (without a token made "
                                               "with --name NAME --replace for that name), key "
                                               "enrolled under another name, a "
                                               "foreign host file exists, or the VPN subnet is full"),
                        "413": _error_response(f"Body larger than {MAX_BODY_BYTES} bytes"),
                        "429": _with_retry_after(_error_response("Too many enrolment attempts from this client"
                                                    " address (tinc-hub serve --rate-limit)")),
                        "503": _with_retry_after(_error_response("The hub cannot reach its registry (PostgreSQL"
                                                    " down or unreachable); nothing was changed")),
                    },
                }
            },
            "/v1/sync": {
                "post": {
                    "summary": "A node asks which hubs (and names) the net has now (its sync loop)",
                    "description": "The node proves its identity with the credential it got at "
                                   "enrolment (no token). An unknown name and a wrong credential "
                                   "get the same 401. `names` is left out when `names_tag` shows "
                                   "the node has them already.",
                    "requestBody": _json_body("SyncRequest"),
                    "responses": {
                        "200": _json_answer("The net's hubs as they are now", "SyncResponse"),
                        "400": _error_response("Malformed body, name, credential or names_tag"),
                        "401": _error_response("Unknown node name or wrong credential (one answer "
                                               "for both)"),
                        "403": _error_response("Node revoked"),
                        "408": _error_response("Request body not received in time"),
                        "410": _error_response("The node was removed (ephemeral, offline too long); "
                                               "sent only to a holder of its old credential"),
                        "413": _error_response(f"Body larger than {MAX_SYNC_BODY_BYTES} bytes"),
                        "503": _error_response("The hub cannot reach its registry; retry later"),
                    },
                }
            },
            "/v1/rotate-key": {
                "post": {
                    "summary": "A node replaces its own RSA key and credential (bootstrap.py "
                               "rotate-key)",
                    "description": "The node proves its identity with its sync credential (no "
                                   "token); the registry keeps the new key and new_credential's "
                                   "sha256 in one transaction, and the old credential is refused "
                                   "from then on. A retry with the new credential as credential "
                                   "and the new key returns 200 with rotated=false and changes "
                                   "nothing. The answer is sent after "
                                   "the hub's tincd re-read the node's host file (SIGHUP); the "
                                   "other hubs follow through the registry.",
                    "requestBody": _json_body("RotateKeyRequest"),
                    "responses": {
                        "200": _json_answer("The node's key is the one sent", "RotateKeyResponse"),
                        "400": _error_response("Malformed body, name, credential or public key"),
                        "401": _error_response("Unknown node name or wrong credential (one answer "
                                               "for both)"),
                        "403": _error_response("Node revoked"),
                        "408": _error_response("Request body not received in time"),
                        "409": _error_response("The key is another node's or hub's key"),
                        "413": _error_response(f"Body larger than {MAX_BODY_BYTES} bytes"),
                        "429": _with_retry_after(_error_response("Too many key rotations from this client "
                                                    "address (tinc-hub serve --rate-limit)")),
                        "503": _with_retry_after(_error_response("The hub cannot reach its registry; nothing "
                                                    "was changed")),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "responses": {"200": _json_answer("The hub is serving", "Health")},
                }
            },
            "/openapi.json": {
                "get": {"summary": "This document",
                        "responses": {"200": {"description": "OpenAPI 3 document",
                                              "content": {"application/json": {}}}}}
            },
        },
        "components": {
            "securitySchemes": {
                "token": {"type": "http", "scheme": "bearer",
                          "description": "The whole token as printed: 'tinc1.' + base64url JSON"},
            },
            "schemas": {
                "EnrollRequest": {
                    "type": "object",
                    "required": ["name", "public_key"],
                    "properties": {
                        "name": {"type": "string", "pattern": "^[A-Za-z0-9_]{1,64}$",
                                 "description": "tinc node name; not the hub's name"},
                        "public_key": {"type": "string",
                                       "description": "Exactly one PEM block, RSA >= 2048 bits, "
                                                      "'RSA PUBLIC KEY' (PKCS#1) or 'PUBLIC KEY' (SPKI)"},
                    },
                },
                "EnrollResponse": {
                    "type": "object",
                    "required": ["net", "name", "address", "prefix", "hub", "hubs"],
                    "properties": {
                        **NODE_ADDRESS_PROPERTIES,
                        "hub": {
                            "type": "object",
                            "required": ["name", "host_file"],
                            "properties": {
                                "name": {"type": "string"},
                                "host_file": {"type": "string",
                                              "description": "Full text of the hub's hosts/HUB"},
                            },
                        },
                        "hubs": HUBS_PROPERTY,
                        "credential": {"type": "string", "pattern": "^[0-9a-f]{64}$",
                                       "description": "The node's sync credential (first enrolment "
                                                      "only; the hub keeps its sha256)"},
                        "names": NAMES_PROPERTY,
                    },
                },
                "SyncRequest": {
                    "type": "object",
                    "required": ["name", "credential"],
                    "properties": {
                        "name": {"type": "string", "pattern": "^[A-Za-z0-9_]{1,64}$"},
                        "credential": {"type": "string", "pattern": "^[0-9a-f]{64}$",
                                       "description": "The node's sync credential"},
                        "names_tag": {"type": "string", "pattern": "^[0-9a-f]{64}$",
                                      "description": "sha256 of the names the node has (canonical JSON)"},
                    },
                },
                "SyncResponse": {
                    "type": "object",
                    "required": ["net", "name", "address", "prefix", "hubs", "interval"],
                    "properties": {
                        **NODE_ADDRESS_PROPERTIES,
                        "hubs": HUBS_PROPERTY,
                        "interval": {"type": "integer", "minimum": SYNC_INTERVAL_MIN,
                                     "maximum": SYNC_INTERVAL_MAX,
                                     "description": "Seconds between the node's syncs"},
                        "names": NAMES_PROPERTY,
                    },
                },
                "RotateKeyRequest": {
                    "type": "object",
                    "required": ["name", "credential", "public_key", "new_credential"],
                    "properties": {
                        "name": {"type": "string", "pattern": "^[A-Za-z0-9_]{1,64}$"},
                        "credential": {"type": "string", "pattern": "^[0-9a-f]{64}$",
                                       "description": "The node's sync credential"},
                        "public_key": {"type": "string",
                                       "description": "The new key, checked as an enrolment key"},
                        "new_credential": {"type": "string", "pattern": "^[0-9a-f]{64}$",
                                           "description": "The credential that replaces "
                                                          "`credential` (made by the node)"},
                    },
                },
                "RotateKeyResponse": {
                    "type": "object",
                    "required": ["net", "name", "address", "prefix", "rotated"],
                    "properties": {
                        **NODE_ADDRESS_PROPERTIES,
                        "rotated": {"type": "boolean",
                                    "description": "false: the node had this key and "
                                                   "credential already"},
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string", "description": "One readable line"}},
                },
                "Health": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {"status": {"type": "string", "enum": ["ok"]},
                                   "net": {"type": "string"}, "hub": {"type": "string"}},
                },
            },
        },
    }
