"""bootstrap.py's pure parts and its apply layer, without a hub."""

import base64
import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading

import pytest

from support import BOOTSTRAP_PY, FIXTURE_SYSTEMS, bootstrap, make_self_signed_cert

TOKEN = bootstrap.Token("192.0.2.1", 8655, "sha256//" + "A" * 43 + "=", "middle-earth",
                        "erebor", "s" * 43)


def test_token_round_trip():
    text = bootstrap.encode_token(TOKEN)
    assert text.startswith("tinc1.") and "=" not in text
    assert bootstrap.decode_token(text) == TOKEN
    assert bootstrap.decode_token("  " + text + "\n") == TOKEN


@pytest.mark.parametrize("text", [
    "", "tinc1.", "tinc2.abc", "tinc1.!!!", "tinc1." + base64.urlsafe_b64encode(b"[1]").decode(),
    "tinc1." + base64.urlsafe_b64encode(json.dumps(
        {"a": "h", "p": 70000, "k": "sha256//x", "n": "n", "h": "hub", "s": "s" * 43}
    ).encode()).decode(),
    "tinc1." + base64.urlsafe_b64encode(json.dumps(
        {"a": "h", "p": 1, "k": "sha256//x", "n": "../etc", "h": "hub", "s": "s" * 43}
    ).encode()).decode(),
    "tinc1." + base64.urlsafe_b64encode(json.dumps(
        {"a": "h", "p": 1, "k": "sha256//x", "n": "n", "h": "bad-name", "s": "s" * 43}
    ).encode()).decode(),
])
def test_malformed_tokens_are_usage_errors(text):
    with pytest.raises(bootstrap.BootstrapError) as err:
        bootstrap.decode_token(text)
    assert err.value.code == bootstrap.EXIT_USAGE


