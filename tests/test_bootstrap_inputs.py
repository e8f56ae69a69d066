"""bootstrap.py under hostile local input: `--net` paths, a planted log file, and the token
(whitespace, error messages, logs). Runs the real script in a subprocess, on a temporary
tinc dir; the tincd-environment check is in test_secrets_e2e.py."""

import os
import socket
import subprocess
import sys

import pytest

from support import BOOTSTRAP_PY, bootstrap

TOKEN = bootstrap.Token("127.0.0.1", 8655, "sha256//" + "A" * 43 + "=", "middle-earth",
                        "erebor", "S3cr3tS3cr3tS3cr3tS3cr3tS3cr3tS3cr3tS3c")
TOKEN_TEXT = bootstrap.encode_token(TOKEN)


def run_bootstrap(args, env=None, timeout=60):
    """bootstrap.py with only the TINC_BOOTSTRAP_* variables given here."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TINC_BOOTSTRAP_")}
    full_env.setdefault("TINC_BOOTSTRAP_LOG", "")
    full_env.update(env or {})
    return subprocess.run([sys.executable, BOOTSTRAP_PY] + args, env=full_env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)


def snapshot(root):
    """{path: bytes or 'dir'} of everything under root."""
    out = {}
    for directory, dirs, files in os.walk(str(root)):
        for name in dirs:
            out[os.path.join(directory, name)] = "dir"
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                out[path] = handle.read()
    return out


# --------------------------------------------------------------------------- --net is a name

@pytest.fixture
def joined_looking_dirs(tmp_path):
    """A tinc dir, and directories outside it (and one inside, nested) that carry a
    bootstrap.json, so a --net that is a path would find "state" there and go on to rmtree."""
    tinc = tmp_path / "tinc"
    for where in (tmp_path / "victim", tinc / "a" / "b"):
        where.mkdir(parents=True)
        (where / "bootstrap.json").write_text('{"net": "x", "name": "n", "init": "none"}\n')
        (where / "sentinel").write_text("keep me\n")
    return tmp_path, tinc


@pytest.mark.parametrize("command", ["leave", "status"])
@pytest.mark.parametrize("net", ["../victim", "a/b", "/", "..", ".", "../../" + "x" * 5,
                                 "-rf", "a\nb", ""])
def test_net_that_is_a_path_is_a_usage_error(joined_looking_dirs, command, net):
    root, tinc = joined_looking_dirs
    before = snapshot(root)
    env = {"TINC_BOOTSTRAP_TINC_DIR": str(tinc)}
    args = [command, "--net=" + net]
    if net == "":  # an empty --net means "not given": the one joined net is looked for
        args = [command]
        env["TINC_BOOTSTRAP_NET"] = ""
    proc = run_bootstrap(args, env=env)
    assert proc.returncode == 2, proc.stderr
    expected = "no nets joined here" if net == "" else "bad net name"
    assert expected in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(root) == before


def test_net_from_the_environment_is_checked_too(joined_looking_dirs):
    root, tinc = joined_looking_dirs
    before = snapshot(root)
    proc = run_bootstrap(["leave"], env={"TINC_BOOTSTRAP_TINC_DIR": str(tinc),
                                         "TINC_BOOTSTRAP_NET": "../victim"})
    assert proc.returncode == 2 and "bad net name" in proc.stderr
    assert snapshot(root) == before


def test_a_valid_net_is_still_left(joined_looking_dirs):
    """Positive control: the same layout under a valid net name is removed by `leave`."""
    root, tinc = joined_looking_dirs
    (tinc / "ok").mkdir()
    (tinc / "ok" / "bootstrap.json").write_text('{"net": "ok", "name": "n", "init": "none"}\n')
    proc = run_bootstrap(["leave", "--net", "ok"], env={"TINC_BOOTSTRAP_TINC_DIR": str(tinc)})
    assert proc.returncode == 0, proc.stderr
    assert not (tinc / "ok").exists()
    assert (root / "victim" / "sentinel").exists() and (tinc / "a" / "b" / "sentinel").exists()


def test_find_nets_ignores_entries_that_are_not_net_names(tmp_path):
    for name in ("good", ".hidden", "-dash"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "bootstrap.json").write_text("{}")
    assert bootstrap.find_nets(str(tmp_path)) == ["good"]


# --------------------------------------------------------------------------- the log file

def _status_with_log(tmp_path, log):
    """`status` of a net that does not exist: an error line that goes to the log."""
    return run_bootstrap(["status", "--net", "nothing-here"],
                         env={"TINC_BOOTSTRAP_TINC_DIR": str(tmp_path / "tinc"),
                              "TINC_BOOTSTRAP_LOG": str(log)}, timeout=20)


def test_log_is_written_to_a_plain_file(tmp_path):
    """Positive control for the tests below: the error line reaches a plain log file."""
    log = tmp_path / "log" / "tinc-bootstrap.log"
    proc = _status_with_log(tmp_path, log)
    assert proc.returncode == 2
    assert "was not joined by tinc-bootstrap" in log.read_text()
    assert (log.stat().st_mode & 0o777) == 0o600


def test_log_symlink_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.chmod(str(victim), 0o644)
    log = tmp_path / "tinc-bootstrap.log"
    log.symlink_to(victim)
    proc = _status_with_log(tmp_path, log)
    assert proc.returncode == 2, proc.stderr
    assert victim.read_text() == "precious\n" and (victim.stat().st_mode & 0o777) == 0o644
    assert os.path.islink(str(log))
    assert "not logging to {}: it is a symbolic link".format(log) in proc.stderr


def test_dangling_log_symlink_creates_nothing(tmp_path):
    target = tmp_path / "would-be-created"
    log = tmp_path / "tinc-bootstrap.log"
    log.symlink_to(target)
    assert _status_with_log(tmp_path, log).returncode == 2
    assert not target.exists()


def test_log_fifo_does_not_hang(tmp_path):
    log = tmp_path / "tinc-bootstrap.log"
    os.mkfifo(str(log))
    proc = _status_with_log(tmp_path, log)  # a blocking open would time out here
    assert proc.returncode == 2
    assert "not logging to" in proc.stderr


def test_log_fifo_with_a_reader_is_refused(tmp_path):
    log = tmp_path / "tinc-bootstrap.log"
    os.mkfifo(str(log))
    reader = os.open(str(log), os.O_RDONLY | os.O_NONBLOCK)
    try:
        proc = _status_with_log(tmp_path, log)
        assert proc.returncode == 2
        assert "it is not a regular file" in proc.stderr
        assert os.read(reader, 100) == b""  # the writer came and went without a byte
    finally:
        os.close(reader)


def test_log_socket_is_refused(tmp_path):
    log = tmp_path / "tinc-bootstrap.log"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(log))
        proc = _status_with_log(tmp_path, log)
        assert proc.returncode == 2 and "not logging to" in proc.stderr
    finally:
        server.close()


def test_log_hard_link_is_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    log = tmp_path / "tinc-bootstrap.log"
    os.link(str(victim), str(log))
    proc = _status_with_log(tmp_path, log)
    assert proc.returncode == 2
    assert victim.read_text() == "precious\n"
    assert "it has other hard links" in proc.stderr


def test_log_file_of_another_user_is_refused(tmp_path):
    """A plain file planted by another user at the log path (a --log in a directory that
    user can write) is not appended to: that user could read what root logs."""
    log = tmp_path / "tinc-bootstrap.log"
    log.write_text("")
    os.chown(str(log), 65534, 65534)
    proc = _status_with_log(tmp_path, log)
    assert proc.returncode == 2
    assert log.read_text() == ""
    assert "it belongs to another user" in proc.stderr


# --------------------------------------------------------------------------- the token

def _dry_run(args, env=None):
    return run_bootstrap(["--dry-run", "--name", "hobbiton", "--init", "none",
                          "--tinc-dir", "/nonexistent/tinc"] + args, env=env)


@pytest.mark.parametrize("padding", [" ", "\n", "\t ", "\r\n", " \n\n "])
@pytest.mark.parametrize("source", ["env", "file", "argument"])
def test_token_with_surrounding_whitespace_works(tmp_path, source, padding):
    text = padding + TOKEN_TEXT + padding
    args, env = [], {}
    if source == "env":
        env["TINC_BOOTSTRAP_TOKEN"] = text
    elif source == "file":
        (tmp_path / "token").write_text(text)
        args = ["--token-file", str(tmp_path / "token")]
    else:
        args = ["--token", text]
    proc = _dry_run(args, env)
    assert proc.returncode == 0, proc.stderr
    assert "POST https://127.0.0.1:8655/v1/enroll name=hobbiton" in proc.stdout


def test_token_file_that_is_not_a_token_file_is_refused(tmp_path):
    proc = _dry_run(["--token-file", "/dev/zero"])
    assert proc.returncode == 2 and "too large" in proc.stderr


def _assert_no_token(*texts):
    for text in texts:
        assert TOKEN_TEXT not in text and TOKEN.secret not in text, text
        assert TOKEN_TEXT[:30] not in text, text


@pytest.mark.parametrize("args,env,needle", [
    # the token pasted where something else was expected
    (["--hub", TOKEN_TEXT], {"TINC_BOOTSTRAP_TOKEN": TOKEN_TEXT}, "bad host in --hub"),
    (["--hub", TOKEN_TEXT + ":1"], {"TINC_BOOTSTRAP_TOKEN": TOKEN_TEXT}, "bad host in --hub"),
    (["--token-file", TOKEN_TEXT], {}, "cannot read --token-file"),
    (["--name", TOKEN_TEXT], {"TINC_BOOTSTRAP_TOKEN": TOKEN_TEXT}, "invalid node name"),
    (["--net", TOKEN_TEXT], {"TINC_BOOTSTRAP_TOKEN": TOKEN_TEXT}, "bad net name"),
    (["--key-size", TOKEN_TEXT], {"TINC_BOOTSTRAP_TOKEN": TOKEN_TEXT}, "invalid int value"),
    (["--init", TOKEN_TEXT], {"TINC_BOOTSTRAP_TOKEN": TOKEN_TEXT}, "invalid choice"),
    ([], {"TINC_BOOTSTRAP_TOKEN": TOKEN_TEXT, "TINC_BOOTSTRAP_TIMEOUT": TOKEN_TEXT},
     "TINC_BOOTSTRAP_"),
    # a malformed token: the message does not echo it
    (["--token", TOKEN_TEXT[:-3] + "!!!"], {}, "token is malformed"),
    (["--token", TOKEN_TEXT + TOKEN_TEXT], {}, "token is malformed"),
])
def test_errors_never_show_the_token(tmp_path, args, env, needle):
    env = dict(env, TINC_BOOTSTRAP_LOG=str(tmp_path / "log"))
    for verbose in ([], ["-v"]):
        proc = run_bootstrap(["--dry-run", "--init", "none", "--tinc-dir",
                              str(tmp_path / "tinc")] + verbose + args, env=env)
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr, proc.stderr
        _assert_no_token(proc.stdout, proc.stderr)


def _token_with(**fields) -> str:
    return bootstrap.encode_token(TOKEN._replace(**fields))


@pytest.mark.parametrize("text", [
    # junk inside a pasted token: base64 decoding used to skip it, and the junk then reached
    # the Authorization header (a newline made http.client fail with the token in its message)
    TOKEN_TEXT[:20] + "\n" + TOKEN_TEXT[20:], TOKEN_TEXT[:20] + " " + TOKEN_TEXT[20:],
    TOKEN_TEXT[:20] + "\r\n" + TOKEN_TEXT[20:], TOKEN_TEXT[:20] + "!" + TOKEN_TEXT[20:],
    TOKEN_TEXT[:20] + "\u200b" + TOKEN_TEXT[20:], TOKEN_TEXT[:20] + "+/" + TOKEN_TEXT[20:],
    TOKEN_TEXT + "==", TOKEN_TEXT + "A",
    # a token whose fields would be printed or used as they are
    _token_with(pin="sha256//\x1b]0;pwned\x07"), _token_with(pin="sha256//" + "A" * 43),
    _token_with(pin="sha256//" + "A" * 44 + "="), _token_with(hub="h" * 65),
])
def test_a_token_with_junk_or_hostile_fields_is_malformed(tmp_path, text):
    proc = _dry_run(["--token", text], env={"TINC_BOOTSTRAP_LOG": str(tmp_path / "log")})
    assert proc.returncode == 2 and "the token is malformed" in proc.stderr, proc.stderr
    assert "pwned" not in proc.stderr and "\x1b" not in proc.stderr
    _assert_no_token(proc.stdout, proc.stderr)


@pytest.mark.skipif(os.geteuid() != 0, reason="a real (not dry) join needs root")
@pytest.mark.parametrize("source", ["env", "argument"])
def test_unreachable_hub_error_and_log_hold_no_token(tmp_path, source):
    """A real join attempt (key made, enrolment tried, so the padded token goes into the
    Authorization header) against a closed loopback port, with -v: neither stderr nor the
    log file shows the token, while the log does hold the run."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = bootstrap.encode_token(TOKEN._replace(port=port))
    padded = "  " + token + "\n"
    log = tmp_path / "log"
    args, env = [], {"TINC_BOOTSTRAP_LOG": str(log)}
    if source == "env":
        env["TINC_BOOTSTRAP_TOKEN"] = padded
    else:
        args = ["--token", padded]
    proc = run_bootstrap(["-v", "--name", "hobbiton", "--init", "none", "--key-size", "2048",
                          "--timeout", "1", "--tinc-dir", str(tmp_path / "tinc")] + args,
                         env=env)
    assert proc.returncode == bootstrap.EXIT_UNREACHABLE, proc.stderr
    assert "127.0.0.1:{} unreachable".format(port) in proc.stderr
    text = log.read_text()
    assert "enrolling with the hub" in text and "unreachable" in text
    for where in (proc.stdout, proc.stderr, text):
        assert token not in where and TOKEN.secret not in where


