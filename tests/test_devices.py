"""Device and dtype settings: validation names the field, `auto` resolves, a worker refuses a device it lacks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from firetitan.devices import check_device, check_dtype, doctor_report, resolve_device, torch_dtype
from firetitan.errors import InvalidRequestError


def test_settings_normalise_and_bad_values_name_the_field() -> None:
    assert check_device(" CUDA:1 ") == "cuda:1" and check_device("mps") == "mps"
    assert check_dtype("bf16") == "bfloat16" and check_dtype("torch.float32") == "float32"
    assert torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(InvalidRequestError) as err:
        check_dtype("float16", field="trainingConfig.dtype")
    assert err.value.field == "trainingConfig.dtype" and "float32, bfloat16" in err.value.message
    for bad in ("gpu", "cuda:", "cuda:x", "", None, 3):
        with pytest.raises(InvalidRequestError) as err:
            check_device(bad)
        assert err.value.field == "device" and "cuda:<index>" in err.value.message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of an absent CUDA device")
def test_auto_resolves_to_what_exists_and_an_absent_device_is_refused() -> None:
    assert resolve_device("auto") in ("cpu", "mps")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(InvalidRequestError) as err:
        resolve_device("cuda:0", field="--device")
    assert err.value.field == "--device" and "0 CUDA device" in err.value.message
    report = doctor_report()
    assert report["auto_device"] == resolve_device("auto") and report["dtypes"]["float32"] == "ok"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of an absent CUDA device")
def test_a_worker_given_an_absent_device_exits_before_serving(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "firetitan.server.trainer", "--store-dir", str(tmp_path / "s"),
                           "--state-dir", str(tmp_path / "t"), "--port", "0", "--device", "cuda:3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--device: 'cuda:3' is not available here" in proc.stderr
