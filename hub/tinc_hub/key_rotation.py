"""``tinc-hub rotate-key``: a new tinc RSA key for this hub, with no node<->node outage when
the net has other hubs (docs/DESIGN.md, "Hub key rotation").

1. stage: a new key of the current key's size, ``rsa_key.priv.new`` (0600) beside
   ``rsa_key.priv``;
2. publish: the hub's registry row gets the new public key. Every hub's registry follower
   and every node's sync write this hub's host file with it, keeping the file's mtime
   (``bootstrap.write_host_file``): tinc 1.0's SIGHUP then keeps the connections made with the
   old key, and the next connection reads the new one;
3. wait: until the nodes have had the chance to sync (``--wait``, default 2 x the sync
   interval + 10 s), counted from the publication (the hub row's ``updated_at``);
4. switch: the staged key renamed over ``rsa_key.priv``, this hub's own host file given the
   new key, tincd restarted: every connection ends and comes back with the new key (nodes
   retry after 5 s; the other hubs carry node<->node traffic meanwhile).

A re-run after a crash resumes from what the files and the registry say: a staged key not yet
published is published, a published one is waited for (what is left) and switched to, an
installed key that tincd does not run yet (its pidfile is older) is switched to.
"""

import logging
import os
import stat
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, List, Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bootstrap import bootstrap
from .errors import HubError
from .liveness import read_liveness
from .registry import HubRow, Registry, RegistryConflict, RegistryError, iso_utc
from .roster import usable_hubs
from .state import HubConfig, StateDir

log = logging.getLogger("tinc_hub.rotate")

KEY_FILE = "rsa_key.priv"
STAGED_KEY_FILE = "rsa_key.priv.new"
WAIT_MARGIN = 10  # s after two sync intervals: a slow hub answer, a retried round
MAX_KEY_FILE_BYTES = 64 * 1024
RECONNECT_WAIT = 15.0  # s the command watches for another hub to connect after the restart
IDLE, STAGED, PUBLISHED = "idle", "staged", "published"


def default_wait(sync_interval: int) -> int:
    """Seconds between publishing and switching: every node syncs once per interval (times
    0.8..1.0), twice covers a round that failed once."""
    return 2 * sync_interval + WAIT_MARGIN


def load_private_key(path: Path, private: bool = False) -> rsa.RSAPrivateKey:
    """The RSA key (>= 2048 bits) of a PEM file that is a regular file, not a symlink;
    ``private``: owned by this user with no access for group or other (the staged key).
    FileNotFoundError when it is missing; HubError for anything else."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise HubError(f"{path} is not a regular file", "move it away and re-run")
        if private and (info.st_uid != os.geteuid() or info.st_mode & 0o077):
            raise HubError(f"{path} has mode {info.st_mode & 0o7777:04o} and owner uid"
                           f" {info.st_uid}: a private key must be 0600 and this user's",
                           "remove it and re-run (a new key is made)")
        data = handle.read(MAX_KEY_FILE_BYTES + 1)
    try:
        if len(data) > MAX_KEY_FILE_BYTES:
            raise ValueError("too large")
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise HubError(f"{path} holds no readable private key ({exc})",
                       "restore it from a backup, or remove a staged key and re-run") from None
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < 2048:
        raise HubError(f"{path} is not an RSA key of 2048 bits or more", "move it away and re-run")
    return key


def public_pem(key: rsa.RSAPrivateKey) -> str:
    """The public key as the registry and host files hold it (PKCS#1 PEM, what tinc 1.0 reads)."""
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.PKCS1).decode("ascii")


def same_key(a: Optional[str], b: Optional[str]) -> bool:
    return a is not None and b is not None and a.strip() == b.strip()


def staged_public_key(net_dir: Path) -> Optional[str]:
    """The public key of the staged key, None when there is none."""
    try:
        return public_pem(load_private_key(net_dir / STAGED_KEY_FILE, private=True))
    except FileNotFoundError:
        return None


