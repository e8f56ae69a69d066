"""Shared pytest setup: the `netlab` marker (root + /dev/net/tun) and topology fixtures."""

import os
import re
import signal
import threading

import pytest

from bootstrap import bootstrap
from labkit import netlab


def netlab_skip_reason():
    """Why namespace tests cannot run here, or None. Only these two reasons skip: a missing
    tool is a failure (tests/setup-env installs them)."""
    if os.geteuid() != 0:
        return "netlab tests need root (network/mount namespaces, tincd); run tests/run as root"
    if not os.path.exists("/dev/net/tun"):
        return "netlab tests need /dev/net/tun (tun devices for tincd); not present here"
    return None


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "netlab: needs root and /dev/net/tun (network namespaces, real tincd); "
        "skipped otherwise")
    config.addinivalue_line(
        "markers", "boot: booted systemd/SysV containers (systemd-nspawn, labkit.nspawn); "
        "the slow group: select with -m boot, leave out with -m 'not boot'")
    config.addinivalue_line(
        "markers", "vagrant: the Vagrantfile's four VMs for real (vagrant-libvirt, QEMU "
        "emulation, labkit.vms); the slowest group: select with -m vagrant")
    # SIGTERM (e.g. a CI timeout) -> KeyboardInterrupt, so that fixture finalizers run and
    # the namespaces are removed; atexit in netlab is the last line of defence.
    if threading.current_thread() is threading.main_thread():
        def on_term(signum, frame):
            raise KeyboardInterrupt("SIGTERM")
        signal.signal(signal.SIGTERM, on_term)


def pytest_collection_modifyitems(config, items):
    reason = netlab_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "netlab" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failure in a test using a topology (or anything with netlab_diagnostics()), add
    the state of every host (addresses, routes, /var/log, background process logs)."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
    if rep.failed and call.excinfo is not None and rep.when in ("setup", "call"):
        for value in getattr(item, "funcargs", {}).values():
            diag = getattr(value, "netlab_diagnostics", None)
            if callable(diag):
                try:
                    rep.sections.append(("netlab diagnostics", diag()))
                except Exception as e:  # pragma: no cover
                    rep.sections.append(("netlab diagnostics", "unavailable: %s" % e))
                break


def pytest_terminal_summary(terminalreporter):
    if netlab.TIMINGS:
        terminalreporter.write_sep("-", "netlab timings")
        for label, seconds in netlab.TIMINGS:
            terminalreporter.write_line("%-60s %7.2f s" % (label, seconds))


def hosts_block_nets() -> set:
    """The nets that have a managed block in this machine's /etc/hosts."""
    begin = re.compile(re.escape(bootstrap.HOSTS_BEGIN).replace(r"\{\}", "(.+?)") + "$")
    try:
        with open(bootstrap.ETC_HOSTS, encoding="utf-8", errors="surrogateescape") as hosts:
            return {m.group(1) for m in map(begin.match, hosts.read().splitlines()) if m}
    except FileNotFoundError:
        return set()


@pytest.fixture(scope="session", autouse=True)
def etc_hosts_left_as_found():
    """Hubs run as root (serve, names rounds) write their net's block into the machine's
    /etc/hosts; at the end of the session, the blocks of nets that were not there at its
    start are removed (only those lines: bootstrap.update_hosts_block)."""
    before = hosts_block_nets()
    yield
    for net in sorted(hosts_block_nets() - before):
        try:
            bootstrap.update_hosts_block(net, [], bootstrap.ETC_HOSTS)
        except (OSError, ValueError):
            pass  # not root, or damaged markers: left for a person to look at


@pytest.fixture
def make_topology(request):
    """Factory: make_topology(n_nodes, **kw) -> netlab.NatTopology, closed after the test."""
    made = []

    def make(n_nodes=2, **kw):
        topo = netlab.build_nat_topology(n_nodes, **kw)
        made.append(topo)
        return topo

    yield make
    for topo in made:
        topo.close()


@pytest.fixture(scope="module")
def nat_topology():
    """One hub, a NAT router and two nodes, shared by a module."""
    topo = netlab.build_nat_topology(2)
    try:
        yield topo
    finally:
        topo.close()


@pytest.fixture(scope="module")
def pg():
    """A throwaway PostgreSQL cluster (labkit.postgres) shared by a module, removed after it.
    Modules that use it skip themselves with postgres.unavailable_reason()."""
    from labkit import postgres

    with postgres.ThrowawayPostgres() as server:
        yield server
