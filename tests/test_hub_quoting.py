"""Everything the hub prints for another language is checked and quoted for it: `init
--address` (RFC 1123 name or IPv4), the one-liners (shell), the cloud-init user data (YAML)
and the Vagrant hand-over (Ruby -> shell). Property tests parse the output back."""

import base64
import datetime
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from support import REPO_ROOT, vagrant_validate, bootstrap
from tinc_hub.cli import main
from tinc_hub.cloud_init import NODE_SCRIPT_PATH, FIRST_BOOT_TIMEOUT, render_user_data
from tinc_hub.errors import HubError
from tinc_hub.hub_init import InitRequest, validate_request
from tinc_hub.state import HubConfig
from tinc_hub.tokens import join_command, sudo_join_command

PIN = "sha256//" + base64.b64encode(bytes(range(32))).decode()

# --------------------------------------------------------------------------- generators

_label = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", fullmatch=True)
host_names = st.lists(_label, min_size=1, max_size=4).map(".".join).filter(
    lambda h: bootstrap.host_problem(h) is None)
addresses = st.one_of(host_names, st.ip_addresses(v=4).map(str))
ports = st.integers(1, 65535)
pins = st.binary(min_size=32, max_size=32).map(
    lambda b: "sha256//" + base64.b64encode(b).decode())
nets = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", fullmatch=True)
names = st.from_regex(r"[A-Za-z0-9_]{1,64}", fullmatch=True)
secrets_ = st.binary(min_size=12, max_size=64).map(
    lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode())


@st.composite
def hubs(draw):
    """(config, pin, token) for any valid hub settings."""
    address, port, pin = draw(addresses), draw(ports), draw(pins)
    net, name = draw(nets), draw(names)
    config = HubConfig(net=net, name=name, address=address, port=655, api_port=port,
                       vpn_subnet="10.0.0.0/24", hub_address="10.0.0.1", tinc_dir="/etc/tinc",
                       init="none")
    token = bootstrap.encode_token(bootstrap.Token(address, port, pin, net, name,
                                                   draw(secrets_)))
    return config, pin, token


def config_with(**over):
    base = dict(net="middle-earth", name="erebor", address="192.0.2.1", port=655,
                api_port=8655, vpn_subnet="10.0.0.0/24", hub_address="10.0.0.1",
                tinc_dir="/etc/tinc", init="none")
    base.update(over)
    return HubConfig(**base)


def url_of(config):
    return "https://{}:{}/bootstrap.py".format(config.address, config.api_port)


# --------------------------------------------------------------------------- init --address

def init_argv(root: Path, address: str):
    return ["--state-dir", str(root / "state"), "init", "--no-start", "--net", "qnet",
            "--name", "hub1", "--address=" + address, "--vpn-subnet", "10.66.0.0/24",
            "--key-size", "2048", "--init", "none", "--tinc-dir", str(root / "tinc")]


@pytest.mark.parametrize("address", [
    "hub.example.com.", "-hub", "hub_1", "hub 1", "hub;reboot", "$(reboot)", "`id`", "a'b",
    "a\nb", "héhé.example", "a..b", "127.1", "0x7f.1", "010.0.0.1", "example.123",
    "a" * 64 + ".example", ".".join(["a" * 63] * 4), "*.example.com", "hub/x", ""])
def test_init_refuses_an_address_and_writes_nothing(tmp_path, capsys, address):
    assert main(init_argv(tmp_path, address)) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid --address" in err and "hint:" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("address", ["2001:db8::1", "::1", "fe80::1%eth0"])
def test_init_refuses_ipv6_with_its_reason(tmp_path, capsys, address):
    assert main(init_argv(tmp_path, address)) != 0
    assert "AddressFamily = ipv4" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("address", ["hub", "hub.example.com", "a-1.b--2.example",
                                     "xn--bcher-kva.example", "192.0.2.1", " 192.0.2.7 ",
                                     "a" * 63 + "." + "b" * 63])
