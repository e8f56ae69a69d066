"""The hub's own systemd service, ``tinc-hub.service``: ``tinc-hub serve`` started at boot.

``tinc-hub init`` installs it when the init system is systemd (journald keeps its log:
``journalctl -u tinc-hub``). Re-running init with the same arguments and the same installed
``tinc-hub`` changes nothing; a changed unit file is reloaded and the running service
restarted so that it runs what the unit now says.

The service is sandboxed: it runs as root (it writes root's tinc host files and signals root's
tincd) but with no capabilities, a read-only file system except the state directory and the
net's ``hosts/``, no view of /home, /root, devices, kernel tunables or other processes' /tmp,
and a system-call allow-list. Every value printed into the unit is quoted for systemd's own
syntax (not a shell's): ``%`` specifiers, ``$`` variables in ExecStart=, quotes and backslashes.
"""

import os
import re
import shutil
import sys
import unicodedata
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from bootstrap import bootstrap
from .errors import HubError
from .state import DEFAULT_STATE_DIR, HubConfig

UNIT_NAME = "tinc-hub.service"
UNIT_DIR = "/etc/systemd/system"
# ProtectHome=yes hides these; code or state living there needs ProtectHome=read-only.
HOME_DIRS = ("/home", "/root", "/run/user")
PACKAGE_DIR = str(Path(__file__).resolve().parent)  # the running tinc_hub's code
OPEN_FILE_LIMIT = 65536  # LimitNOFILE=: soft and hard, far above what the caps need
PRIVILEGED_PORT_LIMIT = 1024  # binding a port below this needs CAP_NET_BIND_SERVICE
# A unit name systemd takes literally in After= (no %, no quoting, no escapes needed).
_UNIT_NAME_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,246}\.service")
# A word that needs no quotes in a unit file (after % and $ are doubled).
_PLAIN_WORD_RE = re.compile(r"[A-Za-z0-9_@+=:,./%$-]+")
_UNQUOTABLE = {"Cc", "Cs", "Zl", "Zp"}  # controls, lone surrogates, line/paragraph separators

# Hardening that python, cryptography and uvicorn tolerate (proven by tests/test_boot.py).
SANDBOX = (
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ReadOnlyPaths=/run",  # strict leaves /run writable; serve only reads the pidfile
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "PrivateIPC=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "ProcSubset=pid",
    "ProtectProc=invisible",
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces=yes",
    "LockPersonality=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
    "MemoryDenyWriteExecute=yes",
    "SystemCallArchitectures=native",
    "SystemCallFilter=@system-service",
    "SystemCallFilter=~@privileged @resources",
    "SystemCallErrorNumber=EPERM",
    "UMask=0077",
)


def installed_executable() -> str:
    """Absolute path of the ``tinc-hub`` script of the running installation.

    The console script sits next to the interpreter that runs it (a venv's ``bin/``), also when
    it is reached through a symlink such as ``/usr/local/bin/tinc-hub``.
    """
    beside = Path(sys.executable).parent / "tinc-hub"
    if beside.is_file() and os.access(str(beside), os.X_OK):
        return str(beside)
    found = shutil.which("tinc-hub")
    if found:
        return os.path.realpath(found)
    raise HubError("cannot find the installed 'tinc-hub' executable for tinc-hub.service",
                   "install the hub with pip so that 'tinc-hub' is on PATH")


def checked_path(path: str, what: str) -> str:
    """``path`` normalised, if it is absolute and every character can be written into a unit
    file; else a one-line HubError."""
    bad = next((ch for ch in path if unicodedata.category(ch) in _UNQUOTABLE), None)
    if bad is not None:
        raise HubError(f"{what} {path!r} contains {bad!r}, which a systemd unit cannot carry",
                       "use a path without control characters or newlines")
    if not os.path.isabs(path):
        raise HubError(f"{what} {path!r} is not an absolute path", "pass an absolute path")
    return os.path.normpath(path)


