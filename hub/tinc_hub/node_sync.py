"""``POST /v1/sync``: a node asks which hubs the net has now (pure handler, no sockets).

The node proves who it is with the credential it got at enrolment (the registry keeps only
its sha256); an unknown name and a wrong credential get the same 401, so the endpoint tells
nothing about which names exist. A revoked node learns that it was revoked (403) once its
credential matched. The answer is the enrolment answer's ``hubs`` list with the node's own
address (docs/DESIGN.md, "API contract for nodes").
"""

import logging
import time
from typing import Any, Callable, Dict, NamedTuple, Optional

from bootstrap import bootstrap
from .enroll import (CREDENTIAL_RE, EnrollError, credential_hash, credential_matches, log_value,
                     parse_json_object)
from .names import NamesCache
from .registry import NODE, Registry, RegistryUnavailable
from .roster import hubs_for_nodes
from .state import HubConfig

MAX_SYNC_BODY_BYTES = 4096
# s between a node's syncs (the node adds jitter); serve --sync-interval
SYNC_INTERVAL = bootstrap.DEFAULT_SYNC_INTERVAL
SYNC_INTERVAL_MIN, SYNC_INTERVAL_MAX = bootstrap.SYNC_INTERVAL_MIN, bootstrap.SYNC_INTERVAL_MAX

audit_log = logging.getLogger("tinc_hub.audit")


class SyncOutcome(NamedTuple):
    status: int
    body: Dict[str, Any]


# the one 401 of the endpoints a node proves itself on with its credential (sync, rotate-key)
UNKNOWN_NODE_MESSAGE = ("unknown node name or wrong credential (re-run the one-liner with a token"
                        " to get a new credential)")


def node_audit_line(action: str, result: str, status: int, name: Any, client: str,
                    reason: Optional[str] = None) -> str:
    """``ACTION result=… status=N name=… client=…[ reason=…]``: the audit line of a request a
    node proves with its credential (``sync``, ``rotate-key``)."""
    fields = [("result", result), ("status", str(status)), ("name", name), ("client", client)]
    if reason is not None:
        fields.append(("reason", reason))
    return action + " " + " ".join(f"{key}={log_value(value)}" for key, value in fields)


def sync_audit_line(result: str, status: int, name: Any, client: str, reason: Optional[str] = None) -> str:
    return node_audit_line("sync", result, status, name, client, reason)


def parse_node_identity(data: Dict[str, Any]) -> "tuple[str, str]":
    """(name, credential) of a request body, checked (EnrollError 400)."""
    name, credential = data.get("name"), data.get("credential")
    if not isinstance(name, str) or not bootstrap.valid_node_name(name):
        raise EnrollError(400, "field 'name' must be a node name")
    if not isinstance(credential, str) or not CREDENTIAL_RE.fullmatch(credential):
        raise EnrollError(400, "field 'credential' must be 64 lowercase hex digits")
    return name, credential


class SyncHandler:
    """Answers ``POST /v1/sync`` from the registry."""

    def __init__(self, config: HubConfig, registry: Registry, interval: int = SYNC_INTERVAL,
                 seen: Optional[Callable[[str], None]] = None) -> None:
        """``seen``: told the name of every ephemeral node whose sync succeeded (the reaper)."""
        if not SYNC_INTERVAL_MIN <= interval <= SYNC_INTERVAL_MAX:
            raise ValueError(f"sync interval {interval} s is outside {SYNC_INTERVAL_MIN}..{SYNC_INTERVAL_MAX}")
        self.config, self.registry, self.interval = config, registry, interval
        self.seen = seen
        self.names = NamesCache(config)

    def process(self, body: bytes, client: str = "-") -> SyncOutcome:
        name: Any = None
        try:
            name, credential, tag = self._parse(body)
            with self.registry.snapshot() as view:
                node = view.get_node(name)
                hubs = view.list_hubs()
                names = self.names.get(view, hubs)
        except EnrollError as refusal:
            audit_log.warning("%s", sync_audit_line("refused", refusal.status, name, client, refusal.message))
            return SyncOutcome(refusal.status, {"error": refusal.message})
        except RegistryUnavailable as exc:
            audit_log.error("%s", sync_audit_line("failed", 503, name, client, str(exc)))
            return SyncOutcome(503, {"error": "the hub cannot reach its registry; retry later"})
        if node is None or node.kind != NODE or not credential_matches(credential, node.credential_sha256):
            removed = self._removal_of(credential)
            if removed is not None:  # only a holder of that node's credential learns this
                audit_log.warning("%s", sync_audit_line("refused", 410, name, client, "node removed"))
                return SyncOutcome(410, {"error": removed})
            audit_log.warning("%s", sync_audit_line("refused", 401, name, client, "unknown name or credential"))
            return SyncOutcome(401, {"error": UNKNOWN_NODE_MESSAGE})
        if node.revoked:
            audit_log.warning("%s", sync_audit_line("refused", 403, name, client, "node revoked"))
            return SyncOutcome(403, {"error": f"node {name!r} has been revoked"})
        if node.credential_used_at is None:  # the node has it: from now on a replay with a
            self._mark_used(node.name, credential)  # shared token cannot replace it
        if node.ephemeral_seconds is not None and self.seen is not None:
            self.seen(node.name)
        audit_log.info("%s", sync_audit_line("ok", 200, name, client))
        answer = {"net": self.config.net, "name": node.name, "address": node.address,
                  "prefix": self.config.prefix,
                  "hubs": hubs_for_nodes(hubs, self.config.network, first=self.config.name),
                  "interval": self.interval}
        if names.names is not None and tag != names.tag:  # not sent to a node that has them
            answer["names"] = names.names
        return SyncOutcome(200, answer)

    def _removal_of(self, credential: str) -> Optional[str]:
        """Why the node this credential belonged to is gone (None: no tombstone)."""
        from .ephemeral import refusal_message

        try:
            with self.registry.reading() as view:
                stone = view.tombstone_for(credential_hash(credential))
        except RegistryUnavailable:
            return None
        return refusal_message(stone) if stone is not None else None

    def _mark_used(self, name: str, credential: str) -> None:
        try:
            with self.registry.exclusive(), self.registry.transaction() as tx:
                tx.mark_credential_used(name, credential_hash(credential), int(time.time()))
        except RegistryUnavailable:
            pass  # recorded at a later sync

    @staticmethod
    def _parse(body: bytes) -> "tuple[str, str, Optional[str]]":
        data = parse_json_object(body, MAX_SYNC_BODY_BYTES)
        name, credential = parse_node_identity(data)
        tag = data.get("names_tag")
        if tag is not None and (not isinstance(tag, str) or not CREDENTIAL_RE.fullmatch(tag)):
            raise EnrollError(400, "field 'names_tag' must be 64 lowercase hex digits")
        return name, credential, tag
