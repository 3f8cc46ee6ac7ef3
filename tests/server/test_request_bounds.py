"""Hostile requests on a real loopback server: each is a 4xx naming the problem, never a 500."""

from __future__ import annotations

import io
import json

import pydantic
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from firetitan.errors import ConfigError
from firetitan.logging import configure_logging
from firetitan.server.common import (
    MAX_JSON_DEPTH,
    json_response,
    make_app,
    parse_body,
    require_key_off_loopback,
    serve_app,
)

KEY = "ft-secret-key-value"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Body(pydantic.BaseModel):
    prompt: str = ""
    seed: int = 0
    nested: object = None


async def echo(request: web.Request) -> web.Response:
    return json_response(await parse_body(request, Body))


async def named(request: web.Request) -> web.Response:
    return json_response({"account": request.match_info["account"], "id": request.match_info["rid"]})


async def boom(request: web.Request) -> web.Response:
    raise RuntimeError(f"secret detail {KEY}")


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "jobs": ["accounts/local/rlorTrainerJobs/j1"], "step": 7})


@pytest.fixture
async def client():
    app = make_app(api_key=KEY, max_body_bytes=4096)
    app.router.add_post("/echo", echo)
    app.router.add_post("/v1/accounts/{account}/jobs/{rid}", named)
    app.router.add_get("/boom", boom)
    app.router.add_get("/health", health)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        yield c


async def _post(client: TestClient, raw: bytes | str, ctype: str = "application/json") -> tuple[int, dict]:
    r = await client.post("/echo", data=raw, headers={**AUTH, "Content-Type": ctype})
    return r.status, await r.json()


async def test_escaping_account_is_400_before_the_handler(client: TestClient) -> None:
    r = await client.post("/v1/accounts/..%2F..%2Fescaped/jobs/job1", headers=AUTH)
    assert r.status == 400
    err = (await r.json())["error"]
    assert err["field"] == "account" and "'/'" in err["message"]
    r = await client.post("/v1/accounts/local/jobs/..", headers=AUTH)
    assert r.status in (400, 404)  # aiohttp may normalise '..' away before routing; never a 200
    r = await client.post("/v1/accounts/local/jobs/job-1", headers=AUTH)
    assert r.status == 200 and await r.json() == {"account": "local", "id": "job-1"}


async def test_body_over_the_limit_is_413_naming_it(client: TestClient) -> None:
    status, body = await _post(client, json.dumps({"prompt": "x" * 5000}))
    assert status == 413
    assert body["error"]["field"] == "body" and "4096" in body["error"]["message"]


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
async def test_non_json_media_type_is_415(client: TestClient, ctype: str) -> None:
    status, body = await _post(client, '{"prompt": "a"}', ctype)
    assert status == 415 and body["error"]["field"] == "Content-Type"


async def test_json_suffix_types_are_accepted(client: TestClient) -> None:
    status, body = await _post(client, '{"prompt": "a"}', "application/merge-patch+json; charset=utf-8")
    assert status == 200 and body["prompt"] == "a"


async def test_deep_nesting_is_400_not_recursion(client: TestClient) -> None:
    for depth in (MAX_JSON_DEPTH + 2, 5000):
        raw = '{"nested": ' + "[" * depth + "]" * depth + "}"
        r = await client.post("/echo", data=raw, headers={**AUTH, "Content-Type": "application/json"})
        # the 5000-level body is over 4096 bytes: it must be refused as too large or too deep, not 500
        assert r.status in (400, 413), depth
        if r.status == 400:
            assert "deeper" in (await r.json())["error"]["message"]
    ok = '{"nested": ' + "[" * (MAX_JSON_DEPTH - 2) + "]" * (MAX_JSON_DEPTH - 2) + "}"
    assert (await _post(client, ok))[0] == 200


async def test_deep_nesting_beyond_the_parser_is_400() -> None:
    app = make_app(max_body_bytes=1 << 20)
    app.router.add_post("/echo", echo)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        raw = '{"nested": ' + "[" * 100_000 + "]" * 100_000 + "}"
        r = await c.post("/echo", data=raw, headers={"Content-Type": "application/json"})
        assert r.status == 400 and (await r.json())["error"]["field"] == "body"


