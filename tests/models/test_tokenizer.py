"""The shared built-in tokenizer: vocabulary, special tokens, ChatML template and lossless round-trips."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from firetitan.models import (
    ENDOFTEXT_ID,
    IM_END_ID,
    IM_START_ID,
    TOKENIZER_DIR,
    VOCAB_SIZE,
    load_tokenizer,
)

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = [
    {"role": "system", "content": "You are a careful math tutor."},
    {"role": "user", "content": "What is 17 + 25?"},
    {"role": "assistant", "content": "17 + 25 = 42."},
    {"role": "user", "content": "And 42 * 2?"},
]
RENDERED = (
    "<|im_start|>system\nYou are a careful math tutor.<|im_end|>\n"
    "<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n"
    "<|im_start|>assistant\n17 + 25 = 42.<|im_end|>\n"
    "<|im_start|>user\nAnd 42 * 2?<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return load_tokenizer("firetitan/tiny-qwen3")


def test_both_builtins_share_one_tokenizer(tok: PreTrainedTokenizerFast) -> None:
    other = load_tokenizer("firetitan/nano-qwen3")
    assert other.get_vocab() == tok.get_vocab()
    assert other.chat_template == tok.chat_template


def test_vocabulary_and_special_tokens(tok: PreTrainedTokenizerFast) -> None:
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == VOCAB_SIZE
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        ENDOFTEXT_ID, IM_START_ID, IM_END_ID,
    ]
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", IM_END_ID)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", ENDOFTEXT_ID)
    assert tok.bos_token is None
    # No BOS/EOS is added behind the caller's back: prompts are exactly what the template renders.
    assert tok.encode("hello") == tok.encode("hello", add_special_tokens=False)


def test_chat_template_renders_chatml(tok: PreTrainedTokenizerFast) -> None:
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == RENDERED
    with_prompt = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert with_prompt == RENDERED + "<|im_start|>assistant\n"


def test_chat_template_round_trips_through_ids(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == RENDERED + "<|im_start|>assistant\n"
    assert ids == tok.encode(RENDERED + "<|im_start|>assistant\n")
    # Special tokens are single ids, never spelled out of pieces.
    assert ids.count(IM_START_ID) == 5
    assert ids.count(IM_END_ID) == 4
    assert ids[-3:] == [IM_START_ID, *tok.encode("assistant\n")]
    assert tok.decode(ids, skip_special_tokens=True).startswith("system\nYou are a careful math tutor.")


def test_digits_are_single_tokens(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode("12345")
    assert [tok.decode([i]) for i in ids] == list("12345")


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_any_text_round_trips(tok: PreTrainedTokenizerFast, text: str) -> None:
    # Byte-level BPE: every string, in any script or with any control character, survives encode/decode.
    ids = tok.encode(text)
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert tok.decode(ids) == text


def test_english_is_compressed(tok: PreTrainedTokenizerFast) -> None:
    text = "The morning began with rain on the window, and the children were learning about rivers."
    assert len(tok.encode(text)) < len(text) / 3


def test_assets_are_small() -> None:
    size = sum(p.stat().st_size for p in TOKENIZER_DIR.iterdir())
    assert size < 1_000_000
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    assert "add_generation_prompt" in config["chat_template"]


def test_committed_tokenizer_is_what_the_script_trains(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("train_tokenizer", ROOT / "scripts" / "train_tokenizer.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    trained = script.build_tokenizer(script.corpus_files(ROOT / "scripts" / "corpus"), VOCAB_SIZE)
    trained.save(str(tmp_path / "tokenizer.json"), pretty=False)
    committed = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == committed
    assert json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text()) == json.loads(
        json.dumps(script.tokenizer_config())
    )
