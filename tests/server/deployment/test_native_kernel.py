"""The native row-blocked matmul: built with the machine's compiler on first use, equal to torch's matmul."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from firetitan.server.deployment.engine.native import row_block, row_blocked_kernel


def _close(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Equal up to float32 summation order: within 1e-5 of each element's sum of |products|."""
    scale = x.abs() @ weight.abs().T
    return bool(((got - x @ weight.T).abs() <= 1e-5 * scale + 1e-6).all())


def _kernel():  # type: ignore[no-untyped-def]
    kernel = row_blocked_kernel()
    assert kernel is not None, "gcc builds the kernel on every machine this suite runs on"
    return kernel


@pytest.mark.parametrize(("out_features", "in_features"), [(48, 32), (37, 29), (960, 576), (5, 3), (100, 64), (70, 16)])
def test_products_equal_torch_for_every_row_count(out_features: int, in_features: int) -> None:
    """Every tile shape: 1-25 rows (whole and partial tiles of 8) and 1, 3, 5, 7 and 60 blocks (column groups
    of 3 with none, 1 or 2 left over); padded last blocks (37, 5, 100 rows) and odd widths (29, 3)
    included; leading dims are kept. A prefill's 300 rows too."""
    kernel = _kernel()
    gen = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, in_features, generator=gen)
    blocked = row_block(weight)
    assert blocked.blocks.shape == (-(-out_features // 16), in_features, 16)
    for rows in [*range(1, 26), 300]:
        x = torch.randn(rows, 1, in_features, generator=gen)
        got = kernel.matmul(x, blocked)
        assert got.shape == (rows, 1, out_features)
        assert _close(got, x, weight), (got - x @ weight.T).abs().max()
    # A non-contiguous input (a transposed view) is read as its values, not its storage order.
    x = torch.randn(in_features, 2, generator=gen).T
    assert _close(kernel.matmul(x, blocked), x, weight)


def test_refuses_what_it_cannot_compute() -> None:
    kernel = _kernel()
    blocked = row_block(torch.randn(16, 8))
    with pytest.raises(ValueError, match="at least one row"):
        kernel.matmul(torch.randn(0, 8), blocked)
    with pytest.raises(ValueError, match="float32"):
        kernel.matmul(torch.randn(1, 8, dtype=torch.float64), blocked)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        kernel.matmul(torch.randn(1, 7), blocked)


def test_a_fresh_cache_builds_once_and_without_a_compiler_it_is_unavailable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """In a new process: an empty cache directory gets one library per kernel; with no compiler each is
    None (the decode step keeps its torch paths), not an error, and the log says why."""
    script = ("from firetitan.server.deployment.engine.native import row_blocked_kernel as k; "
              "from firetitan.server.deployment.engine.decode_glue import decode_glue as g; "
              "print(k() is not None, g() is not None)")
    cache = tmp_path / "kernels"
    env = {**os.environ, "FIRETITAN_KERNEL_DIR": str(cache)}
    assert shutil.which("gcc") is not None
    built = subprocess.run([sys.executable, "-c", script], env={**env, "CC": "gcc"}, capture_output=True,
                           text=True, timeout=300)
    assert built.stdout.strip() == "True True", built.stderr[-2000:]
    assert len(list(cache.glob("row_blocked-*.so"))) == 1
    assert len(list(cache.glob("decode_glue-*.so"))) == 1
    missing = subprocess.run([sys.executable, "-c", script], env={**env, "CC": "no-such-cc"},
                             capture_output=True, text=True, timeout=300)
    assert missing.stdout.strip() == "False False", missing.stderr[-2000:]
    assert "no C compiler" in missing.stdout + missing.stderr