async def test_lone_surrogate_is_400_naming_the_field(client: TestClient) -> None:
    status, body = await _post(client, '{"prompt": "ab\\ud800c"}')
    assert status == 400 and body["error"]["field"] == "prompt"
    status, body = await _post(client, '{"prompt": "\\ud83d\\ude00"}')  # a proper pair is a character
    assert status == 200 and body["prompt"] == "\U0001F600"


@pytest.mark.parametrize("raw,field", [
    ('{"seed": 18446744073709551616}', "seed"),
    ('{"nested": {"ids": [1, 100000000000000000000]}}', "nested.ids.1"),
    ('{"seed": 1, "nested": Infinity}', "nested"),
    ('{"nested": [NaN]}', "nested.0"),
    ('{"nested": 1e400}', "nested"),
])
async def test_out_of_range_numbers_are_400_naming_the_field(client: TestClient, raw: str, field: str) -> None:
    status, body = await _post(client, raw)
    assert status == 400 and body["error"]["field"] == field


@pytest.mark.parametrize("raw,field", [('{"seed": "x"}', "seed"), ("[1]", "body"), ("\xff", "body"),
                                       ('{"prompt": 1', "body")])
async def test_malformed_bodies_are_400(client: TestClient, raw: str, field: str) -> None:
    data = raw.encode("latin-1")
    status, body = await _post(client, data)
    assert status == 400 and body["error"]["field"] == field


async def test_500_carries_an_error_id_logged_with_the_traceback(client: TestClient) -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    r = await client.get("/boom", headers=AUTH)
    assert r.status == 500
    message = (await r.json())["error"]["message"]
    assert "secret detail" not in message and KEY not in message and "RuntimeError" not in message
    error_id = message.split()[2].rstrip(";")
    line = next(ln for ln in stream.getvalue().splitlines() if error_id in ln)
    assert "RuntimeError" in line and "unhandled_error" in line


async def test_keyless_health_says_alive_and_no_more(client: TestClient) -> None:
    r = await client.get("/health")
    assert r.status == 200 and await r.json() == {"status": "ok"}
    full = await (await client.get("/health", headers=AUTH)).json()
    assert full["step"] == 7 and full["jobs"]
    assert (await client.get("/health", headers={"Authorization": "Bearer wrong"})).status == 200


def test_non_loopback_bind_without_a_key_is_refused() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        require_key_off_loopback(host, None)
    for host in ("0.0.0.0", "", "::", "10.1.2.3", "example.org"):
        with pytest.raises(ConfigError) as info:
            require_key_off_loopback(host, None)
        assert info.value.field == "api_key"
        require_key_off_loopback(host, "a-key")


async def test_serve_app_refuses_before_listening() -> None:
    with pytest.raises(ConfigError, match="reachable from other machines"):
        await serve_app(make_app(None), "0.0.0.0", 0)


def test_body_limit_env_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIRETITAN_MAX_BODY_BYTES", "1234")
    assert make_app()._client_max_size == 1234
    monkeypatch.setenv("FIRETITAN_MAX_BODY_BYTES", "lots")
    with pytest.raises(ConfigError):
        make_app()


async def test_unknown_routes_and_methods_are_json_errors(client: TestClient) -> None:
    r = await client.get("/no/such/route", headers=AUTH)
    assert r.status == 404 and (await r.json())["error"]["type"] == "NotFoundError"
    r = await client.get("/echo", headers=AUTH)
    assert r.status == 405 and "POST" in r.headers["Allow"]
    assert "Method Not Allowed" in (await r.json())["error"]["message"]


@pytest.mark.parametrize("raw,field", [
    ('{"nested": [1.5, 18446744073709551616]}', "nested.1"),
    ('{"nested": [1e308, 1e308, NaN]}', "nested.2"),
    ('{"nested": [[1, 2], [3, -9223372036854775809]]}', "nested.1.1"),
])
async def test_number_lists_are_checked_element_by_element(client: TestClient, raw: str, field: str) -> None:
    status, body = await _post(client, raw)
    assert status == 400 and body["error"]["field"] == field
    status, _ = await _post(client, '{"nested": [1e308, 1e308, -9223372036854775808, 1e300]}')
    assert status == 200
