"""The token stays secret on a real node (network namespaces, real hub, real tincd):

- a root join with the token in TINC_BOOTSTRAP_TOKEN: the tincd that bootstrap.py starts
  (--init none) does not have it in /proc/PID/environ, while a variable set next to it does;
- the sudo-safe one-liner printed by `tinc-hub token create`, typed by a non-root user into
  a shell (private /etc of the netlab host: useradd and sudoers never touch the machine),
  under `strace -f -v -e trace=execve` run by root: the join succeeds, no execve (argv or
  environment) holds the token, sudo's log (JSON format: it records the whole environment)
  holds the command line but not the token;
- vagrant/node.sh hands the one-liner to sh without putting it in an argv.
"""

import json
import os
import re

import pytest

from labkit import netlab
from support import REPO_ROOT

pytestmark = pytest.mark.netlab

NET = "secretnet"
HUB = "erebor"
ROOT_NODE, SUDO_NODE, VAGRANT_NODE = "alpha", "bravo", "charlie"
USER = "tinctester"
SUDO_LOG = "/var/log/sudo-%s.log" % USER
MARK = "TINC_BOOTSTRAP_TEST_MARK=1"
SESSION_END = "tinc-session-end"


class Env:
    def __init__(self, topo, hub):
        self.topo, self.hub = topo, hub
        self.nodes = {n.name: n for n in topo.nodes}

    def netlab_diagnostics(self):
        return self.topo.diagnostics()


@pytest.fixture(scope="module")
def env():
    if not netlab.TINC_HUB.exists():
        pytest.fail("%s missing: run tests/setup-env" % netlab.TINC_HUB)
    topo = netlab.build_nat_topology(node_names=[ROOT_NODE, SUDO_NODE, VAGRANT_NODE],
                                     hub_name="hub")
    try:
        hub = netlab.HubDriver(topo.hub, NET, HUB)
        hub.init(key_size=2048, init="none")
        hub.serve()
        yield Env(topo, hub)
    finally:
        topo.close()


def secrets_of(token):
    return [token, netlab.decode_token(token)["s"]]


def environ_of(pid):
    with open("/proc/%d/environ" % pid, "rb") as handle:
        return handle.read().decode("utf-8", "replace").split("\0")


def running_tincd(node):
    pid = netlab.tincd_pid(node, NET)
    assert pid and netlab.pid_alive(pid) and pid in node.pids(), "no tincd in %s" % node.name
    return pid


