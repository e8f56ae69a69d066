"""The enrolment request handler: pure (no sockets), called with the Authorization header
value and the raw request body; returns an HTTP status and a JSON-able dict.

Status codes:
  200 enrolled (or the same enrolment replayed)
  400 malformed body, bad name, bad public key
  401 missing/malformed/unknown/expired/spent/revoked token
  403 token bound to another name; node revoked
  409 name enrolled with another key (without a --replace token); key used by another node;
      a foreign hosts/NAME file exists; VPN subnet full
  413 body larger than MAX_BODY_BYTES
Anything else (500) is a hub fault, never a reaction to client input.

Every refusal, and every replay whose host file is in place, is decided from one read of the
registry before the write lock is taken; only a new enrolment or a re-key waits for the lock
(and is checked again under it), and concurrent ones share one transaction, one fsync of their
host files and one names read (group commit: ``Enroller._write_batch``; docs/DESIGN.md). Each
answer leaves one audit line (``tinc_hub.audit``).
"""

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Generator, List, NamedTuple, Optional, Tuple

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bootstrap import bootstrap
from .group_commit import GroupCommit, Pending
from .hostfiles import HostFilesFollower, host_file_in_place, render_node_host_file, write_host_files
from .registry import (HUB, NODE, HubRow, NodeRow, Registry, RegistryConflict, RegistryTransaction,
                       RegistryUnavailable, RegistryView, TokenRow, token_id)
from .names import Names, NamesCache
from .roster import hubs_for_nodes
from .state import HubConfig
from .tokens import hash_secret

MAX_BODY_BYTES = 16 * 1024
MAX_TOKEN_CHARS = 4096
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 16384

audit_log = logging.getLogger("tinc_hub.audit")
log = logging.getLogger("tinc_hub.enroll")



class EnrollError(Exception):
    """A 4xx answer: status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())  # always exactly one line


class EnrollOutcome(NamedTuple):
    status: int
    body: Dict[str, Any]
    reload_needed: bool  # a host file changed: the hub's tincd must get a SIGHUP before answering


@dataclass
class Attempt:
    """What one request's audit line reports, filled in as the request is understood."""
    client: str
    name: Any = None  # the client's value as sent (escaped when logged)
    token: Optional[str] = None  # token id (a prefix of the stored hash), once decoded
    address: Optional[str] = None


_PLAIN_LOG_VALUE = re.compile(r"[A-Za-z0-9._:/@+-]{1,100}")
MAX_LOG_VALUE_CHARS = 100


def log_value(value: Any) -> str:
    """A value for a ``key=value`` log field, always on one line: ``-`` for none; plain text
    as is; anything else JSON-quoted with every control and non-ASCII character escaped (a
    client-supplied name cannot start a forged line or carry a terminal escape)."""
    if value is None:
        return "-"
    if not isinstance(value, str):
        return f"<{type(value).__name__}>"  # never the content of a non-string field
    if value != "-" and _PLAIN_LOG_VALUE.fullmatch(value):
        return value
    if len(value) > MAX_LOG_VALUE_CHARS:
        value = value[:MAX_LOG_VALUE_CHARS] + "..."
    return json.dumps(value, ensure_ascii=True)


def audit_line(result: str, status: int, attempt: Attempt, reason: Optional[str] = None) -> str:
    """``enrolment result=new|rekeyed|replay|refused|failed status=N name=… address=…
    client=… token=ID[ reason="…"]``."""
    fields = [("result", result), ("status", str(status)), ("name", attempt.name),
              ("address", attempt.address), ("client", attempt.client), ("token", attempt.token)]
    if reason is not None:
        fields.append(("reason", reason))
    return "enrolment " + " ".join(f"{key}={log_value(value)}" for key, value in fields)


