"""Shared pieces of the HTTP fuzz suite: a raw client, hostile values and bodies, and the answer check."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import psutil
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from firetitan.server.process import WorkerProcess

KEY = "ft-fuzz-key-0123456789"
# RSS a worker may gain over a whole fuzz run (hundreds of malformed requests): a leak per request, or
# a model loaded per request, shows up well above it.
RSS_GROWTH_BOUND_BYTES = 150 * 1024 * 1024
EXAMPLES = int(os.environ.get("FIRETITAN_FUZZ_EXAMPLES", "150"))
# Hypothesis settings of every fuzz test: reproducible (derandomized, no example database), no deadline
# (a worker answers at its own pace); one worker (a module-scoped fixture) serves every example on purpose.
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@dataclass
class Target:
    url: str
    process: WorkerProcess
    key: str

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss


@dataclass(frozen=True)
class Answer:
    status: int
    raw: bytes

    def json(self) -> Any:
        return json.loads(self.raw)


def call(target: Target, method: str, path: str, data: bytes | None = None,
         content_type: str | None = "application/json", key: bool = True, timeout: float = 60.0) -> Answer:
    headers = {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if key:
        headers["Authorization"] = f"Bearer {target.key}"
    req = urllib.request.Request(target.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Answer(resp.status, resp.read())
    except urllib.error.HTTPError as err:
        return Answer(err.code, err.read())


def assert_answer_names_the_problem(answer: Answer, request: str) -> None:
    """No 5xx; every 4xx is a JSON error with a message (and the typed error's name)."""
    assert answer.status < 500, f"{request} -> {answer.status} {answer.raw[:300]!r}"
    if answer.status >= 400:
        try:
            err = answer.json()["error"]
        except (ValueError, KeyError, TypeError):
            raise AssertionError(f"{request} -> {answer.status} without a JSON error: {answer.raw[:300]!r}") from None
        assert isinstance(err, dict) and err.get("message"), f"{request} -> {answer.raw[:300]!r}"
        assert KEY not in answer.raw.decode("utf-8", "replace")


def assert_alive(target: Target) -> None:
    answer = call(target, "GET", "/health", key=False, timeout=30)
    assert answer.status == 200 and answer.json() == {"status": "ok"}, answer


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# Values no field of any firetitan API accepts: each is refused by the shared body checks or by the
# field's type, whatever the field. (Loose-typing cases such as `true` for an int are separate
# regression cases: whether they are refused is each API's schema.)
HOSTILE_RAW = [
    "18446744073709551616", "-1180591620717411303424", "1e400", "NaN", "-Infinity",
    '"\\ud800"', '"ok\\udfff"', deep(200), deep(3000),
]
# Whole bodies that are malformed whatever the route: (raw bytes, content type).
HOSTILE_BODIES: list[tuple[bytes, str | None]] = [
    (b"", "application/json"), (b"{", "application/json"), (b"[]", "application/json"),
    (b"null", "application/json"), (b'"a string"', "application/json"), (b"\xff\xfe{}", "application/json"),
    (b'{"a": 1}', "text/plain"), (b"a=1&b=2", "application/x-www-form-urlencoded"),
    (b'{"a": "\\ud800"}', "application/json"), (('{"a": ' + deep(5000) + "}").encode(), "application/json"),
    (b'{"a": 1, "a": 18446744073709551616}', "application/json"),
    (b"\x00\x01\x02", None), (b'{"a": 1}\n{"b": 2}', "application/json"),
]


def body_with(template: dict[str, Any], dotted: str, raw_value: str) -> bytes:
    """`template` as JSON with the field at `dotted` (a.b.c) replaced by the JSON text `raw_value`."""
    marker = "\u0000MARK\u0000"
    doc = json.loads(json.dumps(template))
    node = doc
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {}) if isinstance(node, dict) else node
    node[parts[-1]] = marker
    return json.dumps(doc).replace(json.dumps(marker), raw_value).encode()


def fields_of(template: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in template.items():
        path = f"{prefix}{key}"
        out.append(path)
        if isinstance(value, dict):
            out += fields_of(value, path + ".")
    return out


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                            max_size=4), max_leaves=12)