def _quoted(word: str) -> str:
    """``word`` as one unit-file word: as is when plain, else in double quotes with ``\\`` and
    ``"`` backslash-escaped (systemd's own quoting, not a shell's)."""
    if _PLAIN_WORD_RE.fullmatch(word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_path_word(path: str) -> str:
    """ExecStart='s executable: ``%`` doubled (specifiers); systemd expands no ``$`` there and
    refuses quotes and backslashes in it, so such a path is refused here."""
    if any(ch in path for ch in "\"'\\"):
        raise HubError(f"tinc-hub executable {path!r} contains a quote or backslash, which"
                       " systemd refuses in ExecStart=", "install the hub under a plainer path")
    return _quoted(path.replace("%", "%%"))


def exec_argument_word(argument: str) -> str:
    """An ExecStart= argument: ``%`` doubled (specifiers), ``$`` doubled (variables), quoted."""
    return _quoted(argument.replace("%", "%%").replace("$", "$$"))


def exec_command_line(command: Sequence[str]) -> str:
    """The value of ExecStart= (or ExecReload=) for ``command``: executable, then arguments."""
    return " ".join([exec_path_word(command[0])] + [exec_argument_word(arg) for arg in command[1:]])


def path_list_word(path: str) -> str:
    """A word of a path list such as ReadWritePaths=: ``%`` doubled (specifiers), quoted."""
    return _quoted(path.replace("%", "%%"))


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root + "/") for root in roots)


def protect_home(paths: Sequence[str]) -> str:
    """``yes`` (home directories invisible) unless the service needs something there:
    then ``read-only``."""
    resolved = [p for path in paths for p in (path, os.path.realpath(path))]
    return "read-only" if any(_under(p, HOME_DIRS) for p in resolved) else "yes"


def render_unit(config: HubConfig, executable: str, state_dir: str, tinc_unit: str) -> str:
    """The unit file text: serve after the hub's tincd unit, restart on failure, sandboxed.

    Raises HubError (nothing rendered) for a value systemd could not read back exactly."""
    if not bootstrap.NET_RE.fullmatch(config.net):
        raise HubError(f"net name {config.net!r} cannot go into {UNIT_NAME}",
                       "use letters, digits, _ . and -")
    if not _UNIT_NAME_RE.fullmatch(tinc_unit):
        raise HubError(f"tinc unit name {tinc_unit!r} cannot go into {UNIT_NAME}")
    executable = checked_path(executable, "tinc-hub executable")
    state_dir = checked_path(os.path.abspath(state_dir), "state directory")  # init's cwd
    hosts_dir = checked_path(str(config.hosts_dir), "tinc hosts directory")
    peers_dir = checked_path(str(config.net_dir / "conf.d"), "tinc conf.d directory")
    command = [executable]
    if state_dir != DEFAULT_STATE_DIR:
        command += ["--state-dir", state_dir]
    command.append("serve")
    # Root signalling root's tincd needs no CAP_KILL; a port below 1024 needs one capability.
    capabilities = "CAP_NET_BIND_SERVICE" if config.api_port < PRIVILEGED_PORT_LIMIT else ""
    home = protect_home([executable, state_dir, hosts_dir, PACKAGE_DIR])
    return "\n".join([
        "# Written by tinc-hub init; re-running it rewrites this file.",
        "[Unit]",
        f"Description=tinc-hub enrolment API of tinc net {config.net}",  # NET_RE: no % or quotes
        f"After=network-online.target {tinc_unit}",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + exec_command_line(command),
        "Environment=PYTHONUNBUFFERED=1",
        "Restart=on-failure",
        "RestartSec=2",
        "# Descriptors for serve's connection caps (--max-connections 4096 plus a reserve),",
        "# whatever the distribution's DefaultLimitNOFILE is.",
        f"LimitNOFILE={OPEN_FILE_LIMIT}",
        "# Sandbox: the API writes only its state directory (registry, WAL, lock), the net's",
        "# hosts/ (host files) and conf.d/ (the other hubs' ConnectTo); it signals root's",
        "# tincd, which needs no capability.",
        f"CapabilityBoundingSet={capabilities}",
        # A user namespace would void CAP_NET_BIND_SERVICE (it counts in the host's namespace).
        *([] if capabilities else ["PrivateUsers=yes"]),
        # conf.d/ with "-": a missing one (init makes it) must not keep the API from starting
        "ReadWritePaths=" + " ".join([path_list_word(state_dir), path_list_word(hosts_dir),
                                      path_list_word("-" + peers_dir)]),
        f"ProtectHome={home}",
        *SANDBOX,
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]) + "\n"