def test_spki_pin_matches_cryptography(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    cert_pem, _ = make_self_signed_cert(tmp_path)
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    expected = "sha256//" + base64.b64encode(hashlib.sha256(spki).digest()).decode()
    der = cert.public_bytes(serialization.Encoding.DER)
    assert bootstrap.spki_pin_from_cert_der(der) == expected


@pytest.mark.parametrize("hostname,name", [
    ("hobbiton", "hobbiton"), ("web-01.example.com", "web_01_example_com"),
    ("Node.A-b", "Node_A_b")])
def test_node_name_from_hostname(hostname, name):
    assert bootstrap.node_name_from_hostname(hostname) == name
    assert bootstrap.valid_node_name(name)


@pytest.mark.parametrize("name", ["", "a-b", "a.b", "a/b", "a\n", "é", "x" * 65])
def test_invalid_node_names(name):
    assert not bootstrap.valid_node_name(name)


def test_interface_name_is_cut_to_15():
    assert bootstrap.interface_name("a-very-long-network-name") == "a-very-long-net"


def test_split_hub():
    assert bootstrap.split_hub("erebor", 8655) == ("erebor", 8655)
    assert bootstrap.split_hub("192.0.2.1:9000", 8655) == ("192.0.2.1", 9000)
    assert bootstrap.split_hub("[2001:db8::1]:9", 1) == ("2001:db8::1", 9)
    with pytest.raises(bootstrap.BootstrapError):
        bootstrap.split_hub("a:b:c", 1)


def test_write_atomic_keeps_identical_file_untouched(tmp_path):
    path = str(tmp_path / "d" / "f")
    assert bootstrap.write_atomic(path, "one\n", 0o600) is True
    os.utime(path, (1000, 1000))
    assert bootstrap.write_atomic(path, "one\n", 0o600) is False
    assert os.stat(path).st_mtime == 1000
    assert bootstrap.write_atomic(path, "two\n", 0o600) is True
    assert open(path).read() == "two\n" and (os.stat(path).st_mode & 0o777) == 0o600
    assert [p for p in os.listdir(tmp_path / "d")] == ["f"]  # no temp files left


def test_run_error_names_command_code_and_stderr():
    with pytest.raises(bootstrap.CommandError) as err:
        bootstrap.run(["sh", "-c", "echo out; echo broken thing >&2; exit 3"])
    message = str(err.value)
    assert "exit code 3" in message and "broken thing" in message and "sh -c" in message
    assert err.value.code == bootstrap.EXIT_COMMAND
    assert bootstrap.run(["sh", "-c", "read x; echo $x"], input="hi\n").stdout == "hi\n"
    # stdin is never the terminal or our own stdin
    assert bootstrap.run(["sh", "-c", "cat"]).stdout == ""


def test_node_files_plan():
    pem = "-----BEGIN RSA PUBLIC KEY-----\nMIIB\n-----END RSA PUBLIC KEY-----"
    hub_file = "Address = 192.0.2.1\nSubnet = 10.0.0.1/32\n\n" + pem + "\n"
    plan = bootstrap.plan_node_files("/etc/tinc", "middle-earth", "hobbiton", pem,
                                     "10.0.0.3", 24, "erebor", hub_file, {"k": 1})
    files = {spec.path: spec for spec in plan.files}
    own = files["/etc/tinc/middle-earth/hosts/hobbiton"].content
    assert own == "Subnet = 10.0.0.3/32\n\n" + pem + "\n"
    assert files["/etc/tinc/middle-earth/hosts/erebor"].content == hub_file
    up = files["/etc/tinc/middle-earth/tinc-up"]
    assert up.mode == 0o755 and 'ip addr replace 10.0.0.3/24 dev "$INTERFACE"' in up.content
    assert "ifconfig" not in up.content
    assert files["/etc/tinc/middle-earth/tinc-down"].mode == 0o755
    conf = bootstrap.render_tinc_conf("hobbiton", "middle-earth", ["erebor"])
    assert conf.splitlines()[1:] == ["Name = hobbiton", "AddressFamily = ipv4",
                                     "Interface = middle-earth", "ConnectTo = erebor"]


def test_hub_vpn_address_from_host_file():
    assert bootstrap.hub_vpn_address("Subnet = 10.0.0.0/24\nSubnet = 10.0.0.1/32\n",
                                     "10.0.0.9", 24) == "10.0.0.1"
    assert bootstrap.hub_vpn_address("", "10.9.0.9", 16) == "10.9.0.1"


@pytest.mark.parametrize("answer", [
    {}, {"name": "other", "address": "10.0.0.2", "prefix": 24,
         "hub": {"name": "erebor", "host_file": "-----BEGIN RSA PUBLIC KEY-----\nx\n"
                 "-----END RSA PUBLIC KEY-----"}},
    {"name": "n", "address": "10.0.0.2/24", "prefix": 24, "hub": {"name": "erebor",
                                                                    "host_file": "x"}},
    {"name": "n", "address": "10.0.0.2", "prefix": "24", "hub": {"name": "erebor",
                                                                   "host_file": "x"}},
    {"name": "n", "address": "10.0.0.2", "prefix": 24, "hub": {"name": "../x",
                                                                 "host_file": "x"}},
])
def test_malformed_answers_are_refused(answer):
    with pytest.raises(bootstrap.BootstrapError) as err:
        bootstrap.validate_answer(answer, "n")
    assert err.value.code == bootstrap.EXIT_REFUSED


def run_bootstrap(args, env=None, timeout=60):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TINC_BOOTSTRAP_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, BOOTSTRAP_PY] + args, env=full_env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)


def test_dry_run_changes_nothing(tmp_path):
    tinc_dir = tmp_path / "tinc"
    token = bootstrap.encode_token(TOKEN)
    proc = run_bootstrap(["--dry-run", "--name", "hobbiton", "--tinc-dir", str(tinc_dir),
                          "--init", "rc.local"], env={"TINC_BOOTSTRAP_TOKEN": token})
    assert proc.returncode == 0, proc.stderr
    assert "Name = hobbiton" in proc.stdout and "ConnectTo = erebor" in proc.stdout
    assert "-K4096" in proc.stdout and "tincd -n middle-earth" in proc.stdout
    assert "/v1/enroll" in proc.stdout
    assert token not in proc.stdout + proc.stderr and TOKEN.secret not in proc.stdout
    assert not tinc_dir.exists()


