"""Keep this hub's tinc files in step with the registry that several hubs share.

:func:`mirror_registry` makes ``hosts/`` and ``conf.d/hubs.conf`` say what the registry says,
as this hub sees it (roster.py renders the hub files per viewing hub): every active hub's file
and a ``ConnectTo`` for each other hub, every active node's file; the files of revoked nodes and
removed hubs are removed (never a file of a name the registry does not know). A file is
written only when its bytes change (tinc 1.0 drops, on SIGHUP, the connection of every host
whose file is newer), and the caller SIGHUPs tincd once when anything changed.

:class:`RegistryFollower` (a thread of ``tinc-hub serve``) calls it whenever the registry's
generation (bumped by every write transaction of any hub) moves: at once on a PostgreSQL
notification (``LISTEN tinc_hub_changes``), else by polling the generation every
``POLL_INTERVAL`` s, and once at start, so a hub that was down catches up when it starts.
The first round reads every row and every host file under the write lock; later rounds read
the rows without it and touch only the files of rows that changed (hostfiles.HostFilesFollower),
so a round's cost does not grow with the unchanged nodes and enrolments do not wait for it.
"""

import logging
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from bootstrap import bootstrap
from .background import BackgroundLoop
from .exposure import claims_default_route
from .hostfiles import HostFilesFollower, reconcile_host_files, remove_if_present, write_if_changed
from .names import NAMES_SERVICE, NamesCache, hosts_writable, write_hub_names, write_names_file
from .registry import CHANGES_CHANNEL, Registry, RegistryError
from .roster import HUB_PEERS_FILE, hub_host_files_for, render_hub_peers_conf, usable_hubs
from .state import HubConfig

log = logging.getLogger("tinc_hub.follow")

POLL_INTERVAL = 1.0  # s between generation reads when no notification comes (SQLite, PG down)
RETRY_INTERVAL = 5.0  # s before reconnecting the PostgreSQL listener after an error
ROUND_SHARE = 0.1  # rounds take at most this share of the time: a round of R s is followed by a
ROUND_PAUSE_MAX = 1.0  # pause of 9 R s, at most this (other hubs follow a change within ~3 s)


def mirror_registry(config: HubConfig, registry: Registry,
                    host_files: Optional[HostFilesFollower] = None) -> Dict[str, List[str]]:
    """Bring hosts/ and conf.d/hubs.conf in line with the registry; returns what was written and
    removed (tincd needs a SIGHUP when either is not empty). The nodes' files: every one
    (reconcile_host_files), or ``host_files``' round (only the rows changed since its last)."""
    with registry.snapshot() as view:
        hubs = view.list_hubs()
    written: List[str] = []
    removed: List[str] = []
    with registry.exclusive():  # the exposures' apply changes the claim under this lock too
        claim = claims_default_route(config.hub_host_file)  # kept as the apply left it
        for name, text in sorted(hub_host_files_for(config.name, hubs, config.network,
                                                    claim=claim).items()):
            # a hub's new key alone (rotate-key) keeps the mtime: the SIGHUP keeps its connection
            if bootstrap.write_host_file(str(config.hosts_dir / name), text):
                written.append(name)
        for hub in hubs:
            if hub.removed and hub.name != config.name and bootstrap.valid_node_name(hub.name) \
                    and remove_if_present(config.hosts_dir / hub.name):
                removed.append(hub.name)
        others = [h.name for h in usable_hubs(hubs, config.network) if h.name != config.name]
        if any(h.name == config.name for h in hubs):  # never before this hub recorded itself
            peers, path = render_hub_peers_conf(others), config.net_dir / HUB_PEERS_FILE
            if peers is None:
                if remove_if_present(path):
                    removed.append(HUB_PEERS_FILE)
            elif path.parent.mkdir(parents=True, exist_ok=True) or write_if_changed(path, peers):
                written.append(HUB_PEERS_FILE)
    nodes = host_files.follow() if host_files is not None else reconcile_host_files(config, registry)
    return {"written": written + nodes["written"], "removed": removed + nodes["removed"]}


def exposures_fingerprint(registry: Registry, this_hub: str) -> str:
    """What this hub's exposure rules depend on, as one comparable text: the rows (with their
    nodes' addresses and revocations) and whether it must source-NAT them (not the reply hub)."""
    from .exposure import source_nat_here

    with registry.snapshot() as view:
        return repr((view.list_exposures(), source_nat_here(view, this_hub)))


