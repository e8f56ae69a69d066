"""``POST /v1/rotate-key``: a node replaces its own tinc key and credential (pure handler).

The node proves who it is exactly as for ``POST /v1/sync``: its name and its current
credential (the registry keeps its sha256); no token. An unknown name and a wrong credential
get the same 401; a revoked node gets 403 once its credential matched. The new key is checked
as an enrolment key (one PEM block, RSA, 2048..16384 bits, kept as PKCS#1). A key that is any
other node's or hub's key is refused (409). The node made ``new_credential`` itself: the
registry row gets the key and the new credential's sha256 in one transaction, so the old
credential (maybe stolen with the old key) is refused from then on. The node retries a lost
answer with the new credential: the new key and the new credential presented together
(``new_credential`` == ``credential``) are a replay, 200 with nothing changed. This hub then
writes hosts/NAME from the validated parts, keeping its mtime when the key alone changed
(tinc 1.0's SIGHUP then keeps the node's connection until it restarts); otherwise the caller
SIGHUPs tincd before answering (the other hubs follow through the registry; docs/DESIGN.md,
"Node key rotation").
"""

import logging
import time
from typing import Any, Dict, NamedTuple, Optional

from .enroll import (CREDENTIAL_RE, MAX_BODY_BYTES, EnrollError, credential_hash,
                     credential_matches, normalise_public_key, parse_json_object)
from .hostfiles import host_file_in_place, render_node_host_file, replace_key_keeping_mtime
from .node_sync import UNKNOWN_NODE_MESSAGE, node_audit_line, parse_node_identity
from .registry import NODE, NodeRow, Registry, RegistryConflict, RegistryUnavailable, RegistryView
from .state import HubConfig

audit_log = logging.getLogger("tinc_hub.audit")

class RotateOutcome(NamedTuple):
    status: int
    body: Dict[str, Any]
    reload_needed: bool  # hosts/NAME written with a fresh mtime: SIGHUP tincd before answering


def rotate_audit_line(result: str, status: int, name: Any, client: str,
                      reason: Optional[str] = None) -> str:
    """``rotate-key result=rotated|replay|refused|failed status=N name=… client=…[ reason=…]``."""
    return node_audit_line("rotate-key", result, status, name, client, reason)


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
            name, credential, public_key, new_credential = self._parse(data)
            outcome, result = self._rotate(name, credential, public_key, new_credential)
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
    def _parse(data: Dict[str, Any]) -> "tuple[str, str, str, str]":
        name, credential = parse_node_identity(data)
        new_credential = data.get("new_credential")
        public_key = normalise_public_key(data.get("public_key"))
        if not isinstance(new_credential, str) or not CREDENTIAL_RE.fullmatch(new_credential):
            raise EnrollError(400, "field 'new_credential' must be 64 lowercase hex digits (a"
                                   " rotation replaces the credential with the key)")
        return name, credential, public_key, new_credential

    @staticmethod
    def _decide(view: RegistryView, name: str, credential: str, public_key: str,
                new_credential: str) -> NodeRow:
        """Every refusal, from what ``view`` reads; the node row when the rotation may go on
        (or is a replay: ``is_replay``)."""
        node = view.get_node(name)
        if node is None or node.kind != NODE or not credential_matches(credential, node.credential_sha256):
            raise EnrollError(401, UNKNOWN_NODE_MESSAGE)
        if node.revoked:
            raise EnrollError(403, f"node {name!r} has been revoked")
        owner = view.get_node_by_key(public_key)
        if owner is not None and owner.name != name:
            raise EnrollError(409, "this public key is already the key of another node or hub"
                                   " (generate a new key)")
        if new_credential == credential and node.public_key != public_key:
            raise EnrollError(400, "field 'new_credential' must differ from 'credential' (a"
                                   " new key comes with a new credential)")
        return node

    @staticmethod
    def is_replay(node: NodeRow, credential: str, public_key: str, new_credential: str) -> bool:
        """The key and the credential presented are the node's already (after ``_decide``)."""
        return node.public_key == public_key and new_credential == credential

    def _answer(self, node: NodeRow, rotated: bool) -> Dict[str, Any]:
        return {"net": self.config.net, "name": node.name, "address": node.address,
                "prefix": self.config.prefix, "rotated": rotated}

    def _rotate(self, name: str, credential: str, public_key: str,
                new_credential: str) -> "tuple[RotateOutcome, str]":
        path = self.config.hosts_dir / name
        asked = (credential, public_key, new_credential)
        with self.registry.snapshot() as view:  # refusals and clean replays take no lock
            node = self._decide(view, name, *asked)
        if self.is_replay(node, *asked) and node.credential_used_at is not None and \
                host_file_in_place(path, render_node_host_file(node.address, public_key)):
            return RotateOutcome(200, self._answer(node, False), False), "replay"
        with self.registry.exclusive():
            try:
                with self.registry.transaction() as tx:
                    node = self._decide(tx, name, *asked)
                    rotated = not self.is_replay(node, *asked)
                    now = int(self.clock())
                    if node.public_key != public_key:  # the token of its enrolment stays
                        tx.replace_node_key(name, public_key, node.token_sha256, now)
                    if rotated:  # made by the node, which has it: used from now on (a
                        # replay of its enrolment with a shared token cannot replace it)
                        tx.set_credential(name, credential_hash(new_credential))
                        tx.mark_credential_used(name, credential_hash(new_credential), now)
                    elif node.credential_used_at is None:
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