def test_init_accepts_names_and_ipv4(address):
    validate_request(InitRequest(net="n", name="hub1", address=address,
                                 vpn_subnet="10.0.0.0/24"))


def test_init_with_a_host_name_writes_it_everywhere(tmp_path, capsys):
    """A hostile-looking but valid name goes into the host file, hub.json and the cert."""
    name = "x-1.b--c.example"
    assert main(init_argv(tmp_path, name)) == 0
    assert "Address = {}\n".format(name) in (tmp_path / "tinc" / "qnet" / "hosts" /
                                             "hub1").read_text()
    assert json.loads((tmp_path / "state" / "hub.json").read_text())["address"] == name
    capsys.readouterr()
    assert main(["--state-dir", str(tmp_path / "state"), "token", "create", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "'https://{}:8655/bootstrap.py'".format(name) in out["command"]


@given(host_names)
def test_generated_host_names_are_accepted_by_init(name):
    validate_request(InitRequest(net="n", name="hub1", address=name, vpn_subnet="10.0.0.0/24"))


# --------------------------------------------------------------------------- one-liners (shell)

def expected_root_words(config, pin, token):
    return ["curl", "-fsS", "--pinnedpubkey", pin, "-k", url_of(config), "|",
            "TINC_BOOTSTRAP_TOKEN=" + token, "python3", "-"]


def expected_sudo_words(config, pin, token):
    return ["tinc_token_file=$(mktemp)", "&&", "printf", "%s\\n", token,
            ">>$tinc_token_file", "&&", "curl", "-fsS", "--pinnedpubkey", pin, "-k",
            url_of(config), "|", "sudo", "python3", "-", "--token-file", "$tinc_token_file;",
            "rm", "-f", "$tinc_token_file"]


@settings(max_examples=300, deadline=None)
@given(hubs())
def test_one_liners_parse_back_to_the_intended_words(hub):
    config, pin, token = hub
    root, sudo = join_command(config, pin, token), sudo_join_command(config, pin, token)
    assert shlex.split(root) == expected_root_words(config, pin, token)
    assert shlex.split(sudo) == expected_sudo_words(config, pin, token)
    for line in (root, sudo):
        assert "\n" not in line and line.isprintable()


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory):
    """curl, sudo and python3 stand-ins that record what a real shell handed them."""
    bin_dir = tmp_path_factory.mktemp("fakebin")
    scripts = {
        "curl": 'printf "%s\\0" "$@" > "$REC/curl.argv"; echo "print(1)"',
        "sudo": 'printf "%s\\0" "$@" > "$REC/sudo.argv"; exec "$@"',
        "python3": ('printf "%s\\0" "$@" > "$REC/python3.argv"\n'
                    'printf "%s" "${TINC_BOOTSTRAP_TOKEN-<unset>}" > "$REC/python3.env"\n'
                    'if [ "$2" = --token-file ]; then cat -- "$3" > "$REC/python3.token"; fi\n'
                    'cat > "$REC/python3.stdin"'),
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(0o755)
    return bin_dir


def run_in_sh(line, fake_bin, rec):
    """line typed into /bin/sh (read from stdin, as a user's shell reads it)."""
    tmp = rec / "tmp"
    tmp.mkdir()
    env = {"PATH": "{}:/usr/bin:/bin".format(fake_bin), "REC": str(rec), "TMPDIR": str(tmp)}
    proc = subprocess.run(["/bin/sh"], input=line + "\n", env=env, universal_newlines=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20)
    assert proc.returncode == 0, proc.stderr
    read = {p.name: p.read_text() for p in rec.iterdir() if p.is_file()}
    return read, list(tmp.iterdir())


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hubs())
def test_one_liners_in_a_real_shell(fake_bin, tmp_path_factory, hub):
    config, pin, token = hub
    curl_argv = ["-fsS", "--pinnedpubkey", pin, "-k", url_of(config)]

    rec = tmp_path_factory.mktemp("root")
    got, left = run_in_sh(join_command(config, pin, token), fake_bin, rec)
    assert got["curl.argv"].split("\0")[:-1] == curl_argv
    assert got["python3.argv"].split("\0")[:-1] == ["-"]
    assert got["python3.env"] == token and got["python3.stdin"] == "print(1)\n"

    rec = tmp_path_factory.mktemp("sudo")
    got, left = run_in_sh(sudo_join_command(config, pin, token), fake_bin, rec)
    assert got["curl.argv"].split("\0")[:-1] == curl_argv
    argv = got["python3.argv"].split("\0")[:-1]
    assert argv[:2] == ["-", "--token-file"] and got["sudo.argv"].split("\0")[:-1] == \
        ["python3"] + argv
    assert got["python3.token"] == token + "\n" and got["python3.env"] == "<unset>"
    assert left == [], "the token file was not removed"


@pytest.mark.parametrize("over,pin", [
    ({"address": "hub;reboot"}, PIN), ({"address": "a\nb"}, PIN), ({"address": "$(id)"}, PIN),
    ({"address": "hub.example."}, PIN), ({"api_port": 0}, PIN), ({"api_port": "8655 x"}, PIN),
    ({"net": "a b"}, PIN), ({"name": "a-b"}, PIN), ({}, "sha256//x'y"), ({}, PIN + "\n")])
def test_unquotable_values_are_refused(over, pin):
    config = config_with(**over)
    token = bootstrap.encode_token(bootstrap.Token("192.0.2.1", 8655, PIN, "n", "h", "s" * 43))
    for render in (join_command, sudo_join_command,
                   lambda c, p, t: render_user_data(c, p, t, "2030-01-01T00:00:00Z")):
        with pytest.raises(HubError):
            render(config, pin, token)


@pytest.mark.parametrize("token", ["tinc1.a'b", "tinc1.a b", "tinc1.a\nb", "x", "tinc1."])
def test_unquotable_tokens_are_refused(token):
    with pytest.raises(HubError):
        join_command(config_with(), PIN, token)
    with pytest.raises(HubError):
        sudo_join_command(config_with(), PIN, token)


@pytest.mark.parametrize("cloud_init", [False, True])
def test_token_create_on_a_hand_edited_hub_json_writes_nothing(tmp_path, capsys, cloud_init):
    assert main(init_argv(tmp_path, "192.0.2.1")) == 0
    hub_json = tmp_path / "state" / "hub.json"
    config = json.loads(hub_json.read_text())
    config["address"] = "192.0.2.1'; reboot; '"
    hub_json.write_text(json.dumps(config))
    before = files_under(tmp_path)
    capsys.readouterr()
    argv = ["--state-dir", str(tmp_path / "state"), "token", "create"]
    assert main(argv + (["--cloud-init"] if cloud_init else [])) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "cannot be printed" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert files_under(tmp_path) == before  # no token row, no journal: nothing written


def files_under(root: Path):
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- cloud-init (YAML)

def expected_comments(config, os_name, expires):
    return ["#cloud-config",
            "# Joins this machine to tinc net {} through hub {} ({}) at first boot.".format(
                config.net, config.name, url_of(config)),
            "# Made by `tinc-hub token create --cloud-init --os {}`; the token expires {}."
            .format(os_name, expires),
            "# It holds a secret token: treat this user data as a secret."]


@settings(max_examples=150, deadline=None)
@given(hubs(), st.sampled_from(["ubuntu", "debian", "centos"]),
       st.datetimes(min_value=datetime.datetime(2000, 1, 1)).map(
           lambda d: d.strftime("%Y-%m-%dT%H:%M:%SZ")))
def test_user_data_round_trips_exactly(hub, os_name, expires):
    config, pin, token = hub
    text = render_user_data(config, pin, token, expires, os_name=os_name)
    data = yaml.safe_load(text)
    assert set(data) == {"bootcmd", "write_files", "runcmd"} | (
        {"packages"} if os_name == "centos" else set())
    assert data["bootcmd"] == [["install", "-d", "-m", "0700", "-o", "root", "-g", "root",
                                "/run/tinc-bootstrap"]]
    assert data["write_files"] == [{"path": "/run/tinc-bootstrap/token", "owner": "root:root",
                                    "permissions": "0600", "content": token}]
    assert data["runcmd"][0] == [
        "curl", "-fsS", "--retry", "60", "--retry-delay", "5", "--retry-connrefused",
        "--connect-timeout", "10", "--pinnedpubkey", pin, "-k", "-o", NODE_SCRIPT_PATH,
        url_of(config)]
    assert data["runcmd"][1] == [
        "sh", "-c", "python3 {} --token-file /run/tinc-bootstrap/token --timeout {}; rc=$?; "
        "rm -f /run/tinc-bootstrap/token; exit $rc".format(NODE_SCRIPT_PATH, FIRST_BOOT_TIMEOUT)]
    assert len(data["runcmd"]) == 2
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert comments == expected_comments(config, os_name, expires)


def test_hostile_but_valid_user_data_passes_cloud_init_schema(tmp_path):
    config = config_with(net="0-._x", name="_", address="a-1.b--c.x" + "y" * 50,
                         api_port=65535)
    pin = "sha256//" + "++++////" * 5 + "+++="
    token = bootstrap.encode_token(bootstrap.Token(config.address, 65535, pin, config.net,
                                                   config.name, "-_" * 30))
    path = tmp_path / "user-data"
    path.write_text(render_user_data(config, pin, token, "2030-01-01T00:00:00Z",
                                     os_name="centos"))
    cloud_init = shutil.which("cloud-init")
    assert cloud_init, "cloud-init is not installed (tests/setup-env installs it)"
    check = subprocess.run([cloud_init, "schema", "--config-file", str(path)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True)
    assert check.returncode == 0, check.stdout
    assert yaml.safe_load(path.read_text())["write_files"][0]["content"] == token


@pytest.mark.parametrize("expires", ["2030-01-01T00:00:00Z\nruncmd: [reboot]", "soon", ""])
def test_user_data_refuses_a_bad_expiry(expires):
    token = bootstrap.encode_token(bootstrap.Token("192.0.2.1", 8655, PIN, "n", "h", "s" * 43))
    with pytest.raises(HubError):
        render_user_data(config_with(), PIN, token, expires)


# --------------------------------------------------------------------------- Vagrant hand-over

@pytest.mark.parametrize("old,new,needle", [
    ('NET         = "middle-earth"', 'NET         = "x$(touch /tmp/pwned-by-vagrant)"',
     "cannot be handed to a shell safely"),
    ('HUB_IP      = "192.0.2.10"', 'HUB_IP      = "192.0.2.10`id`"',
     "cannot be handed to a shell safely"),
    ('{ name: "bree",', '{ name: "bree-2",', "is not a tinc node name"),
])
def test_vagrantfile_refuses_values_its_shell_hand_over_cannot_carry(tmp_path, old, new,
                                                                     needle):
    text = (Path(REPO_ROOT) / "Vagrantfile").read_text()
    assert old in text
    (tmp_path / "Vagrantfile").write_text(text.replace(old, new))
    shutil.copytree(os.path.join(REPO_ROOT, "vagrant"), str(tmp_path / "vagrant"))
    proc = vagrant_validate(tmp_path, tmp_path / "dot")
    assert proc.returncode != 0 and needle in proc.stdout, proc.stdout
    assert not os.path.exists("/tmp/pwned-by-vagrant")


def test_node_sh_never_puts_the_command_in_argv():
    text = (Path(REPO_ROOT) / "vagrant" / "node.sh").read_text()
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any('sh -c "$command"' in line or "eval" in line for line in code)
    assert "printf '%s\\n' \"$command\" | sh" in text
