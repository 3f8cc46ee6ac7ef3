"""Every public callable firetitan shares with the official `fireworks.training.sdk` takes the same
parameters: names, positional order and defaults. firetitan's extras must be keyword-only.

A script written against the official SDK must not hit a `TypeError` (or a silently different
default) when it constructs firetitan's objects directly. Deliberate differences are listed, each
with its reason, in `ALLOWED`; anything else fails here.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest

official = pytest.importorskip("fireworks.training.sdk")

import firetitan  # noqa: E402
from firetitan.client.sampling_client import SamplingClient  # noqa: E402
from firetitan.client.training import TrainingClient  # noqa: E402

# (official class, firetitan class, compare the constructor too)
PAIRS: list[tuple[Any, Any, bool]] = [
    (official.FiretitanServiceClient, firetitan.FiretitanServiceClient, False),  # official ctor is (*args, **kw)
    (official.FiretitanProvisioningConfig, firetitan.FiretitanProvisioningConfig, True),
    (official.FiretitanTrainingClient, TrainingClient, False),  # built by the service client, never by users
    (official.FiretitanSamplingClient, SamplingClient, False),
    (official.DeploymentSampler, firetitan.DeploymentSampler, True),
    (official.SampledCompletion, firetitan.SampledCompletion, True),
    (official.ServerMetrics, firetitan.ServerMetrics, True),
    (official.AdaptiveConcurrencyController, firetitan.AdaptiveConcurrencyController, True),
    (official.FixedConcurrencyController, firetitan.FixedConcurrencyController, True),
]

# (class, method, parameter) -> why firetitan differs on purpose. "*" stands for the whole signature.
ALLOWED: dict[tuple[str, str, str], str] = {
    # Local services need no key and a one-model deployment no model name, so both may be omitted;
    # every official call still binds the same way.
    ("DeploymentSampler", "__init__", "model"): "default 'default': a local deployment serves one model",
    ("DeploymentSampler", "__init__", "api_key"): "default None: loopback services run without a key",
    # A pydantic model validates its fields and is built by keyword (the official docs and scripts
    # do so); positional construction of a 60-field config is not supported.
    ("FiretitanProvisioningConfig", "__init__", "*"): "pydantic model: keyword-only, same names and defaults",
    # firetitan validates and stores these as floats; the official values compare equal.
    ("FiretitanTrainingClient", "forward", "loss_fn"): "default 'cross_entropy': a forward needs no loss choice",
    ("FiretitanTrainingClient", "forward_async", "loss_fn"): "as forward",
    ("FiretitanTrainingClient", "optim_step", "adam_params"): "default None: AdamParams() (lr 1e-4)",
    ("FiretitanTrainingClient", "optim_step_async", "adam_params"): "as optim_step",
    ("FiretitanServiceClient", "list_checkpoints", "job_id"): "default None: this service's trainer job",
    ("FiretitanServiceClient", "create_sampling_client", "model_path"): "official (*args) forwards to Tinker's "
                                                                         "(model_path, base_model, retry_config)",
    ("FiretitanServiceClient", "create_sampling_client", "base_model"): "as model_path",
    ("FiretitanServiceClient", "create_sampling_client", "retry_config"): "as model_path",
    ("FiretitanSamplingClient", "compute_logprobs", "prompt_logprobs_last_n"): "Tinker's signature",
    ("FiretitanSamplingClient", "compute_logprobs_async", "prompt_logprobs_last_n"): "Tinker's signature",
    # Tinker's own SamplingClient defaults these; firetitan follows Tinker here.
    ("FiretitanSamplingClient", "sample", "num_samples"): "Tinker default 1",
    ("FiretitanSamplingClient", "sample", "sampling_params"): "Tinker default SamplingParams()",
    ("FiretitanSamplingClient", "sample_async", "num_samples"): "Tinker default 1",
    ("FiretitanSamplingClient", "sample_async", "sampling_params"): "Tinker default SamplingParams()",
}

# Shared names that must exist, so the comparison can never pass by finding nothing in common.
REQUIRED = {
    "DeploymentSampler": {"__init__", "sample_with_tokens", "sample_with_prompt_tokens",
                          "sample_with_prompt_tokens_result", "drain_metrics", "close"},
    "FiretitanTrainingClient": {"forward", "forward_backward", "forward_backward_custom", "optim_step",
                                "save_weights_for_sampler", "save_state", "load_state_with_optimizer", "get_info"},
    "FiretitanServiceClient": {"create_training_client", "create_deployment_sampler", "create_sampling_client",
                               "create_reference_client", "hotload_sampler_snapshot", "close"},
    "FiretitanSamplingClient": {"sample", "compute_logprobs", "get_tokenizer"},
}

_VAR = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _positional(sig: inspect.Signature) -> list[inspect.Parameter]:
    return [p for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"]


def _keyword_only(sig: inspect.Signature) -> dict[str, inspect.Parameter]:
    return {p.name: p for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY}


def _same_default(a: Any, b: Any) -> bool:
    return a is b or (a == b and type(a) in (int, float) and type(b) in (int, float)) or (
        a == b and type(a) is type(b))


def _dataclass_ctor(cls: Any) -> inspect.Signature:
    return inspect.signature(cls) if not dataclasses.is_dataclass(cls) else inspect.signature(cls.__init__)


def _shared(off_cls: Any, ft_cls: Any, ctor: bool) -> list[tuple[str, inspect.Signature, inspect.Signature]]:
    out = []
    if ctor:
        out.append(("__init__", _dataclass_ctor(off_cls), _dataclass_ctor(ft_cls)))
    for name, fn in inspect.getmembers(off_cls, inspect.isfunction):
        if name.startswith("_"):
            continue
        mine = getattr(ft_cls, name, None)
        if callable(mine):
            out.append((name, inspect.signature(fn), inspect.signature(mine)))
    return out


def _differences(cls_name: str, method: str, off: inspect.Signature, mine: inspect.Signature) -> list[str]:
    if (cls_name, method, "*") in ALLOWED:
        return []
    problems = []
    off_pos, my_pos = _positional(off), _positional(mine)
    for i, p in enumerate(off_pos):
        if i >= len(my_pos):
            if not any(q.kind == q.VAR_POSITIONAL for q in mine.parameters.values()):
                problems.append(f"{method}: positional {p.name!r} (#{i}) missing")
            continue
        q = my_pos[i]
        if q.name != p.name:
            problems.append(f"{method}: positional #{i} is {q.name!r}, official {p.name!r}")
        elif not _same_default(p.default, q.default) and (cls_name, method, p.name) not in ALLOWED:
            problems.append(f"{method}: {p.name} default {q.default!r}, official {p.default!r}")
    for q in my_pos[len(off_pos):]:
        if (cls_name, method, q.name) not in ALLOWED:
            problems.append(f"{method}: firetitan's extra {q.name!r} must be keyword-only")
    my_kw = _keyword_only(mine)
    takes_kwargs = any(q.kind == q.VAR_KEYWORD for q in mine.parameters.values())
    for name, p in _keyword_only(off).items():
        q = my_kw.get(name) or next((x for x in my_pos if x.name == name), None)
        if q is None:
            if not takes_kwargs:
                problems.append(f"{method}: keyword {name!r} missing")
        elif not _same_default(p.default, q.default) and (cls_name, method, name) not in ALLOWED:
            problems.append(f"{method}: {name} default {q.default!r}, official {p.default!r}")
    return problems


@pytest.mark.parametrize(("off_cls", "ft_cls", "ctor"), PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_shared_signatures_match_the_official_sdk(off_cls: Any, ft_cls: Any, ctor: bool) -> None:
    shared = _shared(off_cls, ft_cls, ctor)
    names = {name for name, _, _ in shared}
    missing = REQUIRED.get(off_cls.__name__, set()) - names
    assert not missing, f"{ft_cls.__name__} lacks {sorted(missing)}"
    problems = [d for name, off, mine in shared for d in _differences(off_cls.__name__, name, off, mine)]
    assert not problems, f"{ft_cls.__name__} differs from the official {off_cls.__name__}:\n" + "\n".join(problems)


def test_config_fields_are_the_officials_or_accepted() -> None:
    """Every official config field builds here: a firetitan field with the same default, or a
    hosted-only setting that is accepted and dropped."""
    from firetitan.client.config import _DEPRECATED, _HOSTED_ONLY

    mine = firetitan.FiretitanProvisioningConfig.model_fields
    problems = []
    for f in dataclasses.fields(official.FiretitanProvisioningConfig):
        if f.name in mine:
            default = mine[f.name].default
            if f.default is not dataclasses.MISSING and not _same_default(f.default, default):
                problems.append(f"{f.name}: default {default!r}, official {f.default!r}")
        elif f.name not in _HOSTED_ONLY and f.name not in _DEPRECATED:
            problems.append(f"{f.name}: not accepted")
        elif f.name in _HOSTED_ONLY and not _same_default(f.default, _HOSTED_ONLY[f.name]):
            problems.append(f"{f.name}: hosted default recorded as {_HOSTED_ONLY[f.name]!r}, official {f.default!r}")
    assert not problems, "\n".join(problems)
    # And the hosted defaults build without a warning.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        firetitan.FiretitanProvisioningConfig(base_model="m", **_HOSTED_ONLY)


def test_the_comparison_catches_a_difference() -> None:
    """The checker itself: a swapped positional order and a changed default are both reported."""

    def off(prompt_token_ids: list[int], n: int = 1, max_tokens: int = 1024) -> None: ...
    def wrong(n: int, prompt_token_ids: list[int], max_tokens: int = 256, *, extra: int = 0) -> None: ...

    problems = _differences("X", "m", inspect.signature(off), inspect.signature(wrong))
    assert any("positional #0" in p for p in problems) and len(problems) >= 2
