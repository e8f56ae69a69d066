"""One plan per job: every command a real run starts and every file it leaves behind appeared in
its --dry-run, for the node's join and the hub's init. The real run is watched from outside
(strace: the commands the process started itself, the files it created or renamed into
place), so the check does not rely on the product's own account of what it did."""

import re
import shlex
from typing import List, Sequence, Tuple

import pytest

from labkit import netlab, tracing

NET = "middle-earth"
READ_ONLY = {("systemctl", "is-active"), ("systemctl", "is-enabled")}  # state queries


def planned_commands(dry_output: str) -> List[Tuple[str, ...]]:
    return [tuple(shlex.split(line[2:])) for line in dry_output.splitlines()
            if line.startswith("$ ")]


def matches(planned: Sequence[str], real: Sequence[str]) -> bool:
    """A planned command matches a real one word for word; <placeholder> words match any."""
    return len(planned) == len(real) and all(
        p == r or (p.startswith("<") and p.endswith(">")) for p, r in zip(planned, real))


def assert_covered(trace: tracing.Trace, dry_output: str, host: netlab.Host) -> None:
    planned = planned_commands(dry_output)
    assert trace.commands, "the trace saw no command: the check would mean nothing"
    for command in trace.commands:
        if tuple(command[:2]) in READ_ONLY:
            continue
        assert any(matches(p, command) for p in planned), (
            "the real run ran %r, which its dry run did not show:\n%s" % (command, dry_output))
    left = [path for path in dict.fromkeys(trace.files) if host.exists(path)]
    assert left, "the trace saw no file: the check would mean nothing"
    words = set(re.split(r"[\s(),]+", dry_output))
    missing = [path for path in left if path not in words]
    assert not missing, ("the real run left %s, which its dry run did not name:\n%s"
                         % (missing, dry_output))


def traced(host: netlab.Host, argv: Sequence[str], prefix: str, env=None, timeout=180):
    return host.run(tracing.strace_argv(argv, prefix), env=env, timeout=timeout)


@pytest.mark.netlab
def test_real_runs_do_only_what_their_dry_runs_showed():
    topo = netlab.build_nat_topology(node_names=["hobbiton"], hub_name="erebor")
    try:
        hub = netlab.HubDriver(topo.hub, NET, "erebor")
        init_args = ["init", "--net", NET, "--name", "erebor", "--address", hub.address,
                     "--vpn-subnet", hub.vpn_subnet, "--init", "none", "--key-size", "2048"]
        dry = hub.cli(*init_args, "--dry-run")
        assert "dry run: nothing was changed" in dry.stderr
        assert not topo.hub.exists("/var/lib/tinc-hub/hub.json")
        assert not topo.hub.exists("/etc/tinc/" + NET)
        with tracing.TraceDir() as prefix:
            real = traced(topo.hub, [hub.tinc_hub] + init_args, prefix)
            hub_trace = tracing.read_trace(prefix, hub.tinc_hub)
        assert "tincd started" in real.stdout, real.stdout
        assert_covered(hub_trace, dry.stdout, topo.hub)
        assert any(c[-1] == "-K2048" for c in hub_trace.commands), hub_trace.commands

        hub.serve()
        node = topo.nodes[0]
        token = hub.token_create("--name", "hobbiton")["token"]
        argv = netlab.bootstrap_argv(name="hobbiton", python="/usr/bin/python3")
        env = {"TINC_BOOTSTRAP_TOKEN": token}
        dry = node.run(argv + ["--dry-run"], env=env)
        assert "dry run: nothing was changed" in dry.stderr
        assert not node.exists("/etc/tinc/" + NET)
        with tracing.TraceDir() as prefix:
            real = traced(node, argv, prefix, env=env)
            node_trace = tracing.read_trace(prefix, str(netlab.BOOTSTRAP_PY))
        assert netlab.printed_address(real.stdout), real.stdout + real.stderr
        assert_covered(node_trace, dry.stdout + dry.stderr, node)
        assert any(c[-1] == "-K2048" for c in node_trace.commands), node_trace.commands
        assert node.ping(hub.vpn_address())
    finally:
        topo.close()


def test_a_command_missing_from_the_dry_run_is_caught():
    """The check above can fail: a command or file the dry run did not show is reported."""
    dry = "$ tincd -n middle-earth -K2048\n--- file /etc/tinc/x (mode 0644)\n"

    class Everything:
        @staticmethod
        def exists(path):
            return True

    assert_covered(tracing.Trace([("tincd", "-n", "middle-earth", "-K2048")],
                                 ["/etc/tinc/x"]), dry, Everything())
    with pytest.raises(AssertionError, match="did not show"):
        assert_covered(tracing.Trace([("tincd", "-n", "middle-earth")], ["/etc/tinc/x"]),
                       dry, Everything())
    with pytest.raises(AssertionError, match="did not name"):
        assert_covered(tracing.Trace([("tincd", "-n", "middle-earth", "-K2048")],
                                     ["/etc/tinc/x", "/etc/rc.local"]), dry, Everything())
