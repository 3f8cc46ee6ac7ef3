"""Train state (weights + optimizer) saved with `torch.distributed.checkpoint` for exact resume."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from pydantic import BaseModel, ConfigDict, ValidationError
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from firetitan.errors import ConflictError, InvalidRequestError, NotFoundError, SnapshotError
from firetitan.logging import get_logger
from firetitan.names import check_within, resolve_under

log = get_logger(__name__)

TRAIN_STATE_FILE = "train_state.json"
TRAIN_STATE_FORMAT_VERSION = 1
_TMP_PREFIX = ".tmp-"
# Frozen parameters (the base under LoRA) are rebuilt from the base model, so only trainable ones are
# saved: a LoRA train state stays adapter-sized.
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Loading must then tolerate the frozen keys' absence; completeness is still checked, because dcp.load
# fails when any key of the template (every trainable tensor) is missing from the checkpoint.
_SET_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


class TrainStateInfo(BaseModel):
    """The `train_state.json` manifest written beside the DCP files."""

    model_config = ConfigDict(extra="ignore")

    format_version: int = TRAIN_STATE_FORMAT_VERSION
    name: str | None = None
    step: int
    has_optimizer: bool
    num_params: int
    param_names_sample: list[str]
    created_at: datetime
    extra: dict[str, Any] = {}


@contextlib.contextmanager
def _single_process_dcp() -> Iterator[None]:
    # dcp.save/load run in single-process mode when no process group exists; they warn about it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed.*", category=UserWarning)
        yield


def save_train_state(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    extra: dict[str, Any] | None = None,
    *,
    name: str | None = None,
    tmp: str | os.PathLike[str] | None = None,
    coordinator: bool = True,
) -> TrainStateInfo:
    """Write model (trainable params) and optimizer state to the new directory `path`, atomically.

    `extra` must be JSON-serialisable (data cursor, lr schedule position, base model name...).
    Under a process group every rank calls this with the same `tmp` (chosen by the coordinator) and
    writes its shards there; only the `coordinator` checks `path`, writes the manifest and renames.
    """
    path = Path(path)
    if coordinator and path.exists():
        raise ConflictError(f"train state {str(name or path.name)!r} already exists", field="name")
    try:
        extra_json = json.loads(json.dumps(extra or {}))
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"extra must be JSON-serialisable: {exc}", field="extra") from exc
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
        payload: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    else:
        model_sd = get_model_state_dict(model, options=_OPTIONS)
        payload = {"model": model_sd}
    info = TrainStateInfo(
        name=name,
        step=int(step),
        has_optimizer=optimizer is not None,
        num_params=len(model_sd),
        param_names_sample=sorted(model_sd)[:8],
        created_at=datetime.now(UTC),
        extra=extra_json,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tmp) if tmp is not None else path.parent / f"{_TMP_PREFIX}{path.name}-{os.getpid()}-{os.urandom(4).hex()}"
    if not coordinator:
        with _single_process_dcp():
            dcp.save(payload, checkpoint_id=str(tmp))
        return info
    try:
        with _single_process_dcp():
            dcp.save(payload, checkpoint_id=str(tmp))
        manifest = tmp / TRAIN_STATE_FILE
        with open(manifest, "w") as f:
            f.write(info.model_dump_json(indent=2))
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        try:
            os.rename(tmp, path)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise ConflictError(f"train state {str(name or path.name)!r} already exists", field="name") from exc
            raise
        _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("train state saved", path=str(path), step=info.step, has_optimizer=info.has_optimizer)
    return info


def read_train_state_info(path: str | os.PathLike[str]) -> TrainStateInfo:
    """The manifest of a train state directory; `NotFoundError` if `path` is not one."""
    manifest = Path(path) / TRAIN_STATE_FILE
    try:
        raw = manifest.read_text()
    except (FileNotFoundError, NotADirectoryError):
        raise NotFoundError(f"{str(path)!r} is not a train state (no {TRAIN_STATE_FILE})", field="path") from None
    try:
        return TrainStateInfo.model_validate_json(raw)
    except ValidationError as exc:
        raise SnapshotError(f"train state {str(path)!r} has an unreadable manifest: {exc}") from exc


def load_train_state(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Restore weights (and, when `optimizer` is given, its full state) in place; return (step, extra).

    With `optimizer=None` only the weights load; the caller's optimizer is untouched, so a freshly made
    one starts from empty state (Tinker's `load_state`).

    Trust: torch's DCP reader unpickles the checkpoint metadata, so loading a directory runs whatever
    its writer put there. Only load states this deployment wrote; with `root` (what every service
    passes: the trainer's state store) a path outside it is refused before anything is read.
    """
    if root is not None:
        path = check_within(root, path, field="path")
    info = read_train_state_info(path)
    if optimizer is not None and not info.has_optimizer:
        raise InvalidRequestError(
            f"train state {str(path)!r} was saved without optimizer state; load it without the optimizer",
            field="path",
        )
    if optimizer is not None:
        # Builds a template (initialising empty Adam state with a zero-lr step) that dcp.load fills.
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
        payload: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    else:
        model_sd = get_model_state_dict(model, options=_OPTIONS)
        payload = {"model": model_sd}
    if len(model_sd) != info.num_params:
        raise InvalidRequestError(
            f"train state {str(path)!r} holds {info.num_params} trainable tensors but the model has "
            f"{len(model_sd)}; load it into a model with the same architecture and LoRA settings",
            field="path",
        )
    try:
        with _single_process_dcp():
            dcp.load(payload, checkpoint_id=str(path))
    except (RuntimeError, ValueError, KeyError, CheckpointException) as exc:
        raise SnapshotError(f"train state {str(path)!r} does not match this model: {exc}") from exc
    if optimizer is not None:
        set_state_dict(
            model, optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optim"], options=_SET_OPTIONS
        )
    else:
        set_model_state_dict(model, payload["model"], options=_SET_OPTIONS)
    log.info("train state loaded", path=str(path), step=info.step, with_optimizer=optimizer is not None)
    return info.step, dict(info.extra)