def test_redact_masks_token_shapes():
    bootstrap._SECRETS.append("S3cr3tOnlyS3cr3tOnly")
    try:
        assert bootstrap.redact("a tinc1.abcDEF123_-xyz b") == "a tinc1.<token> b"
        assert bootstrap.redact("x S3cr3tOnlyS3cr3tOnly y") == "x <token> y"
        assert bootstrap.redact("tinc1. is the prefix") == "tinc1. is the prefix"
    finally:
        bootstrap._SECRETS.remove("S3cr3tOnlyS3cr3tOnly")


# --------------------------------------------------------------------------- host names

@pytest.mark.parametrize("host", [
    "erebor", "hub.example.com", "a", "x-1.y-2.z", "a" * 63 + ".com", "xn--bcher-kva.example",
    "192.0.2.1", "0.0.0.0", "2001:db8::1", "::1", ".".join(["a" * 63] * 3) + "." + "b" * 61])
def test_valid_hosts(host):
    assert bootstrap.host_problem(host) is None


@pytest.mark.parametrize("host", [
    "", "hub.example.com.", "-hub", "hub-", "a..b", ".a", "a" * 64, "hub_1", "hub 1",
    "hub;reboot", "$(reboot)", "`id`", "hub'x", 'hub"x', "hub\nx", "héhé", "a/b", "a:b",
    "127.1", "1.2.3", "0x7f.1", "0x7f000001", "2130706433", "010.0.0.1", "192.0.2.1.",
    "example.123", "fe80::1%eth0", ".".join(["a" * 63] * 4), "[::1]", "*.example.com"])
def test_invalid_hosts(host):
    assert bootstrap.host_problem(host)