@pytest.mark.parametrize("args,env,code,needle", [
    ([], {}, 2, "no token given"),
    (["--token", "garbage"], {}, 2, "token is malformed"),
    (["--init", "upstart"], {"TINC_BOOTSTRAP_TOKEN": "x"}, 2, "invalid choice"),
    (["--name", "bad-name", "--dry-run"], {}, 2, "invalid node name"),
])
def test_usage_errors_are_one_line_with_hint(args, env, code, needle):
    env = dict(env)
    env.setdefault("TINC_BOOTSTRAP_TOKEN", bootstrap.encode_token(TOKEN))
    if args and args[0] == "--token" or not args:
        env.pop("TINC_BOOTSTRAP_TOKEN")
    proc = run_bootstrap(args, env=env)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert needle in lines[-1] and "hint" in lines[-1]
    assert "Traceback" not in proc.stderr


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_hub_retries_then_exits_5(tmp_path):
    port = free_port()  # nothing listens there
    token = bootstrap.encode_token(TOKEN._replace(host="127.0.0.1", port=port))
    sleeps = []
    with pytest.raises(bootstrap.BootstrapError) as err:
        bootstrap.enroll(token, bootstrap.decode_token(token), "127.0.0.1", port, "n",
                         "pem", timeout=3.0, sleep=sleeps.append)
    assert err.value.code == bootstrap.EXIT_UNREACHABLE
    assert len(sleeps) >= 2 and sleeps[1] > sleeps[0]  # backoff grows


def test_pin_mismatch_refuses_before_sending_the_token(tmp_path):
    """A real TLS server on loopback whose key is not the pinned one never sees the token."""
    cert, key = make_self_signed_cert(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    received = []

    def serve():
        conn, _ = listener.accept()
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(3)
                try:
                    received.append(tls.recv(65536))
                except (OSError, ssl.SSLError):
                    received.append(b"")
        except (OSError, ssl.SSLError):
            received.append(b"")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    token = bootstrap.encode_token(TOKEN._replace(host="127.0.0.1", port=port))
    try:
        with pytest.raises(bootstrap.BootstrapError) as err:
            bootstrap.enroll(token, bootstrap.decode_token(token), "127.0.0.1", port, "n",
                             "pem", timeout=5.0)
        thread.join(5)
    finally:
        listener.close()
    assert err.value.code == bootstrap.EXIT_REFUSED
    assert "does not match the pin" in str(err.value)
    assert received and TOKEN.secret.encode() not in received[0]


def test_bootstrap_is_python36_compatible():
    vermin = os.path.join(os.path.dirname(sys.executable), "vermin")
    proc = subprocess.run([vermin, "-t=3.6-", "--no-tips", "--violations", BOOTSTRAP_PY],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True)
    assert proc.returncode == 0, proc.stdout


def test_bootstrap_imports_only_the_standard_library():
    # -E -s and cwd: isolated like -I, but `import bootstrap` finds the script in cwd
    code = ("import sys; import bootstrap; "
            "print(sorted(m for m in ('requests', 'cryptography', 'distro', 'urllib3') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-E", "-s", "-c", code], stdout=subprocess.PIPE,
                          cwd=os.path.dirname(BOOTSTRAP_PY), universal_newlines=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_system_detection_without_distro_importable():
    code = ("import sys; sys.modules['distro'] = None; "
            "import bootstrap; print(bootstrap.detect_system(%r).os.id)"
            % os.path.join(FIXTURE_SYSTEMS, "centos-6"))
    proc = subprocess.run([sys.executable, "-E", "-s", "-c", code], stdout=subprocess.PIPE,
                          cwd=os.path.dirname(BOOTSTRAP_PY), universal_newlines=True, check=True)
    assert proc.stdout.strip() == "centos"
