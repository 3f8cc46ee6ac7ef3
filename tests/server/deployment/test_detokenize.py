"""Incremental detokenization: the Rust `DecodeStream` path gives exactly a full decode's text."""

from __future__ import annotations

import copy
import random

import pytest

from firetitan.models import load_tokenizer
from firetitan.server.deployment.detokenize import IncrementalText, stream_decoding


@pytest.fixture(scope="module")
def tokenizer():  # the packaged byte-level BPE every built-in model uses
    return load_tokenizer("firetitan/tiny-qwen3")


def _run(tokenizer, ids: list[int], stop: tuple[str, ...], stream) -> tuple[list[str], IncrementalText]:
    text = IncrementalText(tokenizer, stop, stream)
    grown: list[int] = []
    deltas = []
    for index, token in enumerate(ids):
        grown.append(token)  # the engine passes its growing output list, not copies
        deltas.append(text.update(grown, final=index == len(ids) - 1))
    return deltas, text


def test_the_packaged_tokenizer_takes_the_stream(tokenizer) -> None:
    assert stream_decoding(tokenizer) is not None


def test_a_post_processing_tokenizer_keeps_the_windows(tokenizer) -> None:
    cleaning = copy.deepcopy(tokenizer)
    cleaning.clean_up_tokenization_spaces = True  # a transformers-side rewrite the stream never applies
    assert stream_decoding(cleaning) is None


def test_every_prefix_decodes_like_a_full_decode(tokenizer) -> None:
    stream = stream_decoding(tokenizer)
    # Multi-byte characters split over byte tokens, so prefixes end mid-character (U+FFFD at the end).
    ids = tokenizer.encode("naïve café 🌍🚀 — 東京 ok", add_special_tokens=False)
    assert len(ids) > len("naïve café 🌍🚀 — 東京 ok".split())  # some character spans several tokens
    for end in range(1, len(ids) + 1):
        deltas, _ = _run(tokenizer, ids[:end], (), stream)
        assert "".join(deltas) == tokenizer.decode(ids[:end], skip_special_tokens=True), end


def test_stream_and_windows_agree_on_random_ids_and_stop_strings(tokenizer) -> None:
    stream = stream_decoding(tokenizer)
    rng = random.Random(7)
    vocab = len(tokenizer)
    for _ in range(20):
        ids = [rng.randrange(vocab) for _ in range(48)]
        full = tokenizer.decode(ids, skip_special_tokens=True)
        stop = (full[len(full) // 2 : len(full) // 2 + 3],) if len(full) > 8 else ()
        got, got_text = _run(tokenizer, ids, stop, stream)
        want, want_text = _run(tokenizer, ids, stop, None)
        assert "".join(got) == "".join(want)
        assert got_text.stopped == want_text.stopped
        if not stop:
            assert "".join(got) == full
        elif stop[0]:
            assert "".join(got) == full[: full.find(stop[0])]
