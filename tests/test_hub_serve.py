"""The real ``tinc-hub serve`` on 127.0.0.1 (random free port, temp state): enrolment with
the node's own client code, the other endpoints, body caps and connection timeouts."""

import concurrent.futures
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest
import requests

from bootstrap import bootstrap
from tinc_hub.enroll import MAX_BODY_BYTES
from tinc_hub.http_timeouts import HEADER_TIMEOUT
from tinc_hub.tls import pin_of_cert_file
from hub_fixtures import HubEnv, init_hub, rsa_public_pem, wait_until
from support import BOOTSTRAP_PY

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Server(NamedTuple):
    env: HubEnv
    port: int
    url: str
    cert: str
    log: Path
    proc: subprocess.Popen


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = init_hub(root, api_port=port)
    log = root / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tinc_hub.cli", "--state-dir", str(env.state.root),
                                 "serve", "--listen", HOST], stdout=out, stderr=subprocess.STDOUT)
    srv = Server(env, port, f"https://{HOST}:{port}", str(env.state.cert_file), log, proc)
    try:
        def up() -> bool:
            try:
                return requests.get(srv.url + "/healthz", verify=srv.cert, timeout=2).status_code == 200
            except requests.RequestException:
                return False
        assert wait_until(up, 20, 0.1), log.read_text()
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def tls_socket(srv: Server) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=srv.cert)
    raw = socket.create_connection((HOST, srv.port), timeout=5)
    return context.wrap_socket(raw, server_hostname=HOST)


def test_served_pin_is_the_printed_pin(server: Server) -> None:
    with tls_socket(server) as sock:
        der = sock.getpeercert(binary_form=True)
    assert bootstrap.spki_pin_from_cert_der(der) == pin_of_cert_file(Path(server.cert))


def test_enrol_with_the_node_client_then_replay(server: Server) -> None:
    issued = server.env.token()
    token = bootstrap.decode_token(issued.token)
    assert token.port == server.port
    answer = bootstrap.enroll(issued.token, token, HOST, server.port, "real_node", rsa_public_pem(1), timeout=20)
    address, prefix, hub, host_file = bootstrap.validate_answer(answer, "real_node")
    assert (prefix, hub) == (24, "hub1")
    assert host_file == server.env.config.hub_host_file.read_text()
    assert (server.env.config.hosts_dir / "real_node").read_text().startswith(f"Subnet = {address}/32\n")
    # The same request again through requests (verifying against the cert file), with the
    # credential the first answer issued: the same answer, without a new credential.
    credential = answer.pop("credential")
    again = requests.post(server.url + "/v1/enroll", verify=server.cert, timeout=20,
                          headers={"Authorization": "Bearer " + issued.token},
                          json={"name": "real_node", "public_key": rsa_public_pem(1),
                                "credential": credential})
    assert again.status_code == 200 and again.json() == answer
    # A wrong pin is refused by the node before it sends the token.
    with pytest.raises(bootstrap.BootstrapError):
        bootstrap.enroll(issued.token, token._replace(pin="sha256//" + "A" * 43 + "="), HOST,
                         server.port, "real_node", rsa_public_pem(1), timeout=5)


def test_refusals_over_http(server: Server) -> None:
    url = server.url + "/v1/enroll"
    r = requests.post(url, verify=server.cert, timeout=10, json={"name": "x", "public_key": "y"})
    assert r.status_code == 401 and set(r.json()) == {"error"}
    token = server.env.token().token
    r = requests.post(url, verify=server.cert, timeout=10, data=b"not json",
                      headers={"Authorization": "Bearer " + token})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = requests.get(url, verify=server.cert, timeout=10)
    assert r.status_code == 405


def test_oversized_bodies_get_413(server: Server) -> None:
    token = server.env.token().token
    headers = {"Authorization": "Bearer " + token}
    big = b"{" + b" " * (MAX_BODY_BYTES + 10) + b"}"
    r = requests.post(server.url + "/v1/enroll", verify=server.cert, timeout=10, data=big, headers=headers)
    assert r.status_code == 413 and "larger" in r.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count
        for _ in range(5):
            yield b" " * 4096

    r = requests.post(server.url + "/v1/enroll", verify=server.cert, timeout=10, data=chunks(),
                      headers=headers)
    assert r.status_code == 413