class RegistryFollower(BackgroundLoop):
    """Runs :func:`mirror_registry` whenever the registry changed, in a daemon thread; and
    ``exposures_changed`` when what the exposures' rules depend on changed (at start too, when
    anything is exposed): the API only asks for the rules, a root process applies them."""

    thread_name = "registry-follower"

    def __init__(self, config: HubConfig, registry: Registry, sighup: Callable[[], bool],
                 poll_interval: float = POLL_INTERVAL, state_root: Optional[Path] = None,
                 exposures_changed: Optional[Callable[[], None]] = None) -> None:
        self.config, self.registry, self.sighup = config, registry, sighup
        self.state_root = state_root  # where names.json goes for the root side (names.py)
        self.poll_interval = poll_interval
        self.exposures_changed = exposures_changed
        self.exposures: str = repr(([], False))  # nothing exposed: nothing to ask for at start
        self.generation: Optional[int] = None  # the generation last mirrored
        super().__init__()
        self._listener = None  # a psycopg connection LISTENing, PostgreSQL only
        self.names = NamesCache(config)
        self.host_files = HostFilesFollower(config, registry)
        self.names_writable = hosts_writable()
        if not self.names_writable:
            log.info("names: %s is read-only to this process (its sandbox): %s writes the hub's"
                     " names", bootstrap.ETC_HOSTS, NAMES_SERVICE)

    def catch_up(self) -> bool:
        """Mirror when the generation moved; True when files changed."""
        with self.registry.reading() as view:
            generation = view.generation()
        if generation == self.generation:
            return False
        started = time.monotonic()
        done = mirror_registry(self.config, self.registry, self.host_files)
        mirrored = time.monotonic()
        if self.exposures_changed is not None:
            exposures = exposures_fingerprint(self.registry, self.config.name)
            if exposures != self.exposures:
                self.exposures_changed()  # raising: asked again at the next round
                log.info("exposures changed (generation %d): their rules are applied", generation)
                self.exposures = exposures
        self.generation = generation
        self.follow_names()
        log.debug("round of generation %d: %.3f s (files %.3f s, %d written, %d removed)",
                  generation, time.monotonic() - started, mirrored - started, len(done["written"]),
                  len(done["removed"]))
        if done["written"] or done["removed"]:
            log.info("followed the registry (generation %d): wrote %s, removed %s", generation,
                     ", ".join(done["written"]) or "nothing", ", ".join(done["removed"]) or "nothing")
            self.sighup()
            return True
        return False

    def follow_names(self) -> None:
        """This hub's names: names.json for the root side (names.py), and its block of
        /etc/hosts where this process may write it."""
        with self.registry.snapshot() as view:
            names = self.names.get(view).names
        if names is None:
            return
        if self.state_root is not None:
            write_names_file(self.state_root, names)
        if self.names_writable and write_hub_names(self.config, names):
            log.info("names: wrote %d name(s) of net %s to %s", len(names), self.config.net,
                     bootstrap.ETC_HOSTS)

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                started = time.monotonic()
                self.catch_up()
                if failing:
                    log.info("following the registry again")
                failing = False
                # the round runs in serve's process: it must not starve the enrolments
                self._stop.wait(min((time.monotonic() - started) * (1 - ROUND_SHARE) / ROUND_SHARE,
                                    ROUND_PAUSE_MAX))
                self._wait_for_change()
            except RegistryError as exc:
                if not failing:
                    log.warning("cannot follow the registry: %s (retrying every %.0f s)", exc, RETRY_INTERVAL)
                failing = True
                self._close_listener()
                self._stop.wait(RETRY_INTERVAL)
            except Exception as exc:  # the follower must outlive any one failure
                log.error("registry follower: %s: %s", type(exc).__name__, exc)
                self._close_listener()
                self._stop.wait(RETRY_INTERVAL)
        self._close_listener()

    def _wait_for_change(self) -> None:
        """Until a notification arrives or the poll interval passed."""
        if self.registry.dialect != "postgresql":
            self._stop.wait(self.poll_interval)
            return
        listener = self._listen()
        if listener is None:
            self._stop.wait(self.poll_interval)
            return
        try:
            for _ in listener.notifies(timeout=self.poll_interval, stop_after=1):
                break
        except Exception as exc:
            log.debug("listener lost: %s", exc)
            self._close_listener()

    def _listen(self):  # -> Optional[psycopg.Connection]
        if self._listener is not None:
            return self._listener
        try:
            with self.registry.url.translate_errors():
                pooled = self.registry.engine.raw_connection()
                pooled.detach()  # ours alone: it stays in LISTEN mode
                conn = pooled.dbapi_connection
                conn.autocommit = True
                conn.execute(f"LISTEN {CHANGES_CHANNEL}")
        except RegistryError as exc:
            log.debug("cannot LISTEN: %s", exc)
            return None
        self._listener = conn
        return conn

    def _close_listener(self) -> None:
        if self._listener is not None:
            try:
                self._listener.close()
            except Exception:
                pass
            self._listener = None


def read_public_key(net_dir: Path) -> str:
    """The hub's tinc public key (PKCS#1 PEM, what tinc 1.0 reads) from its rsa_key.priv."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key((net_dir / "rsa_key.priv").read_bytes(), password=None)
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.PKCS1).decode("ascii")