def test_tincd_started_by_bootstrap_does_not_inherit_the_token(env):
    node = env.nodes[ROOT_NODE]
    token = env.hub.token_create()["token"]
    proc = node.run(netlab.bootstrap_argv(name=ROOT_NODE, init="none", timeout=60),
                    env={"TINC_BOOTSTRAP_TOKEN": " %s\n" % token,  # padded: stripped
                         "TINC_BOOTSTRAP_TEST_MARK": "1"}, timeout=150, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert netlab.printed_address(proc.stdout)
    environ = environ_of(running_tincd(node))
    assert MARK in environ, "positive control: tincd should carry what bootstrap inherited"
    assert not [v for v in environ if v.startswith("TINC_BOOTSTRAP_TOKEN=")], environ
    for secret in secrets_of(token):
        assert not [v for v in environ if secret in v]
        assert secret not in proc.stdout + proc.stderr
        assert secret not in node.read_file("/var/log/tinc-bootstrap.log")


# --------------------------------------------------------------------------- the sudo form

def printed_sudo_form(hub):
    """The sudo-safe line exactly as `tinc-hub token create` prints it for a human."""
    out = hub.cli("token", "create", "--name", SUDO_NODE).stdout
    lines = out.splitlines()
    heading = next(i for i, line in enumerate(lines) if line.startswith("or as a user with sudo"))
    token = next(line for line in lines if line.startswith("tinc1."))
    return lines[heading + 1], token


def traced_session(node, user_argv, typed, env, timeout=240):
    """Run user_argv with `typed` as its stdin (what a person types into a shell) under
    `strace -f -v -e trace=execve` run by root. Returns (session output, strace lines) once
    the session printed SESSION_END; strace is then stopped: it detaches from the tincd the
    session left running."""
    node.write_file("/run/typed", typed, 0o600)
    script = 'exec strace -f -v -s 100000 -e trace=execve -o /run/strace.out "$@" </run/typed'
    proc = node.popen(["sh", "-c", script, "sh"] + user_argv, env=env)
    try:
        netlab.wait_until(lambda: SESSION_END in proc.output() or proc.poll() is not None,
                          timeout, 0.2, what="the traced session on %s" % node.name)
    finally:
        proc.stop()
    node.run(["rm", "-f", "/run/typed"])
    return proc.output(), node.read_file("/run/strace.out").splitlines()


def test_sudo_form_typed_by_a_user_leaks_the_token_nowhere(env):
    node, hub = env.nodes[SUDO_NODE], env.hub
    line, token = printed_sudo_form(hub)
    assert "sudo " in line and token in line
    # A user with sudo rights, in the netlab host's private /etc (overlay) and /run (tmpfs).
    node.run(["useradd", "--no-create-home", "--home-dir", "/run/" + USER, "--shell",
              "/bin/sh", USER])
    assert USER in node.read_file("/etc/passwd")
    assert USER not in open("/etc/passwd").read(), "the machine's own /etc was touched"
    node.run(["install", "-d", "-o", USER, "-m", "0700", "/run/" + USER,
              "/run/%s/tmp" % USER])
    node.write_file("/etc/sudoers.d/" + USER,
                    "Defaults:%s logfile=%s, log_format=json, log_host, log_year, !syslog\n"
                    "%s ALL=(ALL:ALL) NOPASSWD: ALL\n" % (USER, SUDO_LOG, USER), mode=0o440)
    node.run(["visudo", "-c"])
    # The lab has no init system of its own: the same flags every netlab join passes.
    typed_line = line.replace('--token-file "$tinc_token_file"',
                              '--token-file "$tinc_token_file" --init none --key-size 2048 '
                              '--timeout 60 --name ' + SUDO_NODE)
    assert typed_line != line
    output, trace = traced_session(
        node, ["setpriv", "--reuid=" + USER, "--regid=" + USER, "--init-groups", "sh", "-s"],
        typed_line + "\necho " + SESSION_END + "\n",
        env={"HOME": "/run/" + USER, "USER": USER, "LOGNAME": USER,
             "TMPDIR": "/run/%s/tmp" % USER})
    assert SESSION_END in output, output

    # the join worked
    assert re.search(r"(?m)^tinc-bootstrap: joined: %s is " % SUDO_NODE, output), output
    listed = {n["name"]: n for n in hub.nodes()}
    assert SUDO_NODE in listed and env.topo.hub.wait_ping(listed[SUDO_NODE]["address"], 10)

    # strace saw the session (positive control) and no execve carried the token
    execs = [t for t in trace if "execve(" in t]
    assert any('"sudo", "python3", "-", "--token-file"' in t for t in execs), execs
    assert any('"curl", "-fsS", "--pinnedpubkey"' in t for t in execs), execs
    assert any("TMPDIR=/run/%s/tmp" % USER in t for t in execs), "strace -v shows environments"
    for secret in secrets_of(token):
        assert not [t for t in trace if secret in t], "the token is in an execve"

    # sudo logged the command (and its environment), not the token
    log = node.read_file(SUDO_LOG)
    assert '"--token-file"' in log and '"runenv"' in log, log
    for secret in secrets_of(token):
        assert secret not in log and secret not in output
    for v in environ_of(running_tincd(node)):
        assert not any(secret in v for secret in secrets_of(token))
    assert node.run(["ls", "-A", "/run/%s/tmp" % USER]).stdout == "", "token file left behind"


# --------------------------------------------------------------------------- Vagrant

def test_vagrant_node_sh_keeps_the_one_liner_out_of_argv(env):
    node, hub = env.nodes[VAGRANT_NODE], env.hub
    data = hub.token_create("--name", VAGRANT_NODE)
    node.write_file("/run/token.json", json.dumps(data), mode=0o600)
    script = os.path.join(REPO_ROOT, "vagrant", "node.sh")
    output, trace = traced_session(
        node, ["sh", "-s"],
        "sh %s /run/token.json %s 192.0.2.0/24 %s && echo %s\n" % (
            script, netlab.ROUTER_LAN, hub.vpn_address(), SESSION_END), env={})
    assert SESSION_END in output and "3 received" in output, output
    execs = [t for t in trace if "execve(" in t]
    assert any('"curl", "-fsS"' in t for t in execs), execs
    for secret in secrets_of(data["token"]):
        assert not [t for t in execs if secret in t.split("], [", 1)[0]], \
            "the token is in an argv"
