"""Fuzz the trainer worker's HTTP API with malformed requests: 4xx naming the problem, alive, bounded RSS."""

from __future__ import annotations

import json

import fuzz_http as fz
import pytest
from fuzz_http import Target, assert_alive, assert_answer_names_the_problem, body_with, call, fields_of
from hypothesis import given
from hypothesis import strategies as st

API = "/api/v1"
DATA = [{"model_input": {"chunks": [{"tokens": [1, 2, 3]}]},
         "loss_fn_inputs": {"target_tokens": {"data": [2, 3, 4], "dtype": "int64", "shape": [3]},
                            "weights": {"data": [1.0, 1.0, 1.0], "dtype": "float32", "shape": [3]}}}]
ROUTES: dict[str, dict] = {
    "create_model": {"base_model": "no-such-model-xyz", "lora_config": {"rank": 4}, "seed": 1},
    "get_info": {"model_id": "nope"},
    "unload_model": {"model_id": "nope"},
    "list_checkpoints": {"model_id": "nope"},
    "forward": {"model_id": "nope", "seq_id": 0, "forward_input": {"data": DATA, "loss_fn": "cross_entropy"}},
    "forward_backward": {"model_id": "nope", "seq_id": 0,
                         "forward_backward_input": {"data": DATA, "loss_fn": "cross_entropy"}},
    "optim_step": {"model_id": "nope", "seq_id": 1, "adam_params": {"learning_rate": 1e-4, "beta1": 0.9}},
    "save_weights": {"model_id": "nope", "path": "s1"},
    "save_weights_for_sampler": {"model_id": "nope", "path": "s1", "client_suffix": "abcd1234"},
    "load_weights": {"model_id": "nope", "path": "s1", "optimizer": False},
    "release_seq": {"model_id": "nope", "seq_id": 0},
    "retrieve_future": {"request_id": "nope", "timeout": 0.1},
}
# Random (possibly valid) values would make create_model load a model per request (issue 14, 19):
# that route gets hostile values only, and its own regression case below.
RANDOM_ROUTES = [r for r in ROUTES if r != "create_model"]

_rss0: dict[str, int] = {}


def test_starts_alive(trainer: Target) -> None:
    assert_alive(trainer)
    _rss0["rss"] = trainer.rss()


@fz.FUZZ
@given(data=st.data())
def test_hostile_field_values_are_400(trainer: Target, data: st.DataObject) -> None:
    route = data.draw(st.sampled_from(sorted(ROUTES)))
    field = data.draw(st.sampled_from(fields_of(ROUTES[route])))
    raw = data.draw(st.sampled_from(fz.HOSTILE_RAW))
    answer = call(trainer, "POST", f"{API}/{route}", body_with(ROUTES[route], field, raw))
    assert_answer_names_the_problem(answer, f"{route} {field}={raw[:40]}")
    assert 400 <= answer.status < 500


@fz.FUZZ
@given(data=st.data())
def test_malformed_bodies_are_4xx(trainer: Target, data: st.DataObject) -> None:
    route = data.draw(st.sampled_from(sorted(ROUTES)))
    raw, ctype = data.draw(st.sampled_from(fz.HOSTILE_BODIES))
    answer = call(trainer, "POST", f"{API}/{route}", raw, content_type=ctype)
    assert_answer_names_the_problem(answer, f"{route} body={raw[:40]!r} type={ctype}")
    assert 400 <= answer.status < 500


@fz.FUZZ
@given(data=st.data())
def test_random_field_values_never_500(trainer: Target, data: st.DataObject) -> None:
    route = data.draw(st.sampled_from(RANDOM_ROUTES))
    field = data.draw(st.sampled_from(fields_of(ROUTES[route])))
    value = data.draw(fz.json_values)
    answer = call(trainer, "POST", f"{API}/{route}", body_with(ROUTES[route], field, json.dumps(value)))
    assert_answer_names_the_problem(answer, f"{route} {field}={value!r:.60}")


def test_still_alive_and_bounded(trainer: Target) -> None:
    """After the fuzz (the regression cases below may load a model, so they run after this)."""
    assert_alive(trainer)
    if "rss" in _rss0:
        assert trainer.rss() - _rss0["rss"] < fz.RSS_GROWTH_BOUND_BYTES


# Issue 14 (16, 19, 21, 22): loose types and unbounded values the trainer's schemas must refuse with a
# 400 naming the field (strict schemas, AdamParams ranges, create_model fields).
def _loose(route: str, body: dict, what: str) -> object:
    return pytest.param(route, body, id=f"{route}-{json.dumps(body)[:50]}")


LOOSE = [
    _loose("optim_step", {"model_id": "nope", "seq_id": None, "adam_params": {"learning_rate": 1e-4}},
           "seq_id null accepted (404 for the model instead of 400)"),
    _loose("optim_step", {"model_id": "nope", "seq_id": True, "adam_params": {"learning_rate": 1e-4}},
           "seq_id true accepted as 1"),
    _loose("optim_step", {"model_id": "nope", "seq_id": 0, "adam_params": {"learning_rate": 1e308}},
           "learning_rate 1e308 accepted (issue 16)"),
    _loose("create_model", {"lora_config": {"rank": 4}}, "missing base_model loads the default model: 200"),
    _loose("create_model", {"base_model": "no-such-model-xyz", "lora_config": {"rank": 10**9}},
           "lora rank 10^9 passes validation (404 for the model instead)"),
    _loose("create_model", {"base_model": "/etc"}, "any local directory is tried as a model (404, not 400)"),
    _loose("save_weights_for_sampler", {"model_id": "nope", "path": "s1", "client_suffix": None},
           "client_suffix null accepted"),
]


@pytest.mark.parametrize("route,body", LOOSE)
def test_loose_types_are_refused(trainer: Target, route: str, body: dict) -> None:
    answer = call(trainer, "POST", f"{API}/{route}", json.dumps(body).encode())
    assert_answer_names_the_problem(answer, f"{route} {body}")
    assert answer.status == 400, f"{route} {body} -> {answer.status} {answer.raw[:200]!r}"
