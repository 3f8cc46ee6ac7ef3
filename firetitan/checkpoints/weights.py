"""Tensor-level helpers of the snapshot store: tied-weight aliases, per-tensor digests, configs, safetensors reads."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from firetitan.checkpoints import delta as dz
from firetitan.checkpoints.parallel import per_tensor
from firetitan.errors import InvalidRequestError, SnapshotError


def config_get(config: Any, key: str, default: Any) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def write_config(config: Any, directory: Path) -> None:
    if hasattr(config, "save_pretrained"):
        config.save_pretrained(str(directory))
    elif isinstance(config, Mapping):
        (directory / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True))
    else:
        raise InvalidRequestError("config must be a transformers PretrainedConfig or a dict", field="config")


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)


def tensor_digests(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """sha256 of every tensor's raw bytes, computed on the snapshot thread pool."""
    return per_tensor(lambda _key, t: dz.tensor_sha256(t), tensors)


def raw_size(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _storage_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    if t.numel() == 0:
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def split_aliases(
    state_dict: Mapping[str, torch.Tensor], tie_embeddings: bool
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that are the same parameter under another name (safetensors refuses shared storage).

    The canonical copy kept is the one transformers keeps (the input embedding over `lm_head`).
    """
    groups: dict[Any, list[str]] = {}
    for key, t in state_dict.items():
        groups.setdefault(_storage_key(t) or ("unique", key), []).append(key)
    aliases: dict[str, str] = {}
    for names in groups.values():
        if len(names) > 1:
            keep = min(names, key=lambda n: ("lm_head" in n, len(n), n))
            aliases.update({n: keep for n in names if n != keep})
    if tie_embeddings and "lm_head.weight" in state_dict and "lm_head.weight" not in aliases:
        embeds = [k for k in state_dict if k.endswith("embed_tokens.weight") and k not in aliases]
        if len(embeds) == 1:
            if not torch.equal(state_dict["lm_head.weight"], state_dict[embeds[0]]):
                raise SnapshotError(
                    "config has tie_word_embeddings=True but lm_head.weight differs from "
                    f"{embeds[0]}; from_pretrained would silently drop lm_head.weight"
                )
            aliases["lm_head.weight"] = embeds[0]
    canonical: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for key, t in state_dict.items():
        if key in aliases:
            continue
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen_storage:
            t = t.clone()  # partial overlap with another kept tensor: store its own copy
        elif ptr is not None:
            seen_storage.add(ptr)
        canonical[key] = t
    return canonical, aliases


def apply_aliases_for_save(
    state_dict: Mapping[str, torch.Tensor], aliases: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        target = aliases.get(key)
        if target is not None:
            other = state_dict.get(target)
            if other is not None and not (_storage_key(t) == _storage_key(other) or torch.equal(t, other)):
                raise SnapshotError(
                    f"{key!r} is tied to {target!r} in the base snapshot but now differs from it"
                )
            continue
        out[key] = t.detach().to("cpu").contiguous()
    return out


def expand_aliases(tensors: dict[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    for alias, target in aliases.items():
        if target in tensors:
            tensors[alias] = tensors[target]
    return tensors


def check_digests(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, str], identity: str) -> None:
    if set(tensors) != set(expected):
        raise SnapshotError(f"snapshot {identity!r} tensors do not match its manifest")
    digests = tensor_digests(tensors)
    for key, digest in digests.items():
        if digest != expected[key]:
            raise SnapshotError(f"snapshot {identity!r} is corrupt: tensor {key!r} does not match its digest")


def load_safetensors(path: Path, identity: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise SnapshotError(f"snapshot {identity!r} is missing {path.name}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise SnapshotError(f"snapshot {identity!r} has an unreadable {path.name}: {exc}") from exc
