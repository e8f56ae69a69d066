"""Fuzzing: the real HTTPS API from its own OpenAPI document (schemathesis), and the token,
Authorization, name, body and rate-limit parsers (hypothesis). Properties: no 5xx, no
exception other than the documented refusal, and no change to the registry or hosts/ from
a rejected request."""

import base64
import json
import re
from typing import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bootstrap import bootstrap
from tinc_hub.enroll import EnrollError, parse_bearer, parse_body, validate_name
from tinc_hub.openapi import openapi_schema
from tinc_hub.ratelimit import RateLimit, parse_rate_limit
from hub_fixtures import HubEnv, enrol_answer, init_hub, rsa_public_pem
from labkit.loopback_hub import HubProcess, free_port

NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
SCHEMA = schemathesis.openapi.from_dict(openapi_schema())
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Api:
    def __init__(self, env: HubEnv, server: HubProcess) -> None:
        self.env = env
        self.server = server
        self.url = f"https://127.0.0.1:{server.port}"
        self.token = env.token(uses=1000).token
        assert env.enroll(self.token, "existing", rsa_public_pem(1))[0] == 200


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    env = init_hub(root, api_port=port)
    server = HubProcess(env.state.root, port, env.state.cert_file, root / "serve.log",
                        extra=["--rate-limit", "off"]).start()
    try:
        yield Api(env, server)
    finally:
        server.stop()


@SCHEMA.given(with_token=st.booleans())
@SCHEMA.parametrize()
@FUZZ
def test_api_from_openapi_schema(api: Api, case, with_token: bool) -> None:
    """Every operation, schema-driven: never a 5xx; a refusal changes nothing."""
    headers = {"Authorization": "Bearer " + api.token} if with_token else None
    before = api.env.snapshot()
    response = case.call(base_url=api.url, verify=str(api.server.cert), headers=headers, timeout=30)
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code != 200:
        assert api.env.snapshot() == before
        if case.path == "/v1/enroll" and response.status_code != 405:
            assert set(response.json()) == {"error"}
    assert api.server.healthy()


# ------------------------------------------------------------------------ pure parsers

token_text = st.one_of(
    st.text(max_size=300),
    st.text(max_size=300).map(lambda t: "tinc1." + t),
    st.binary(max_size=600).map(lambda b: "tinc1." + base64.urlsafe_b64encode(b).decode().rstrip("=")),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                 lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                     st.sampled_from("apknhsx"), inner, max_size=7), max_leaves=20)
    .map(lambda v: "tinc1." + base64.urlsafe_b64encode(json.dumps(v).encode()).decode().rstrip("=")),
    st.integers(100, 2000).map(lambda n: "tinc1." + base64.urlsafe_b64encode(b"[" * n).decode()),
)


@settings(max_examples=400, deadline=None)
@given(token_text)
def test_decode_token_refuses_cleanly(text: str) -> None:
    try:
        token = bootstrap.decode_token(text)
    except bootstrap.BootstrapError as exc:
        assert exc.code == bootstrap.EXIT_USAGE
        return
    assert isinstance(token.port, int) and 0 < token.port < 65536 and not isinstance(token.port, bool)
    assert NAME.fullmatch(token.hub) and token.pin.startswith("sha256//")


HOSTS = st.one_of(
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\.[a-z]([a-z0-9-]{0,8}[a-z0-9])?){0,3}",
                  fullmatch=True),
    st.ip_addresses(v=4).map(str))
PINS = st.from_regex(r"sha256//[A-Za-z0-9+/]{43}=", fullmatch=True)
HUB_NAMES = st.from_regex(r"[A-Za-z0-9_]{1,64}", fullmatch=True)
OTHER_HUBS = st.lists(st.builds(bootstrap.HubEndpoint, host=HOSTS, port=st.integers(1, 65535),
                                pin=PINS, name=HUB_NAMES),
                      max_size=bootstrap.MAX_TOKEN_HUBS - 1, unique_by=lambda hub: hub.name)


@settings(max_examples=200, deadline=None)
@given(st.builds(bootstrap.Token, host=HOSTS, port=st.integers(1, 65535), pin=PINS,
                 net=st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True),
                 hub=HUB_NAMES, secret=st.from_regex(r"[A-Za-z0-9_-]{16,64}", fullmatch=True),
                 others=OTHER_HUBS.map(tuple)))
def test_token_round_trip(token: bootstrap.Token) -> None:
    """Every well-formed token, with up to 7 other hubs, reads back as it was written."""
    assume(bootstrap.NET_RE.fullmatch(token.net))
    assume(all(bootstrap.host_problem(hub.host) is None for hub in token.endpoints()))
    assume(token.hub not in [hub.name for hub in token.others])
    assert bootstrap.decode_token(bootstrap.encode_token(token)) == token


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=5000)))
def test_parse_bearer_refuses_with_401(value) -> None:
    try:
        token = parse_bearer(value)
    except EnrollError as exc:
        assert exc.status == 401 and "\n" not in exc.message
        return
    assert token and token == token.strip() and len(token) <= 4096


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=100), st.integers(), st.none(), st.lists(st.text(max_size=3))))
def test_validate_name_accepts_only_tinc_names(value) -> None:
    try:
        name = validate_name(value, "hub1")
    except EnrollError as exc:
        assert exc.status == 400 and "\n" not in exc.message
        return
    assert NAME.fullmatch(name) and name.lower() != "hub1"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_name_from_any_hostname_is_valid_or_empty(hostname: str) -> None:
    name = bootstrap.node_name_from_hostname(hostname)
    assert name == "" or bootstrap.valid_node_name(name)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=2000), st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
                 st.dictionaries(st.text(max_size=10), st.text(max_size=10)).map(
                     lambda d: json.dumps(d).encode())))
def test_parse_body_refuses_with_4xx(body: bytes) -> None:
    try:
        data = parse_body(body)
    except EnrollError as exc:
        assert exc.status in (400, 413)
        return
    assert isinstance(data, dict) and "name" in data and "public_key" in data


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=30), st.from_regex(r"\d{1,6}/\d{0,4}(s|m|min|h)?", fullmatch=True)))
def test_parse_rate_limit_refuses_with_valueerror(text: str) -> None:
    try:
        limit = parse_rate_limit(text)
    except ValueError:
        return
    assert limit is None or (isinstance(limit, RateLimit) and limit.attempts >= 1 and limit.period > 0)


@pytest.fixture(scope="module")
def pure_env(tmp_path_factory) -> HubEnv:
    return init_hub(tmp_path_factory.mktemp("fuzzpure"))


@settings(max_examples=150, deadline=None)
@given(authorization=st.one_of(st.none(), st.text(max_size=200), token_text.map(lambda t: "Bearer " + t)),
       body=st.one_of(st.binary(max_size=500),
                      st.fixed_dictionaries({"name": st.text(max_size=70),
                                             "public_key": st.text(max_size=200)}).map(
                          lambda d: json.dumps(d).encode())))
def test_enroller_rejects_garbage_without_side_effects(pure_env: HubEnv, authorization, body) -> None:
    env = pure_env
    before = env.snapshot()
    status, answer = enrol_answer(env.enroller, authorization, body)
    assert 400 <= status < 500 and set(answer) == {"error"}
    assert env.snapshot() == before

