"""The local training-shape registry: trainer settings and the linked deployment shape per model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from firetitan.errors import InvalidRequestError, NotFoundError
from firetitan.models import aliases

SHAPE_VERSION = "1"
_SHAPE_NAME = re.compile(r"^accounts/([^/]+)/trainingShapes/([^/]+)(?:/versions/([^/]+))?$")


@dataclass(frozen=True)
class DeploymentShape:
    name: str
    max_running_seqs: int
    max_cached_tokens: int
    engine: str = "embedded"  # which worker serves deployments of this shape (control_plane/engines.py)


@dataclass(frozen=True)
class TrainingShape:
    shape_id: str
    base_model: str
    max_context_length: int
    trainer_mode: str  # POLICY_TRAINER | LORA_TRAINER | FORWARD_ONLY
    deployment: DeploymentShape
    trainer_threads: int | None = None  # None: split the machine's cores (see threads.py)
    device: str = "auto"  # trainer and deployment device unless a request names one
    dtype: str = "float32"  # trainer compute/snapshot dtype and the deployment's served dtype

    @property
    def name(self) -> str:
        return f"accounts/local/trainingShapes/{self.shape_id}"

    def profile(self) -> dict[str, object]:
        """The shape as a TrainingShapeProfile-like JSON version resource."""
        return {
            "name": f"{self.name}/versions/{SHAPE_VERSION}",
            "trainingShape": self.name,
            "trainingShapeVersion": f"{self.name}/versions/{SHAPE_VERSION}",
            "baseModel": self.base_model,
            "maxSupportedContextLength": self.max_context_length,
            "trainerMode": self.trainer_mode,
            "supportsLora": True,
            "acceleratorType": "CPU",
            "acceleratorCount": 0,
            "nodeCount": 1,
            "trainerThreads": self.trainer_threads,
            "device": self.device,
            "dtype": self.dtype,
            "deploymentShape": self.deployment.name,
            "deploymentShapeVersion": f"{self.deployment.name}/versions/{SHAPE_VERSION}",
            "maxRunningSeqs": self.deployment.max_running_seqs,
            "maxCachedTokens": self.deployment.max_cached_tokens,
            "engine": self.deployment.engine,
            "latestValidated": True,
            # The official SDK reads the version's settings from `snapshot` (fireworks_client.py).
            "snapshot": {
                "maxSupportedContextLength": self.max_context_length,
                "trainerMode": self.trainer_mode,
                "deploymentShapeVersion": f"{self.deployment.name}/versions/{SHAPE_VERSION}",
                "acceleratorType": "CPU",
                "acceleratorCount": 0,
                "nodeCount": 1,
                "trainerImageTag": "",
                "deploymentImageTag": "",
                "baseModelWeightPrecision": "",
                "trainerShardingScheme": {"pipelineParallelism": 1},
            },
        }


def _shape(shape_id: str, base_model: str, ctx: int, seqs: int, engine: str = "embedded") -> TrainingShape:
    dep = DeploymentShape(f"accounts/local/deploymentShapes/{shape_id}", max_running_seqs=seqs,
                          max_cached_tokens=seqs * ctx, engine=engine)
    return TrainingShape(shape_id, base_model, ctx, "POLICY_TRAINER", dep)


SHAPES: dict[str, TrainingShape] = {
    s.shape_id: s
    for s in (
        _shape("tiny-qwen3-cpu", "firetitan/tiny-qwen3", 1024, 32),
        _shape("nano-qwen3-cpu", "firetitan/nano-qwen3", 512, 32),
        # The same trainer; its deployments are served by vLLM (needs `make vllm-env`, docs/scaling-out.md).
        _shape("tiny-qwen3-vllm", "firetitan/tiny-qwen3", 1024, 32, engine="vllm"),
        _shape("nano-qwen3-vllm", "firetitan/nano-qwen3", 512, 32, engine="vllm"),
    )
}


def resolve_shape(name: str, field: str = "trainingShape", home: str | Path | None = None) -> TrainingShape:
    """Accept `accounts/<a>/trainingShapes/<s>[/versions/<v>]` (any account) or a bare shape id.

    With `home`, a hosted shape name goes through the model-alias table first (its target model's
    local shape answers, whatever version was asked for); a hosted name outside `accounts/local/`
    that neither the table nor the registry knows is an error naming the table and the command.
    """
    if home is not None:
        model = aliases.resolve_shape_model(name, home, field=field)
        if model is not None:
            return shape_for_model(model, name, field)
    match = _SHAPE_NAME.match(name)
    shape_id = match.group(2) if match else name
    version = match.group(3) if match else None
    if "/" in shape_id:
        raise InvalidRequestError(
            f"{field} {name!r} is not a training shape name; expected accounts/<account>/trainingShapes/<id>",
            field=field)
    shape = SHAPES.get(shape_id)
    if shape is None:
        unversioned = name.split("/versions/")[0]
        if home is not None and match is not None and match.group(1) != "local" and aliases.is_hosted_name(
                unversioned):
            raise aliases.missing_shape_alias_error(unversioned, home, field=field)
        raise NotFoundError(f"training shape {name!r} not found; known shapes: "
                            + ", ".join(s.name for s in SHAPES.values()), field=field)
    if version not in (None, SHAPE_VERSION, "latest"):
        raise NotFoundError(f"training shape {name!r} has no version {version!r}; only {SHAPE_VERSION!r}",
                            field=field)
    return shape


def shape_for_model(model: str, name: str, field: str) -> TrainingShape:
    """The local training shape that trains `model` (an alias table target)."""
    for shape in SHAPES.values():
        if shape.base_model == model:
            return shape
    raise NotFoundError(f"{field} {name!r} is aliased to {model!r}, which has no local training shape "
                        f"(shapes exist for: {', '.join(s.base_model for s in SHAPES.values())}); alias the "
                        "shape to one of those, or create the trainer job without a trainingShape and with "
                        "trainingConfig.baseModel", field=field)


def deployment_shape(name: str | None) -> TrainingShape | None:
    """Deployment shapes are named after their training shape: accounts/<a>/deploymentShapes/<id>."""
    if not name:
        return None
    shape_id = name.split("/versions/")[0].rsplit("/", 1)[-1]
    shape = SHAPES.get(shape_id)
    if shape is None:
        raise NotFoundError(f"deploymentShape {name!r} not found; known: "
                            + ", ".join(s.deployment.name for s in SHAPES.values()), field="deploymentShape")
    return shape


def check_base_model(name: str, field: str) -> None:
    """Fail the create request (not the worker, later) when the model cannot be found locally."""
    from firetitan.models import BUILTIN_MODELS

    if name in BUILTIN_MODELS or Path(name).expanduser().is_dir():
        return
    raise NotFoundError(f"{field} {name!r} is neither a built-in model ({', '.join(sorted(BUILTIN_MODELS))}) "
                        "nor a local Hugging Face model directory", field=field)


def local_base_model(name: str, home: str | Path, field: str) -> str:
    """The local model a request's base model means: a hosted name (`accounts/<a>/models/<id>`)
    through the model-alias table in `home` (no alias: an error naming the table and the command),
    anything else unchanged once it is found locally. Workers only ever get the local name."""
    if aliases.is_hosted_name(name):
        return aliases.resolve_model_name(name, home, field=field)
    check_base_model(name, field)
    return name
