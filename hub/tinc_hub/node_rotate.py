"""``POST /v1/rotate-key``: a node replaces its own tinc key (pure handler, no sockets).

The node proves who it is exactly as for ``POST /v1/sync``: its name and the credential it got
at enrolment (the registry keeps its sha256); no token. An unknown name and a wrong credential
get the same 401; a revoked node gets 403 once its credential matched. The new key is checked
as an enrolment key (one PEM block, RSA, 2048..16384 bits, kept as PKCS#1). A key that is any
other node's or hub's key is refused (409). The same new key again is a replay: 200, nothing
changed (the answer to the first request may have been lost). Otherwise the registry row gets
the key (the other hubs follow, as for any change) and this hub writes hosts/NAME from the
validated parts, keeping its mtime when the key alone changed (tinc 1.0's SIGHUP then keeps
the node's connection until it restarts); otherwise the caller SIGHUPs tincd before answering
(docs/DESIGN.md, "Node key rotation").
"""

import logging
import time
from typing import Any, Dict, NamedTuple, Optional

from bootstrap import bootstrap
from .enroll import (CREDENTIAL_RE, MAX_BODY_BYTES, EnrollError, credential_hash,
                     credential_matches, log_value, normalise_public_key, parse_json_object)
from .hostfiles import host_file_in_place, render_node_host_file, replace_key_keeping_mtime
from .registry import NODE, NodeRow, Registry, RegistryConflict, RegistryUnavailable, RegistryView
from .state import HubConfig

audit_log = logging.getLogger("tinc_hub.audit")

UNKNOWN_MESSAGE = ("unknown node name or wrong credential (re-run the one-liner with a token"
                   " to get a new credential)")


class RotateOutcome(NamedTuple):
    status: int
    body: Dict[str, Any]
    reload_needed: bool  # hosts/NAME written with a fresh mtime: SIGHUP tincd before answering


def rotate_audit_line(result: str, status: int, name: Any, client: str,
                      reason: Optional[str] = None) -> str:
    """``rotate-key result=rotated|replay|refused|failed status=N name=… client=…[ reason=…]``."""
    fields = [("result", result), ("status", str(status)), ("name", name), ("client", client)]
    if reason is not None:
        fields.append(("reason", reason))
    return "rotate-key " + " ".join(f"{key}={log_value(value)}" for key, value in fields)


class RotateKeyHandler:
    """Answers ``POST /v1/rotate-key`` from the registry and this hub's hosts/."""

    def __init__(self, config: HubConfig, registry: Registry,
                 clock: Any = time.time) -> None:
        self.config, self.registry, self.clock = config, registry, clock

    def process(self, body: bytes, client: str = "-") -> RotateOutcome:
        name: Any = None
        try:
            data = parse_json_object(body, MAX_BODY_BYTES)
            name = data.get("name")
            name, credential, public_key = self._parse(data)
            outcome, result = self._rotate(name, credential, public_key)
        except EnrollError as refusal:
            audit_log.warning("%s", rotate_audit_line("refused", refusal.status, name, client,
                                                      refusal.message))
            return RotateOutcome(refusal.status, {"error": refusal.message}, False)
        except RegistryUnavailable as exc:
            audit_log.error("%s", rotate_audit_line("failed", 503, name, client, str(exc)))
            return RotateOutcome(503, {"error": "the hub cannot reach its registry; nothing was"
                                                " changed, retry later"}, False)
        audit_log.info("%s", rotate_audit_line(result, 200, name, client))
        return outcome

    @staticmethod
    def _parse(data: Dict[str, Any]) -> "tuple[str, str, str]":
        name, credential = data.get("name"), data.get("credential")
        if not isinstance(name, str) or not bootstrap.valid_node_name(name):
            raise EnrollError(400, "field 'name' must be a node name")
        if not isinstance(credential, str) or not CREDENTIAL_RE.fullmatch(credential):
            raise EnrollError(400, "field 'credential' must be 64 lowercase hex digits")
        return name, credential, normalise_public_key(data.get("public_key"))

    @staticmethod
    def _decide(view: RegistryView, name: str, credential: str, public_key: str) -> NodeRow:
        """Every refusal, from what ``view`` reads; the node row when the rotation may go on."""
        node = view.get_node(name)
        if node is None or node.kind != NODE or not credential_matches(credential, node.credential_sha256):
            raise EnrollError(401, UNKNOWN_MESSAGE)
        if node.revoked:
            raise EnrollError(403, f"node {name!r} has been revoked")
        owner = view.get_node_by_key(public_key)
        if owner is not None and owner.name != name:
            raise EnrollError(409, "this public key is already the key of another node or hub"
                                   " (generate a new key)")
        return node

    def _answer(self, node: NodeRow, rotated: bool) -> Dict[str, Any]:
        return {"net": self.config.net, "name": node.name, "address": node.address,
                "prefix": self.config.prefix, "rotated": rotated}

    def _rotate(self, name: str, credential: str, public_key: str) -> "tuple[RotateOutcome, str]":
        path = self.config.hosts_dir / name
        with self.registry.snapshot() as view:  # refusals and clean replays take no lock
            node = self._decide(view, name, credential, public_key)
        if node.public_key == public_key and node.credential_used_at is not None and \
                host_file_in_place(path, render_node_host_file(node.address, public_key)):
            return RotateOutcome(200, self._answer(node, False), False), "replay"
        with self.registry.exclusive():
            try:
                with self.registry.transaction() as tx:
                    node = self._decide(tx, name, credential, public_key)
                    rotated = node.public_key != public_key
                    now = int(self.clock())
                    if rotated:  # the token of its enrolment stays the node's
                        tx.replace_node_key(name, public_key, node.token_sha256, now)
                    if node.credential_used_at is None:
                        tx.mark_credential_used(name, credential_hash(credential), now)
            except RegistryConflict as exc:  # unreachable under the write lock; a clean 409
                raise EnrollError(409, f"conflict with an existing key ({exc.message})") from None
            # written under the lock, from validated parts, as enrolment does. The key alone
            # changes: the old mtime stays and no SIGHUP, so the node's live connection lasts
            # until its restart (new connections read the new key); else fresh mtime + SIGHUP
            changed, kept = replace_key_keeping_mtime(
                path, render_node_host_file(node.address, public_key))
        return (RotateOutcome(200, self._answer(node, rotated), changed and not kept),
                "rotated" if rotated else "replay")