def plan_service(config: HubConfig, state_dir: str, tinc_unit: str, executable: str,
                 current_text: Optional[str], enabled: bool, active: bool,
                 unit_dir: str = UNIT_DIR) -> bootstrap.Plan:
    """The unit file and the systemctl commands that leave tinc-hub.service written, enabled
    and running its current text (pure: the unit's current text and state are given)."""
    path = os.path.join(unit_dir, UNIT_NAME)
    text = render_unit(config, executable, state_dir, tinc_unit)
    changed = text != current_text
    commands = [("systemctl", "daemon-reload")] if changed else []
    if not enabled:
        commands.append(("systemctl", "enable", UNIT_NAME))
    if not active:
        commands.append(("systemctl", "start", UNIT_NAME))
    elif changed:
        commands.append(("systemctl", "restart", UNIT_NAME))
    return bootstrap.Plan(files=(bootstrap.FileSpec(path, text, 0o644),),
                          commands=tuple(commands))


def read_service_plan(config: HubConfig, state_dir: str, tinc_unit: str,
                      executable: Optional[str] = None,
                      unit_dir: str = UNIT_DIR) -> bootstrap.Plan:
    """plan_service on the unit as it is on this system now."""
    return plan_service(config, state_dir, tinc_unit, executable or installed_executable(),
                        bootstrap.read_text(os.path.join(unit_dir, UNIT_NAME)),
                        bootstrap.systemctl_state("is-enabled", UNIT_NAME) == "enabled",
                        bootstrap.systemctl_state("is-active", UNIT_NAME) == "active",
                        unit_dir)


def apply_service(plan: bootstrap.Plan) -> List[str]:
    """Write the unit and run the commands of plan_service; return what changed (paths and
    unit names)."""
    changed = bootstrap.apply_files(plan.files)
    for cmd in plan.commands:
        bootstrap.run(cmd)
        if cmd[1] == "enable":
            changed.append(cmd[-1])
    return changed


def install_service(config: HubConfig, state_dir: str, tinc_unit: str,
                    executable: Optional[str] = None, unit_dir: str = UNIT_DIR) -> List[str]:
    """Write, enable and start tinc-hub.service; return what changed (paths and unit names)."""
    return apply_service(read_service_plan(config, state_dir, tinc_unit, executable, unit_dir))


# -- the root side of the hub's names (names.py) ------------------------------------------------
NAMES_UNIT_TEXT_MARKER = "# Written by tinc-hub init; re-running it rewrites this file."
# The helper writes /etc/hosts only: a tmp file beside it, renamed over it (an atomic
# replace needs the directory). No capability: root owns /etc/hosts and /etc. @chown back in
# (after the deny list): the tmp file takes the owner of the file it replaces.
NAMES_SANDBOX = SANDBOX + ("SystemCallFilter=@chown",)