class TrainStateStore:
    """Train states named by the user (`"step-100"`) under `root/states/<name>/`."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.states_dir = self.root / "states"
        self.states_dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return resolve_under(self.states_dir, name, field="name")

    def resolve(self, ref: str) -> Path:
        """The directory of an existing state given its name or a `tinker://<run>/weights/<name>` path."""
        if not isinstance(ref, str):
            raise InvalidRequestError("path must be a string", field="path")
        name = ref
        if ref.startswith("tinker://"):
            parts = ref[len("tinker://") :].split("/")
            if len(parts) != 3 or parts[1] != "weights":
                raise InvalidRequestError(
                    f"path {ref!r} is not a train state path (tinker://<run>/weights/<name>)", field="path"
                )
            name = parts[2]
        path = resolve_under(self.states_dir, name, field="path")
        if not (path / TRAIN_STATE_FILE).is_file():
            raise NotFoundError(f"no train state named {name!r}", field="path")
        return path

    def exists(self, name: str) -> bool:
        return (self.path(name) / TRAIN_STATE_FILE).is_file()

    def save(
        self,
        name: str,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        step: int,
        extra: dict[str, Any] | None = None,
        *,
        overwrite: bool = False,
        writer: Any = None,
    ) -> TrainStateInfo:
        """Save under `name`; an existing name raises `ConflictError` unless `overwrite`.

        `writer` replaces `save_train_state` (same signature), e.g. by one that saves every rank's shards."""
        path = self.path(name)
        if path.exists() and overwrite:
            self.delete(name)
        return (writer or save_train_state)(path, model, optimizer, step, extra, name=name)

    def load(
        self, ref: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> tuple[int, dict[str, Any]]:
        return load_train_state(self.resolve(ref), model, optimizer, root=self.states_dir)

    def info(self, ref: str) -> TrainStateInfo:
        return read_train_state_info(self.resolve(ref))

    def list(self) -> list[TrainStateInfo]:
        out = []
        for entry in self.states_dir.iterdir():
            if entry.name.startswith(".") or not (entry / TRAIN_STATE_FILE).is_file():
                continue
            with contextlib.suppress(SnapshotError, NotFoundError):
                out.append(read_train_state_info(entry))
        return sorted(out, key=lambda i: (i.created_at, i.name or ""))

    def delete(self, name: str) -> None:
        path = self.resolve(name)
        trash = self.states_dir / f"{_TMP_PREFIX}del-{path.name}-{os.urandom(4).hex()}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


class LatestStateStore:
    """The automatic train states of one trainer job: the newest `keep` under `root/latest/step-<N>`,
    plus `progress.json`, the last step the trainer reached (so a restart can say what was lost).

    Kept apart from the user-named states, so `list_checkpoints` and name collisions are unaffected.
    """

    PROGRESS_FILE = "progress.json"

    def __init__(self, root: str | os.PathLike[str], keep: int = 2) -> None:
        if keep < 1:
            raise InvalidRequestError(f"keep must be >= 1, got {keep}", field="keep")
        self.dir = Path(root) / "latest"
        self.keep = keep

    def record_step(self, step: int) -> None:
        """Remember the step reached (a small atomic write, once per optimizer step)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f"{_TMP_PREFIX}progress-{os.getpid()}"
        tmp.write_text(json.dumps({"step": int(step), "at": datetime.now(UTC).isoformat()}))
        os.replace(tmp, self.dir / self.PROGRESS_FILE)

    def last_known_step(self) -> int:
        """The step recorded last (0 when none, or when the file is unreadable)."""
        try:
            return int(json.loads((self.dir / self.PROGRESS_FILE).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, step: int,
             extra: dict[str, Any] | None = None, *, writer: Any = None) -> TrainStateInfo | None:
        """Save the state of `step` (None if that step is already saved) and drop all but the newest `keep`.

        `writer` replaces `save_train_state` (same signature), as in `TrainStateStore.save`."""
        path = self.dir / f"step-{int(step):010d}"
        if (path / TRAIN_STATE_FILE).is_file():
            return None
        info = (writer or save_train_state)(path, model, optimizer, step, extra, name=path.name)
        for old in self._states()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return info

    def latest(self) -> Path | None:
        """The newest complete automatic state, if any."""
        states = self._states()
        return states[-1] if states else None

    def _states(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir()
                      if p.name.startswith("step-") and (p / TRAIN_STATE_FILE).is_file())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
