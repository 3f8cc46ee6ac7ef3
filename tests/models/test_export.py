"""A built-in exported with `export_model` is an ordinary local HF directory that loads identically."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from firetitan.models import export_model, load_model, load_tokenizer, model_config

NANO = "firetitan/nano-qwen3"


def test_export_writes_a_plain_hf_directory(nano_dir: Path) -> None:
    names = {p.name for p in nano_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((nano_dir / "config.json").read_text())
    assert config["model_type"] == "qwen3"
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    tensors = load_file(nano_dir / "model.safetensors")
    reference = load_model(NANO).state_dict()
    assert set(tensors) == set(reference)
    for name, tensor in tensors.items():
        assert torch.equal(tensor, reference[name]), name


def test_exported_directory_gives_identical_logits(nano_dir: Path) -> None:
    builtin, local = load_model(NANO), load_model(nano_dir)
    assert local.config._attn_implementation == builtin.config._attn_implementation
    ids = torch.randint(3, 4096, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(builtin(ids).logits, local(ids).logits)
    greedy = {"max_new_tokens": 6, "do_sample": False}
    assert torch.equal(builtin.generate(ids[:1], **greedy), local.generate(ids[:1], **greedy))


def test_exported_tokenizer_and_config_match(nano_dir: Path) -> None:
    builtin, local = load_tokenizer(NANO), load_tokenizer(nano_dir)
    messages = [{"role": "user", "content": "Plant the beans in rows of 12."}]
    assert local.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == (
        builtin.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    )
    assert (local.eos_token_id, local.pad_token_id) == (builtin.eos_token_id, builtin.pad_token_id)
    assert model_config(nano_dir).to_diff_dict().items() >= {"hidden_size": 64, "num_hidden_layers": 2}.items()


def test_export_in_bfloat16_with_a_custom_seed(tmp_path: Path) -> None:
    out = export_model(NANO, tmp_path / "nano-bf16", dtype=torch.bfloat16, seed=11)
    loaded = load_model(out, dtype=torch.bfloat16)
    expected = load_model(NANO, dtype=torch.bfloat16, seed=11)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), expected.state_dict().items(), strict=True):
        assert a.dtype == torch.bfloat16
        assert torch.equal(a, b), name


def test_a_local_directory_can_be_re_exported(nano_dir: Path, tmp_path: Path) -> None:
    copy = export_model(nano_dir, tmp_path / "copy")
    assert torch.equal(
        load_file(copy / "model.safetensors")["lm_head.weight"],
        load_file(nano_dir / "model.safetensors")["lm_head.weight"],
    )
    assert load_tokenizer(copy).get_vocab() == load_tokenizer(nano_dir).get_vocab()
