"""The per-address enrolment rate limit: parsing, token buckets, bounded memory, and the
429 + Retry-After answer of the app (in-process ASGI, no sockets)."""

import json
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest

from tinc_hub.app import create_app
from tinc_hub.ratelimit import RateLimit, RateLimiter, parse_rate_limit, retry_after_header
from tinc_hub.reload import ReloadBatcher
from hub_fixtures import HubEnv, init_hub, rsa_public_pem
from test_hub_app import call


@pytest.mark.parametrize("text,expected", [
    ("600/min", RateLimit(600, 60.0)), ("20/10s", RateLimit(20, 10.0)), ("5/2", RateLimit(5, 2.0)),
    ("3/h", RateLimit(3, 3600.0)), (" 7 / 1.5s ", RateLimit(7, 1.5)), ("1/s", RateLimit(1, 1.0)),
    ("off", None), ("0", None), ("OFF", None),
])
def test_parse_rate_limit(text: str, expected) -> None:
    assert parse_rate_limit(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "5", "5/x", "0/min", "5/0s", "-1/s", "5/min/2"])
def test_parse_rate_limit_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate_limit(text)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_burst_then_refills_per_address() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimit(3, 6.0), clock=clock)  # 3 at once, then one per 2 s
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire("a")
    assert wait == pytest.approx(2.0)
    assert limiter.acquire("b") == 0.0  # another address has its own bucket
    clock.now += 1.0
    assert limiter.acquire("a") == pytest.approx(1.0)  # refused attempts spend nothing
    clock.now += 1.0
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == pytest.approx(2.0)
    clock.now += 3600
    assert [limiter.acquire("a") for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # capped at 3


def test_table_of_addresses_is_bounded() -> None:
    limiter = RateLimiter(RateLimit(1, 60.0), clock=Clock(), max_sources=100)
    for i in range(1000):
        limiter.acquire(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) == 100


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert [retry_after_header(w) for w in (0.01, 1.0, 1.2, 59.5)] == ["1", "1", "2", "60"]


class Client:
    """Requests through the ASGI app in-process (test_hub_app.call)."""

    def __init__(self, env: HubEnv, limiter: RateLimiter) -> None:
        batcher = ReloadBatcher(lambda: True, min_interval=0.0)
        self.asgi = create_app(env.config, env.registry, batcher, rate_limiter=limiter)

    def post(self, token: str, body: Dict[str, Any]) -> Tuple[int, Dict[str, str], Any]:
        status, headers, raw = call(self.asgi, "POST", "/v1/enroll", [json.dumps(body).encode()],
                                    {"Authorization": "Bearer " + token,
                                     "Content-Type": "application/json"})
        return status, headers, json.loads(raw)

    def get(self, path: str) -> Tuple[int, Any]:
        status, _, raw = call(self.asgi, "GET", path, [b""], {})
        return status, json.loads(raw)


def test_app_answers_429_with_retry_after_and_spends_nothing(tmp_path: Path) -> None:
    env = init_hub(tmp_path)
    clock = Clock()
    client = Client(env, RateLimiter(RateLimit(2, 60.0), clock=clock))
    token = env.token(uses=5).token
    body = lambda i: {"name": f"rl{i}", "public_key": rsa_public_pem(i)}  # noqa: E731
    assert client.post(token, body(1))[0] == 200
    assert client.post(token, {"name": "x"})[0] == 400  # a refused attempt counts too
    before = env.snapshot()
    status, headers, answer = client.post(token, body(2))
    assert status == 429
    assert headers["retry-after"] == "30"
    assert "too many enrolment attempts" in answer["error"]
    assert env.snapshot() == before  # nothing allocated, no token use spent
    assert client.get("/healthz")[0] == 200  # only enrolment attempts are limited
    clock.now += 30
    assert client.post(token, body(2))[0] == 200


def test_openapi_documents_429(tmp_path: Path) -> None:
    env = init_hub(tmp_path)
    status, doc = Client(env, RateLimiter(RateLimit(1, 1.0))).get("/openapi.json")
    assert status == 200
    assert "Retry-After" in doc["paths"]["/v1/enroll"]["post"]["responses"]["429"]["headers"]