def render_names_units(config: HubConfig, executable: str, state_dir: str) -> Dict[str, str]:
    """tinc-hub-names.path (fires when the API rewrites names.json) and the oneshot
    tinc-hub-names.service it starts (`tinc-hub names apply`, root, sandboxed: writes /etc
    only). The net and subnet are on its command line, not read from the state directory
    the API may write. Raises HubError for a value systemd could not read back exactly."""
    from .names import NAMES_FILE, NAMES_PATH_UNIT, NAMES_SERVICE

    if not bootstrap.NET_RE.fullmatch(config.net):
        raise HubError(f"net name {config.net!r} cannot go into {NAMES_SERVICE}",
                       "use letters, digits, _ . and -")
    executable = checked_path(executable, "tinc-hub executable")
    state_dir = checked_path(os.path.abspath(state_dir), "state directory")
    names_file = checked_path(os.path.join(state_dir, NAMES_FILE), "names file")
    command = [executable]
    if state_dir != DEFAULT_STATE_DIR:
        command += ["--state-dir", state_dir]
    command += ["names", "apply", "--net", config.net, "--vpn-subnet", str(config.network)]
    home = protect_home([executable, state_dir, PACKAGE_DIR])
    path_unit = "\n".join([
        NAMES_UNIT_TEXT_MARKER,
        "[Unit]",
        f"Description=tinc-hub: names of tinc net {config.net} changed",
        "",
        "[Path]",
        "PathChanged=" + path_list_word(names_file),
        f"Unit={NAMES_SERVICE}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]) + "\n"
    service_unit = "\n".join([
        NAMES_UNIT_TEXT_MARKER,
        "[Unit]",
        f"Description=tinc-hub: NAME.{config.net} of every hub and node into /etc/hosts",
        "",
        "[Service]",
        "Type=oneshot",
        "ExecStart=" + exec_command_line(command),
        "CapabilityBoundingSet=",
        "PrivateUsers=yes",
        "ReadWritePaths=/etc",
        f"ProtectHome={home}",
        "PrivateNetwork=yes",
        *NAMES_SANDBOX,
    ]) + "\n"
    return {NAMES_PATH_UNIT: path_unit, NAMES_SERVICE: service_unit}


def plan_names_units(texts: Dict[str, str], current: Dict[str, Optional[str]], enabled: bool,
                     active: bool, unit_dir: str = UNIT_DIR) -> bootstrap.Plan:
    """The two units written, the path unit enabled and running, and one run of the service
    (the names as they are now); pure."""
    from .names import NAMES_PATH_UNIT, NAMES_SERVICE

    changed = any(texts[name] != current.get(name) for name in texts)
    commands = [("systemctl", "daemon-reload")] if changed else []
    if not enabled:
        commands.append(("systemctl", "enable", NAMES_PATH_UNIT))
    if not active or changed:
        commands.append(("systemctl", "restart", NAMES_PATH_UNIT))
    commands.append(("systemctl", "start", NAMES_SERVICE))
    return bootstrap.Plan(files=tuple(bootstrap.FileSpec(os.path.join(unit_dir, name), text, 0o644)
                                      for name, text in sorted(texts.items())),
                          commands=tuple(commands))


def read_names_units_plan(config: HubConfig, state_dir: str, executable: Optional[str] = None,
                          unit_dir: str = UNIT_DIR) -> bootstrap.Plan:
    """plan_names_units on the units as they are on this system now."""
    from .names import NAMES_PATH_UNIT

    texts = render_names_units(config, executable or installed_executable(), state_dir)
    return plan_names_units(
        texts, {name: bootstrap.read_text(os.path.join(unit_dir, name)) for name in texts},
        bootstrap.systemctl_state("is-enabled", NAMES_PATH_UNIT) == "enabled",
        bootstrap.systemctl_state("is-active", NAMES_PATH_UNIT) == "active", unit_dir)


# -- exposures at boot and after another hub's change (tinc-hub expose) ------------------------

EXPOSE_UNIT = "tinc-hub-expose.service"
EXPOSE_PATH_UNIT = "tinc-hub-expose.path"
# re-applies after nftables.service (re)loads its ruleset, which begins with `flush ruleset`
EXPOSE_NFT_UNIT = "tinc-hub-expose-nftables.service"
NFTABLES_UNIT = "nftables.service"
EXPOSE_STAMP = "expose-changed"  # in the state dir: touched by serve's follower (the API)
EXPOSE_APPLY_TIMEOUT = 120  # s: a registry that does not answer never holds the boot longer


def apply_unit_tail(wanted_by: str) -> "list[str]":
    """The lines that end both root oneshots running ``expose apply``: its time limit, what it may
    not gain, and the [Install] section wanted by ``wanted_by``."""
    return [
        f"TimeoutStartSec={EXPOSE_APPLY_TIMEOUT}",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "UMask=0077",
        "",
        "[Install]",
        f"WantedBy={wanted_by}",
    ]


def render_expose_units(config: HubConfig, executable: str, state_dir: str,
                        tinc_unit: str) -> "dict[str, str]":
    """name -> text of the root oneshot that runs ``tinc-hub expose apply`` (at boot, after
    the net's tincd; a failure fails only this unit), of the .path unit that starts it when
    the API's follower touches the stamp file (an exposure changed on another hub), and of
    EXPOSE_NFT_UNIT, which applies again each time nftables.service is started, restarted or
    reloaded (its ruleset flushes every table, ours too): active after its run
    (RemainAfterExit=) so that PartOf= propagates a restart and ReloadPropagatedFrom= a reload
    to it (systemd ignores both for an inactive unit), ordered After= nftables.service so that
    it runs once the flush is done; WantedBy= nftables.service makes a start of nftables.service
    start it too. The oneshots read the registry themselves: the stamp carries no data.
    HubError for what a unit cannot carry."""
    render_unit(config, executable, state_dir, tinc_unit)  # the same checks, the same refusals
    executable = checked_path(executable, "tinc-hub executable")
    state_dir = checked_path(os.path.abspath(state_dir), "state directory")
    command = [executable] + (["--state-dir", state_dir] if state_dir != DEFAULT_STATE_DIR else [])
    command += ["expose", "apply"]
    stamp = os.path.join(state_dir, EXPOSE_STAMP)
    exec_line = exec_command_line(command)
    service = "\n".join([
        "# Written by tinc-hub init; re-running it rewrites this file.",
        "[Unit]",
        f"Description=tinc-hub exposures of tinc net {config.net} (nftables table tinc_hub_NET)",
        f"After=network-online.target {tinc_unit}",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=oneshot",
        "# root with CAP_NET_ADMIN: nftables, net.ipv4.ip_forward, the hub's own host file",
        "ExecStart=" + exec_line,
    ] + apply_unit_tail("multi-user.target")) + "\n"
    path = "\n".join([
        "# Written by tinc-hub init; re-running it rewrites this file.",
        "[Unit]",
        f"Description=apply tinc-hub exposures of tinc net {config.net} when an exposure changes",
        "",
        "[Path]",
        "PathChanged=" + path_list_word(stamp),
        f"Unit={EXPOSE_UNIT}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]) + "\n"
    nft = "\n".join([
        "# Written by tinc-hub init; re-running it rewrites this file.",
        "[Unit]",
        f"Description=tinc-hub exposures of tinc net {config.net} again after {NFTABLES_UNIT}"
        " flushed the ruleset",
        f"After=network-online.target {tinc_unit} {NFTABLES_UNIT}",
        "Wants=network-online.target",
        f"PartOf={NFTABLES_UNIT}",
        f"ReloadPropagatedFrom={NFTABLES_UNIT}",
        "",
        "[Service]",
        "Type=oneshot",
        "RemainAfterExit=yes",
        "ExecStart=" + exec_line,
        "ExecReload=" + exec_line,
    ] + apply_unit_tail(f"multi-user.target {NFTABLES_UNIT}")) + "\n"
    return {EXPOSE_UNIT: service, EXPOSE_PATH_UNIT: path, EXPOSE_NFT_UNIT: nft}


def plan_expose_units(config: HubConfig, state_dir: str, tinc_unit: str, executable: str,
                      current: "dict[str, Optional[str]]", enabled: "dict[str, bool]",
                      active: "dict[str, bool]", unit_dir: str = UNIT_DIR) -> bootstrap.Plan:
    """The units written and enabled, the .path unit watching, EXPOSE_NFT_UNIT active (pure:
    current texts and states given). EXPOSE_UNIT is not started here: serve's follower asks
    for it."""
    texts = render_expose_units(config, executable, state_dir, tinc_unit)
    changed = any(texts[name] != current.get(name) for name in texts)
    commands = [("systemctl", "daemon-reload")] if changed else []
    commands += [("systemctl", "enable", name) for name in texts if not enabled.get(name)]
    for name in (EXPOSE_PATH_UNIT, EXPOSE_NFT_UNIT):
        if not active.get(name):
            commands.append(("systemctl", "start", name))
        elif changed:
            commands.append(("systemctl", "restart", name))
    return bootstrap.Plan(files=tuple(bootstrap.FileSpec(os.path.join(unit_dir, name), text, 0o644)
                                      for name, text in texts.items()),
                          commands=tuple(commands))


def read_expose_plan(config: HubConfig, state_dir: str, tinc_unit: str,
                     executable: Optional[str] = None, unit_dir: str = UNIT_DIR) -> bootstrap.Plan:
    """plan_expose_units on the units as they are on this system now."""
    names = (EXPOSE_UNIT, EXPOSE_PATH_UNIT, EXPOSE_NFT_UNIT)
    return plan_expose_units(
        config, state_dir, tinc_unit, executable or installed_executable(),
        {name: bootstrap.read_text(os.path.join(unit_dir, name)) for name in names},
        {name: bootstrap.systemctl_state("is-enabled", name) == "enabled" for name in names},
        {name: bootstrap.systemctl_state("is-active", name) == "active" for name in names},
        unit_dir)
