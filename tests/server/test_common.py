"""Server plumbing on a real loopback server: errors become JSON 4xx, auth is enforced, workers survive."""

from __future__ import annotations

import pydantic
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from firetitan.client.http import HttpClient
from firetitan.errors import AuthenticationError, InvalidRequestError, NotFoundError
from firetitan.server.common import json_response, make_app, parse_body


class Body(pydantic.BaseModel):
    tokens: list[int]
    max_tokens: int = pydantic.Field(ge=0)


async def echo(request: web.Request) -> web.Response:
    body = await parse_body(request, Body)
    return json_response(body)


async def missing(request: web.Request) -> web.Response:
    raise NotFoundError("no such thing", field="id")


async def boom(request: web.Request) -> web.Response:
    raise RuntimeError("bug")


async def health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@pytest.fixture
async def server():
    app = make_app(api_key="secret")
    app.router.add_post("/echo", echo)
    app.router.add_get("/missing", missing)
    app.router.add_get("/boom", boom)
    app.router.add_get("/health", health)
    srv = TestServer(app, host="127.0.0.1")
    async with TestClient(srv) as client:
        yield client


async def test_bad_field_is_400_naming_it(server: TestClient) -> None:
    http = HttpClient(str(server.make_url("")), api_key="secret")
    with pytest.raises(InvalidRequestError) as info:
        await http.request_json("POST", "/echo", {"tokens": ["a"], "max_tokens": 1})
    assert info.value.field == "tokens.0"
    with pytest.raises(InvalidRequestError) as info:
        await http.request_json("POST", "/echo", {"tokens": [1], "max_tokens": -1})
    assert info.value.field == "max_tokens"
    # the server still serves after bad input and after a handler bug
    r = await server.get("/boom", headers={"x-api-key": "secret"})
    assert r.status == 500
    assert await http.request_json("POST", "/echo", {"tokens": [1, 2], "max_tokens": 3}) == {
        "tokens": [1, 2], "max_tokens": 3}
    await http.close()


async def test_non_json_body_is_400(server: TestClient) -> None:
    r = await server.post("/echo", data=b"{nope", headers={"x-api-key": "secret"})
    assert r.status == 400
    assert (await r.json())["error"]["field"] == "body"


async def test_auth_required_except_health(server: TestClient) -> None:
    http = HttpClient(str(server.make_url("")), api_key="wrong")
    with pytest.raises(AuthenticationError):
        await http.request_json("POST", "/echo", {"tokens": [], "max_tokens": 0})
    assert (await server.get("/health")).status == 200
    await http.close()


async def test_typed_not_found(server: TestClient) -> None:
    http = HttpClient(str(server.make_url("")), api_key="secret")
    with pytest.raises(NotFoundError) as info:
        await http.request_json("GET", "/missing")
    assert info.value.field == "id"
    await http.close()