def public_key_to_record(config: HubConfig, registry: Registry) -> str:
    """The key ``serve`` records for this hub at start: rsa_key.priv's, or, between a
    rotation's publication and its switch, the staged key the registry already holds."""
    current = public_pem(load_private_key(config.net_dir / KEY_FILE))
    try:
        staged = staged_public_key(config.net_dir)
    except HubError as exc:
        log.warning("staged key ignored: %s", exc)
        return current
    if staged is None:
        return current
    with registry.reading() as view:
        row = view.get_node(config.name)
    return staged if row is not None and same_key(row.public_key, staged) else current


@dataclass(frozen=True)
class RotationState:
    """What the files and the registry say about this hub's keys."""
    current: str  # public key of rsa_key.priv
    staged: Optional[str]  # public key of rsa_key.priv.new, None when absent
    recorded: str  # the registry's key of this hub
    recorded_at: int  # when the hub's row last changed (the publication, once published)
    hubs: List[HubRow]

    @property
    def phase(self) -> str:
        if same_key(self.staged, self.recorded):
            return PUBLISHED
        if same_key(self.current, self.recorded):
            return STAGED if self.staged is not None else IDLE
        raise HubError("the registry holds another tinc key for this hub than rsa_key.priv"
                       + (" and the staged key" if self.staged else ""),
                       "restore the hub's rsa_key.priv (or rsa_key.priv.new) from a backup;"
                       " see 'tinc-hub hubs'")


