"""On-disk layout of a sampler snapshot: payload file names, payload digests, and durable (fsynced) writes."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

from firetitan.checkpoints.manifest import MANIFEST_FILE

BASE_WEIGHTS_FILE = "model.safetensors"
DELTA_FILE = "delta.safetensors"
LORA_CONFIG_FILE = "adapter_config.json"
LORA_WEIGHTS_FILE = "adapter_model.safetensors"
TMP_PREFIX = ".tmp-"


def payload_files(root: Path) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for fname in files:
            rel = os.path.relpath(os.path.join(dirpath, fname), root)
            if rel != MANIFEST_FILE:
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def combine(files: Mapping[str, str]) -> str:
    lines = "".join(f"{rel} {digest}\n" for rel, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