def test_other_endpoints(server: Server) -> None:
    r = requests.get(server.url + "/healthz", verify=server.cert, timeout=10)
    assert r.json()["status"] == "ok" and r.headers["content-type"].startswith("application/json")
    r = requests.get(server.url + "/bootstrap.py", verify=server.cert, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/x-python")
    assert r.content == Path(BOOTSTRAP_PY).read_bytes() and r.content.startswith(b"#!/usr/bin/env python3")
    doc = requests.get(server.url + "/openapi.json", verify=server.cert, timeout=10).json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {"/bootstrap.py", "/v1/enroll", "/v1/sync", "/v1/rotate-key",
                                 "/healthz", "/openapi.json"}
    schemas = doc["components"]["schemas"]
    assert {"EnrollRequest", "EnrollResponse", "Error"} <= set(schemas)
    assert set(schemas["EnrollResponse"]["required"]) == {"net", "name", "address", "prefix", "hub", "hubs"}
    assert {"400", "401", "403", "409", "413"} <= set(doc["paths"]["/v1/enroll"]["post"]["responses"])


def test_concurrent_enrolments(server: Server) -> None:
    count = 60
    issued = server.env.token(uses=count)
    keys = [rsa_public_pem(200 + i) for i in range(count)]

    def one(i: int) -> requests.Response:
        return requests.post(server.url + "/v1/enroll", verify=server.cert, timeout=60,
                             headers={"Authorization": "Bearer " + issued.token},
                             json={"name": f"conc{i}", "public_key": keys[i]})

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(one, range(count)))
    assert [a.status_code for a in answers] == [200] * count
    addresses = [a.json()["address"] for a in answers]
    assert len(set(addresses)) == count


def test_stalled_connections_are_closed(server: Server) -> None:
    """Half a request line, no TLS handshake at all, and a body that never completes: each
    is closed (or answered 408) within the header/body timeout while the server keeps serving."""
    results = {}

    def half_request_line() -> None:
        with tls_socket(server) as sock:
            sock.settimeout(HEADER_TIMEOUT + 10)
            started = time.monotonic()
            sock.sendall(b"GET /heal")
            try:
                data = sock.recv(100)
            except (ConnectionError, ssl.SSLError):
                data = b""
            results["half"] = (data, time.monotonic() - started)

    def no_handshake() -> None:
        with socket.create_connection((HOST, server.port), timeout=HEADER_TIMEOUT + 10) as sock:
            started = time.monotonic()
            try:
                data = sock.recv(100)
            except ConnectionError:
                data = b""
            results["raw"] = (data, time.monotonic() - started)

    def slow_body() -> None:
        with tls_socket(server) as sock:
            sock.settimeout(HEADER_TIMEOUT + 10)
            started = time.monotonic()
            sock.sendall(b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"name\": ")
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = sock.recv(1000)
                    if not chunk:
                        break
                    data += chunk
            except (ConnectionError, ssl.SSLError):
                pass
            results["body"] = (data, time.monotonic() - started)

    threads = [threading.Thread(target=f) for f in (half_request_line, no_handshake, slow_body)]
    for t in threads:
        t.start()
    time.sleep(1)
    assert requests.get(server.url + "/healthz", verify=server.cert, timeout=5).status_code == 200
    for t in threads:
        t.join(timeout=HEADER_TIMEOUT + 15)
    assert not any(t.is_alive() for t in threads)
    data, elapsed = results["half"]
    assert data == b"" and HEADER_TIMEOUT - 1 <= elapsed <= HEADER_TIMEOUT + 5
    data, elapsed = results["raw"]
    assert data == b"" and elapsed <= HEADER_TIMEOUT + 5
    data, elapsed = results["body"]
    assert data.startswith(b"HTTP/1.1 408") and elapsed <= HEADER_TIMEOUT + 5


def test_log_has_one_line_per_request_and_no_token(server: Server) -> None:
    issued = server.env.token()
    requests.post(server.url + "/v1/enroll", verify=server.cert, timeout=10,
                  headers={"Authorization": "Bearer " + issued.token},
                  json={"name": "logged", "public_key": rsa_public_pem(7)})
    secret = bootstrap.decode_token(issued.token).secret

    def logged() -> bool:
        return "POST /v1/enroll 200" in server.log.read_text()
    assert wait_until(logged, 5)
    text = server.log.read_text()
    assert issued.token not in text and secret not in text and "tinc1." not in text
    assert any("GET /healthz 200" in line for line in text.splitlines())


def test_a_body_dripped_after_the_answer_does_not_hold_the_connection(server: Server) -> None:
    """A request whose handler reads no body (GET, 404, 405) declares a long body and drips a
    byte every second, below the keep-alive timeout: the connection is closed within the
    header timeout, not held for as long as the body lasts."""
    for head in (b"GET /healthz HTTP/1.1", b"GET /nowhere HTTP/1.1", b"PUT /v1/enroll HTTP/1.1"):
        with tls_socket(server) as sock:
            sock.sendall(head + b"\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
            sock.settimeout(5)
            assert sock.recv(100).startswith(b"HTTP/1.1 "), head
            sock.settimeout(1)
            started, closed = time.monotonic(), False
            while not closed and time.monotonic() - started < HEADER_TIMEOUT + 10:
                try:
                    sock.sendall(b"x")
                    closed = sock.recv(100) == b""
                except socket.timeout:
                    pass
                except (ConnectionError, ssl.SSLError):
                    closed = True
            elapsed = time.monotonic() - started
            assert closed and elapsed <= HEADER_TIMEOUT + 5, (head, elapsed)