def _show(value: str, limit: int = 40) -> str:
    """A client-supplied string made safe for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def parse_bearer(authorization: Optional[str]) -> str:
    """The token string from ``Authorization: Bearer <token>``."""
    if not authorization or not authorization.strip():
        raise EnrollError(401, "missing Authorization: Bearer <token> header")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise EnrollError(401, "Authorization header must be 'Bearer <token>'")
    if len(token) > MAX_TOKEN_CHARS:
        raise EnrollError(401, "malformed token (too long)")
    return token


def validate_name(name: Any, hub_name: str) -> str:
    if not isinstance(name, str):
        raise EnrollError(400, "field 'name' must be a string")
    if not bootstrap.valid_node_name(name):
        raise EnrollError(400, f"invalid node name {_show(name)}: use 1-64 characters A-Z a-z 0-9 _")
    if name.lower() == hub_name.lower():
        raise EnrollError(400, f"node name {name!r} is the hub's own name")
    return name


def normalise_public_key(pem: Any) -> str:
    """Validate a node's RSA public key; return it as PKCS#1 PEM (what tinc 1.0 reads).

    Exactly one PEM block (``RSA PUBLIC KEY`` or ``PUBLIC KEY``) with only whitespace around
    it; RSA, at least 2048 bits.
    """
    if not isinstance(pem, str):
        raise EnrollError(400, "field 'public_key' must be a string (PEM)")
    text = pem.strip()
    if text.count("-----BEGIN") != 1 or text.count("-----END") != 1:
        raise EnrollError(400, "public_key must contain exactly one PEM block")
    if not bootstrap.PUBLIC_KEY_PEM_RE.fullmatch(text):
        raise EnrollError(400, "public_key must be a single RSA PUBLIC KEY or PUBLIC KEY PEM block"
                               " with nothing else around it")
    try:
        key = serialization.load_pem_public_key(text.encode("ascii"))
    except (ValueError, TypeError, UnsupportedAlgorithm, UnicodeEncodeError):
        raise EnrollError(400, "public_key is not a readable PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise EnrollError(400, "public_key must be an RSA key (tinc 1.0 uses RSA)")
    if key.key_size < MIN_RSA_BITS:
        raise EnrollError(400, f"RSA key too small ({key.key_size} bits): at least {MIN_RSA_BITS} needed")
    if key.key_size > MAX_RSA_BITS:
        raise EnrollError(400, f"RSA key too large ({key.key_size} bits): at most {MAX_RSA_BITS}")
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.PKCS1).decode("ascii")


def parse_json_object(body: bytes, limit: int) -> Dict[str, Any]:
    """A request body that must be one JSON object of at most ``limit`` bytes (EnrollError)."""
    if len(body) > limit:
        raise EnrollError(413, f"request body larger than {limit} bytes")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise EnrollError(400, "request body must be a JSON object") from None
    if not isinstance(data, dict):
        raise EnrollError(400, "request body must be a JSON object")
    return data


def parse_body(body: bytes) -> Dict[str, Any]:
    data = parse_json_object(body, MAX_BODY_BYTES)
    for field in ("name", "public_key"):
        if field not in data:
            raise EnrollError(400, f"missing field '{field}'")
    return data


CREDENTIAL_RE = re.compile(r"[0-9a-f]{64}")


def new_credential() -> str:
    """A node credential: 32 random bytes as lowercase hex (the hub keeps only its sha256)."""
    return secrets.token_hex(32)


def credential_hash(credential: str) -> str:
    return hashlib.sha256(credential.encode("ascii")).hexdigest()


def parse_credential(value: Any) -> Optional[str]:
    """The optional ``credential`` field of a request: absent (None) or 64 lowercase hex."""
    if value is None:
        return None
    if not isinstance(value, str) or not CREDENTIAL_RE.fullmatch(value):
        raise EnrollError(400, "field 'credential' must be 64 lowercase hex digits")
    return value


_NO_CREDENTIAL = "0" * 64  # compared against when there is none: the same work either way


def credential_matches(credential: Optional[str], stored_sha256: Optional[str]) -> bool:
    """True when ``credential`` is the one whose hash the registry holds (constant time, and
    the same work whether or not there is one)."""
    if credential is None:
        return False
    return hmac.compare_digest(credential_hash(credential), stored_sha256 or _NO_CREDENTIAL) \
        and stored_sha256 is not None


def credential_to_issue(result: str, node: NodeRow, credential: Optional[str],
                        token: Optional[TokenRow], now: int) -> bool:
    """Does this successful answer carry a new credential? A new enrolment and a re-key: yes. A
    replay: when the node has none, or may never have received the one issued (it was never
    shown: the answer that carried it may have been lost), or with a valid token bound to
    this very name (the admin's way to give a node that lost its credential a new one). A
    replay with a shared fleet token never replaces a credential the node has used: any
    holder of that token knows every sibling's name and public key, and could otherwise cut
    the siblings off from sync."""
    if result in ("new", "rekeyed"):
        return True
    if credential_matches(credential, node.credential_sha256):
        return False
    if node.credential_sha256 is None or node.credential_used_at is None:
        return True
    return (token is not None and token.bound_name == node.name and not token.revoked
            and now < token.expires_at)


class _Write(NamedTuple):
    """What a new enrolment, a re-key or a repairing replay writes (checked again under the
    write lock)."""
    token_hash: str
    name: str
    public_key: str
    credential: Optional[str]


class _Decision(NamedTuple):
    """What Enroller._decide concluded, with the rows it read."""
    replay: Optional[NodeRow]  # the node, when the request is a replay (None: a write)
    token: TokenRow
    node: Optional[NodeRow]  # the row of the name asked for


class _Written(NamedTuple):
    node: NodeRow
    result: str  # new, rekeyed, replay
    issued: Optional[str]  # the credential issued, if any
    hubs: List[HubRow]
    changed: bool  # the node's host file changed
    names: Optional[Names]  # the names once the batch was committed (None: unreadable)


class _NothingWritten(Exception):
    """Every write of a batch was refused: its transaction is rolled back."""


class _HostFilesFailed(Exception):
    """The rows were committed but writing the batch's host files failed."""

    def __init__(self, address: str, error: Exception) -> None:
        super().__init__(str(error))
        self.address, self.error = address, error


class Enroller:
    """Enrolment logic over a hub config, its registry and its hosts/ directory. Concurrent
    enrolments that must write share one transaction and one host-file fsync (group commit)."""

    def __init__(self, config: HubConfig, registry: Registry,
                 clock: Callable[[], float] = time.time, names: Optional[NamesCache] = None,
                 host_files: Optional[HostFilesFollower] = None) -> None:
        """``names``: the names cache to share (serve's follower computes the same names once
        per generation); ``host_files``: told each row whose host file a batch wrote, so the
        follower's next round does not read them again."""
        self.config = config
        self.registry = registry
        self.clock = clock
        self.network = config.network
        self.prefix = config.prefix
        self.hosts_dir = config.hosts_dir  # HubConfig's properties build new objects each call
        self.hub_address_int = int(ipaddress.IPv4Address(config.hub_address))
        self.names = names if names is not None else NamesCache(config)
        self.host_files = host_files
        self._listed: Tuple[Tuple[HubRow, ...], List[Dict[str, Any]]] = ((), [])
        # the writes of concurrent requests, batched (process; app.py waits in the event loop)
        self.writes: GroupCommit[_Write] = GroupCommit(self._write_batch, registry.exclusive)

    def process(self, authorization: Optional[str], body: bytes, client: str = "-") -> EnrollOutcome:
        """Answer one enrolment request from ``client`` (its address, for the audit line).
        Blocking: a write waits for its group commit batch."""
        request = self.request(authorization, body, client)
        while request.write is not None:
            request.resume(*self.writes.outcome(request.write))
        assert request.outcome is not None
        return request.outcome

    def request(self, authorization: Optional[str], body: bytes, client: str = "-") -> "EnrolmentRequest":
        """A request checked up to its write (``.write``; None: ``.outcome`` is its answer)."""
        return EnrolmentRequest(self, authorization, body, client)

    def _add_names(self, answer: Dict[str, Any]) -> None:
        """``names`` of the registry as committed (this node included), so the node resolves
        every name at once; none when the registry cannot be read now (sync brings them)."""
        try:
            with self.registry.snapshot() as view:
                names = self.names.get(view).names
        except RegistryUnavailable:
            return
        if names is not None:
            answer["names"] = names

    # -- internals ---------------------------------------------------------------------
    def _decode(self, token_text: str) -> str:
        """Decode the token; return sha256 hex of its secret."""
        try:
            token = bootstrap.decode_token(token_text)
            secret = token.secret
            net = token.net
        except Exception:  # any decoding failure of client input is a 401, never a 500
            raise EnrollError(401, "malformed token") from None
        if not isinstance(secret, str) or not secret:
            raise EnrollError(401, "malformed token")
        if net != self.config.net:
            raise EnrollError(401, f"token is for net {_show(str(net))}, this hub serves {self.config.net!r}")
        return hash_secret(secret)

    @staticmethod
    def _check_known(token: Optional[TokenRow]) -> TokenRow:
        """Unknown and revoked tokens are refused before anything else (replays included)."""
        if token is None:
            raise EnrollError(401, "unknown token")
        if token.revoked:
            raise EnrollError(401, "token revoked")
        return token

    def _check_token(self, token: TokenRow, name: str, now: int) -> None:
        """The token may enrol or re-key ``name`` now."""
        if now >= token.expires_at:
            raise EnrollError(401, "token expired")
        if token.uses_left <= 0:
            raise EnrollError(401, "token already used")
        if token.bound_name is not None and token.bound_name != name:
            raise EnrollError(403, f"token is bound to node {token.bound_name!r}, not {name!r}")

    def _decide(self, view: RegistryView, token_hash: str, name: str, public_key: str,
                token: Optional[TokenRow] = None) -> "_Decision":
        """Every refusal this request deserves, from what ``view`` reads (``token``: the
        token's row as ``view`` reads it, when already read): the node when it is a replay
        (answer it, change nothing), None when a write is needed; and the rows it read."""
        now = int(self.clock())
        token = self._check_known(view.get_token(token_hash) if token is None else token)
        node = view.get_node(name)
        if node is not None and node.kind == HUB:
            raise EnrollError(409, f"{name!r} is the name of a hub of this net; choose another name")
        if node is not None and node.revoked:
            raise EnrollError(403, f"node {name!r} has been revoked")
        if node is not None and node.public_key == public_key:
            if node.token_sha256 != token_hash:
                # Re-running with another token: it must be valid, but it grants nothing new.
                self._check_token(token, name, now)
            return _Decision(node, token, node)  # replay: same answer, no use spent
        self._check_token(token, name, now)
        owner = view.get_node_by_key(public_key)
        if owner is not None and owner.name != name:
            state = " (revoked)" if owner.revoked else ""
            raise EnrollError(409, f"this public key is already enrolled as node {owner.name!r}{state}"
                                   " (cloned machine? generate a new key)")
        # A replace token re-keys only the node it names (an older tinc-hub made some unbound).
        if node is not None and not (token.allow_replace and token.bound_name == name):
            raise EnrollError(409, f"node {name!r} is already enrolled with a different key"
                                   f" (ask the hub admin for a token made with --name {name} --replace)")
        return _Decision(None, token, node)

    def _answer(self, node: NodeRow, hubs: List[HubRow], credential: Optional[str]) -> Dict[str, Any]:
        """The enrolment answer (docs/DESIGN.md, "API contract for nodes")."""
        listed = self._hubs_listed(hubs)
        if listed and listed[0]["name"] == self.config.name:
            own = listed[0]["host_file"]
        else:  # this hub is not in the registry yet (never served): alone in its net
            own = self.config.hub_host_file.read_text(encoding="utf-8")
        answer = {
            "net": self.config.net,
            "name": node.name,
            "address": node.address,
            "prefix": self.prefix,
            "hub": {"name": self.config.name, "host_file": own},
            "hubs": listed,
        }
        if credential is not None:
            answer["credential"] = credential
        return answer

    def _hubs_listed(self, hubs: List[HubRow]) -> List[Dict[str, Any]]:
        """hubs_for_nodes of ``hubs``, rendered once for as long as the rows stay the same (a
        new list each call; its dicts are shared and never changed)."""
        key = tuple(hubs)
        cached_key, listed = self._listed
        if key != cached_key:
            listed = hubs_for_nodes(hubs, self.network, first=self.config.name)
            self._listed = (key, listed)
        return list(listed)

    def _process(self, authorization: Optional[str], body: bytes,
                 attempt: Attempt) -> Generator["_Write", "_Written", Tuple[EnrollOutcome, str]]:
        """The outcome and the audit result word (new, rekeyed, replay). A generator: it
        yields the write it needs (if any) and gets back what the batch wrote."""
        token_hash = self._decode(parse_bearer(authorization))
        attempt.token = token_id(token_hash)
        # Pre-check in one snapshot, without the write lock: refusals and replays never wait
        # for writers. A replay that is to carry a new credential (credential_to_issue) is a
        # write. An unknown or revoked token is refused before the body is even parsed.
        with self.registry.snapshot() as view:
            token = self._check_known(view.get_token(token_hash))
            data = parse_body(body)
            attempt.name = data["name"]
            name = validate_name(data["name"], self.config.name)
            public_key = normalise_public_key(data["public_key"])
            credential = parse_credential(data.get("credential"))
            replay, token, _ = self._decide(view, token_hash, name, public_key, token)
            hubs = view.list_hubs()
        if replay is not None:
            attempt.address = replay.address
            shown_first = credential_matches(credential, replay.credential_sha256) \
                and replay.credential_used_at is None  # recorded once: a write
            if not credential_to_issue("replay", replay, credential, token, int(self.clock())) \
                    and not shown_first and host_file_in_place(self.hosts_dir / replay.name,
                                           render_node_host_file(replay.address, replay.public_key)):
                return EnrollOutcome(200, self._answer(replay, hubs, None), False), "replay"

        try:
            written = yield _Write(token_hash, name, public_key, credential)
        except _HostFilesFailed as exc:  # committed; the host files are repaired at serve start
            attempt.address = exc.address
            raise exc.error from None
        attempt.address = written.node.address
        return EnrollOutcome(200, self._answer(written.node, written.hubs, written.issued),
                             written.changed), written.result

    def _write_batch(self, pendings: "List[Pending[_Write]]") -> None:
        """The writes of concurrent enrolments (group_commit.GroupCommit, under the registry
        write lock), as if one after another: one transaction, each write in a savepoint (a
        refusal or a fault undoes its own writes only, never the others'); after the COMMIT
        their host files, fsync'd together with one directory fsync; then the names of the
        new generation, computed once for the whole batch. Outcomes are settled only after
        the COMMIT: a refusal decided on a batch-mate's write is never answered when that write
        is lost (the COMMIT failed: everyone gets its error). A crash at any point leaves what
        one write at a time left: committed rows whose host files may be missing or old (never
        torn), which hostfiles.reconcile_host_files writes at serve start."""
        started = time.monotonic()
        done: List[Tuple["Pending[_Write]", NodeRow, str, Optional[str]]] = []
        refused: List[Tuple["Pending[_Write]", Exception]] = []
        try:
            with self.registry.transaction() as tx:
                for pending in pendings:
                    try:
                        with self.registry.url.translate_errors(), tx.savepoint():
                            node, result, issued = self._write_one(tx, pending.item)
                    except RegistryConflict as exc:  # unreachable under the write lock; a clean 409
                        refused.append((pending, EnrollError(409, "conflict with an existing"
                                                                  f" enrolment ({exc.message})")))
                    except Exception as exc:  # EnrollError: a refusal; else its own 500/503
                        refused.append((pending, exc))
                    else:
                        done.append((pending, node, result, issued))
                if not done:
                    raise _NothingWritten  # rolled back: not even the generation moves
                hubs = tx.list_hubs()
        except _NothingWritten:
            pass
        for pending, error in refused:
            pending.fail(error)
        if not done:
            return
        # Written while still holding the lock, so a later writer of the same name can't be
        # overtaken; a crash here is repaired by hostfiles.reconcile_host_files on serve start.
        committed = time.monotonic()
        paths = [self.hosts_dir / node.name for _, node, _, _ in done]
        fresh = {path for path in paths if not path.exists()}
        try:
            changed = write_host_files([(path, render_node_host_file(node.address, node.public_key))
                                        for path, (_, node, _, _) in zip(paths, done)])
            for path in fresh:
                date_like_tincd_start(path, self.config.net)
        except Exception as exc:
            for pending, node, _, _ in done:
                pending.fail(_HostFilesFailed(node.address, exc))
            return
        if self.host_files is not None:  # the follower need not read these rows and files again
            self.host_files.note_written([(node.name, node.address, node.public_key, None, NODE)
                                          for _, node, _, _ in done])
        written = time.monotonic()
        names = self._names_now()
        log.debug("group commit: %d enrolment(s) (%d refused): transaction %.1f ms, host files"
                  " %.1f ms, names %.1f ms", len(pendings), len(refused), 1000 * (committed - started),
                  1000 * (written - committed), 1000 * (time.monotonic() - written))
        for (pending, node, result, issued), path_changed in zip(done, changed):
            pending.succeed(_Written(node, result, issued, hubs, path_changed, names))

    def _write_one(self, tx: RegistryTransaction, write: "_Write") -> Tuple[NodeRow, str, Optional[str]]:
        """One enrolment's writes; the node, new/rekeyed/replay, and the credential issued."""
        node, result, token = self._enrol_in_transaction(tx, write.token_hash, write.name,
                                                         write.public_key)
        issued = None
        # the token's row as read before its use was spent (what credential_to_issue reads of
        # it, bound name, revocation and expiry, is what the transaction holds)
        if credential_to_issue(result, node, write.credential, token, int(self.clock())):
            issued = new_credential()
            tx.set_credential(node.name, credential_hash(issued))
        elif write.credential is not None and credential_matches(write.credential, node.credential_sha256):
            tx.mark_credential_used(node.name, credential_hash(write.credential), int(self.clock()))
        return node, result, issued

    def _names_now(self) -> Optional[Names]:
        """The names of the generation just committed, read once for the whole batch (its
        answers carry them: no read each); None when the registry cannot be read now."""
        try:
            with self.registry.snapshot() as view:
                return self.names.get(view)
        except RegistryUnavailable:
            return None

    def _enrol_in_transaction(self, tx: RegistryTransaction, token_hash: str, name: str,
                              public_key: str) -> Tuple[NodeRow, str, TokenRow]:
        """Under the write lock: the checks again (the registry may have changed since the
        pre-check), then the write. Returns the node, new, rekeyed or replay, and the token's
        row as the checks read it."""
        replay, token, node = self._decide(tx, token_hash, name, public_key)
        if replay is not None:
            return replay, "replay", token
        now = int(self.clock())
        if node is not None:
            if not tx.spend_token_use(token_hash):
                raise EnrollError(401, "token already used")
            tx.replace_node_key(name, public_key, token_hash, now)
            return tx.get_node(name), "rekeyed", token  # type: ignore[return-value]

        if (self.hosts_dir / name).exists():
            raise EnrollError(409, f"a host file for {name!r} exists on the hub that tinc-hub did not"
                                   " write; choose another name")
        twins = [other for other in tx.names_ignoring_case(name) if other != name]
        if twins:  # both would lose NAME.NET (names.py leaves colliding names out)
            raise EnrollError(409, f"node name {name!r} differs only in case from {twins[0]!r}, "
                                   "and NAME.NET would not tell them apart; choose another name")
        found = tx.allocate_address_int(self.network, reserved={self.hub_address_int})
        if found is None:
            raise EnrollError(409, f"VPN subnet {self.config.vpn_subnet} is full")
        address = ipaddress.IPv4Address(found)
        if not tx.spend_token_use(token_hash):
            raise EnrollError(401, "token already used")
        ephemeral = token.ephemeral_seconds  # copied: kept for good
        node = NodeRow(name=name, address=str(address), address_int=int(address),
                       public_key=public_key, token_sha256=token_hash, enrolled_at=now,
                       updated_at=now, revoked_at=None, ephemeral_seconds=ephemeral,
                       last_seen_at=now if ephemeral is not None else None)
        tx.insert_node(node)
        return node, "new", token


class EnrolmentRequest:
    """One request on its way to its answer: ``write`` is the write it waits for (None when
    there is none: ``outcome`` is the answer). Each answer leaves its audit line."""

    def __init__(self, enroller: Enroller, authorization: Optional[str], body: bytes,
                 client: str) -> None:
        self.enroller = enroller
        self.attempt = Attempt(client=client)
        self.write: Optional[_Write] = None
        self.written: Optional[_Written] = None  # what the batch wrote for it
        self.outcome: Optional[EnrollOutcome] = None
        self._steps = enroller._process(authorization, body, self.attempt)
        self._advance(lambda: next(self._steps))

    def resume(self, written: object, error: Optional[BaseException] = None) -> None:
        """Go on with what the batch wrote for ``write`` (or its error)."""
        self.write = None
        if isinstance(written, _Written):
            self.written = written
        if error is not None:
            self._advance(lambda: self._steps.throw(error))
        else:
            self._advance(lambda: self._steps.send(written))  # type: ignore[arg-type]

    def _advance(self, step: Callable[[], "_Write"]) -> None:
        attempt = self.attempt
        try:
            self.write = step()
            return
        except StopIteration as stop:
            outcome, result = stop.value
        except EnrollError as exc:
            audit_log.warning("%s", audit_line("refused", exc.status, attempt, exc.message))
            self.outcome = EnrollOutcome(exc.status, {"error": exc.message}, False)
            return
        except RegistryUnavailable as exc:  # PostgreSQL down: the client retries (Retry-After)
            audit_log.error("%s", audit_line("failed", 503, attempt, str(exc)))
            self.outcome = EnrollOutcome(503, {"error": "the hub cannot reach its registry; nothing"
                                                        " was changed, retry later"}, False)
            return
        except Exception as exc:
            audit_log.error("%s", audit_line("failed", 500, attempt, type(exc).__name__))
            raise
        audit_log.info("%s", audit_line(result, outcome.status, attempt))
        if outcome.status == 200:
            if self.written is not None and self.written.names is not None:
                if self.written.names.names is not None:  # None: too many to send
                    outcome.body["names"] = self.written.names.names
            else:
                self.enroller._add_names(outcome.body)
        self.outcome = outcome


def date_like_tincd_start(path: Path, net: str) -> None:
    """Give a NEW host file the mtime of the hub tincd's pidfile (its start).

    On SIGHUP tinc 1.0 drops every connection whose host file is newer than its previous
    reload (mtime in seconds). A new node connects right after its answer, possibly before
    tincd has handled the SIGHUP that announced it, and was then dropped once and came back
    only after tinc's 5 s retry. A new name has no older connection that should be dropped;
    a replaced key (existing file) keeps a fresh mtime, so its old connection is dropped."""
    pidfile = Path(bootstrap.pid_file_paths(net)[0])
    try:
        started = pidfile.stat().st_mtime
    except OSError:
        return  # no tincd: nothing can be connected
    if bootstrap.pid_from_file(net) is not None:
        os.utime(path, (started, started))