class HubKeyRotation:
    """One run of ``tinc-hub rotate-key`` (resuming what an earlier run left)."""

    def __init__(self, state: StateDir, registry: Registry, sync_interval: int,
                 wait: Optional[int] = None, force: bool = False,
                 say: Callable[[str], None] = print, warn: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.state, self.registry = state, registry
        self.config = state.load_config()
        self.sync_interval, self.force = sync_interval, force
        self.wait = default_wait(sync_interval) if wait is None else wait
        self.wait_reason = (f"--wait {wait} s" if wait is not None else
                            f"2 x the nodes' sync interval {sync_interval} s + {WAIT_MARGIN} s")
        self.say, self.warn, self.clock, self.sleep = say, warn, clock, sleep
        self.key_path = self.config.net_dir / KEY_FILE
        self.staged_path = self.config.net_dir / STAGED_KEY_FILE

    # -- reading -------------------------------------------------------------------------
    def read_state(self) -> RotationState:
        try:
            current = load_private_key(self.key_path)
        except FileNotFoundError:
            raise HubError(f"{self.key_path} is missing", "restore it, or re-run 'tinc-hub init'") from None
        with self.registry.snapshot() as view:
            hubs = view.list_hubs()
            row = view.get_node(self.config.name)
        me = next((h for h in hubs if h.name == self.config.name), None)
        if me is None or row is None or me.removed:
            raise HubError(f"hub {self.config.name!r} is not an active hub of the registry"
                           f" {self.registry.describe()}", "see 'tinc-hub hubs'; run 'tinc-hub serve' once")
        return RotationState(public_pem(current), staged_public_key(self.config.net_dir),
                             me.public_key, row.updated_at, hubs)

    def tincd_pidfile_mtime(self) -> Optional[float]:
        """When the running tincd of this net started (its pidfile's mtime); None: not running."""
        pid = bootstrap.pid_from_file(self.config.net)
        for path in bootstrap.pid_file_paths(self.config.net):
            text = bootstrap.read_text(path)
            if pid is not None and text is not None and text.split()[:1] == [str(pid)]:
                return os.stat(path).st_mtime
        return None

    def restart_pending(self) -> bool:
        """tincd runs and started before rsa_key.priv was installed (a crash after the rename)."""
        started = self.tincd_pidfile_mtime()
        return started is not None and started < self.key_path.stat().st_mtime

    # -- the steps -----------------------------------------------------------------------
    def check_safe(self, found: RotationState) -> None:
        """Refuse (HubError) when nodes would lose the VPN: no other active hub, or none
        connected to this hub's running tincd; --force goes on."""
        others = [h.name for h in usable_hubs(found.hubs, self.config.network)
                  if h.name != self.config.name]
        cost = ("--force: every node loses the VPN while this hub's tincd restarts (tinc retries"
                " after 5 s), and a node that has not synced since the key was published (offline,"
                " or joined before sync existed) until its next sync or a re-run of its one-liner")
        if not others:
            message = (f"hub {self.config.name!r} is the only active hub of net {self.config.net!r}:"
                       " its nodes would lose the VPN until they learn the new key")
            self.refuse_unless_forced(message, "add a hub first ('tinc-hub init --registry URL' on"
                                               " another machine), or accept the outage with " + cost)
            return
        if self.tincd_pidfile_mtime() is None:
            return  # nothing is connected to this hub: nothing to keep
        seen = read_liveness(self.state.root)
        if not any(seen.get(name) is not None and seen[name].up for name in others):
            message = (f"no other hub ({', '.join(others)}) is connected to this hub's tincd:"
                       " node<->node traffic through this hub would stop while it restarts")
            self.refuse_unless_forced(message, "start tincd and 'tinc-hub serve' on the other hub(s),"
                                               " or accept the outage with " + cost)

    def refuse_unless_forced(self, message: str, hint: str) -> None:
        """HubError(message, hint) without --force; with it, a warning line."""
        if not self.force:
            raise HubError(message, hint)
        self.warn(f"warning: {message} (--force)")

    def stage(self, bits: int) -> str:
        """A new key beside the current one (0600 from its creation); its public key."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        bootstrap.write_atomic(str(self.staged_path), pem, 0o600)
        self.say(f"new {bits}-bit RSA key staged in {self.staged_path}")
        return public_pem(key)

    def publish(self, new: str, current: str) -> None:
        """The hub's registry row gets the new public key (under the write lock, only if it
        still holds the current one)."""
        now = int(self.clock())
        try:
            with self.registry.exclusive(), self.registry.transaction() as tx:
                me = next((h for h in tx.list_hubs() if h.name == self.config.name), None)
                if me is None or not same_key(me.public_key, current):
                    raise HubError("the registry's key of this hub changed meanwhile (another"
                                   " rotate-key?)", "re-run 'tinc-hub rotate-key'")
                tx.update_hub(replace(me, public_key=new), now)
        except RegistryConflict as exc:
            raise HubError(f"the new key cannot be recorded: {exc.message}", "remove"
                           f" {self.staged_path} and re-run") from None
        self.say(f"published the new public key of hub {self.config.name!r}: the other hubs"
                 " write it within seconds, the nodes at their next sync, without dropping"
                 " their connections to this hub")

    def wait_for_nodes(self, published_at: int) -> None:
        due = published_at + self.wait
        left = due - self.clock()
        if left <= 0:
            self.say(f"published {iso_utc(published_at)}: the wait ({self.wait_reason}) is over")
            return
        self.say(f"waiting {left:.0f} s, until {iso_utc(due)} ({self.wait_reason}, from the"
                 " publication), so that every node has synced and holds the new key; an"
                 " interrupted wait resumes when 'tinc-hub rotate-key' is run again")
        while True:
            left = due - self.clock()
            if left <= 0:
                return
            self.sleep(min(left, 5.0))

    def switch(self, new: str) -> str:
        """Install the staged key (rename: atomic), give this hub's own host file the new key,
        restart tincd. Returns what happened to tincd."""
        staged = load_private_key(self.staged_path, private=True)
        if not same_key(public_pem(staged), new):
            raise HubError(f"{self.staged_path} changed meanwhile", "re-run 'tinc-hub rotate-key'")
        os.rename(self.staged_path, self.key_path)
        os.utime(self.key_path)  # newer than the running tincd: a crash now is seen as pending
        bootstrap.fsync_directory(str(self.config.net_dir))
        own = bootstrap.read_text(str(self.config.hub_host_file)) or ""
        block = bootstrap.public_key_block(own)
        if block and not same_key(block, new):  # serve's follower may have written it already
            bootstrap.write_host_file(str(self.config.hub_host_file), own.replace(block, new.strip(), 1))
        self.say(f"installed the new key as {self.key_path}")
        return self.restart_tincd()

    def restart_tincd(self) -> str:
        config = self.config
        facts = bootstrap.detect_system()
        how = "systemd" if config.init == "systemd" else "direct"
        tincd = bootstrap.read_tincd_state(config.net, how, facts)
        if not tincd.active:
            self.say(f"tincd of net {config.net!r} is not running: it uses the new key when it starts")
            return "not running"
        started = self.clock()
        bootstrap.apply_start(bootstrap.plan_start(config.net, how, facts, tincd, True,
                                                   config.tinc_dir), tincd)
        self.say(f"tincd restarted with the new key ({self.clock() - started:.1f} s); nodes"
                 " reconnect within about 5 s (tinc's retry), a node that has not synced yet"
                 " at its next sync")
        return "restarted"

    def confirm_hubs(self, restarted_at: float) -> None:
        """Say which other hub connected again after the restart (it holds the new key)."""
        try:
            with self.registry.snapshot() as view:
                hubs = view.list_hubs()
        except RegistryError as exc:  # the rotation is done: only the confirmation is lost
            self.warn(f"warning: cannot list the other hubs to confirm their connection: {exc}")
            return
        others = {h.name for h in usable_hubs(hubs, self.config.network)} - {self.config.name}
        if not others:
            return
        deadline = self.clock() + RECONNECT_WAIT
        while True:
            seen = read_liveness(self.state.root)
            back = sorted(n for n in others if seen.get(n) is not None and seen[n].up
                          and seen[n].at >= int(restarted_at))
            if back:
                self.say(f"hub(s) {', '.join(back)} connected again after"
                         f" {self.clock() - restarted_at:.1f} s with the new key")
                return
            if self.clock() >= deadline:
                self.warn(f"warning: no other hub ({', '.join(sorted(others))}) connected within"
                          f" {RECONNECT_WAIT:.0f} s of the restart (hint: is 'tinc-hub serve'"
                          " running there? it writes their copy of this hub's host file)")
                return
            self.sleep(0.2)

    # -- the whole command ---------------------------------------------------------------
    def run(self) -> str:
        """Rotate (or finish an earlier rotation); returns what happened to tincd."""
        found = self.read_state()
        phase = found.phase
        if phase == IDLE and self.restart_pending():
            self.say(f"{self.key_path} was installed after tincd started: restarting tincd")
            return self.restart_tincd()
        if phase == IDLE:
            self.check_safe(found)
            bits = load_private_key(self.key_path).key_size
            new = self.stage(bits)
            self.publish(new, found.current)
        elif phase == STAGED:
            self.check_safe(found)
            self.say(f"resuming: publishing the key staged in {self.staged_path}")
            new = found.staged  # type: ignore[assignment]
            self.publish(new, found.current)
        else:
            new = found.staged  # type: ignore[assignment]
            self.say(f"resuming: the key staged in {self.staged_path} was published"
                     f" {iso_utc(found.recorded_at)}")
        published_at = self.read_state().recorded_at
        try:
            self.wait_for_nodes(published_at)
        except KeyboardInterrupt:
            self.warn("interrupted: the new key is published; run 'tinc-hub rotate-key' again to"
                      " finish (it waits only what is left)")
            raise
        started = self.clock()
        outcome = self.switch(new)
        if outcome == "restarted":
            self.confirm_hubs(started)
        return outcome
