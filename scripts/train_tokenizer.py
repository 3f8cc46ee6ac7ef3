"""Train the built-in models' byte-level BPE tokenizer from `scripts/corpus/` and write it into the package.

Run from the repository root:  .venv/bin/python scripts/train_tokenizer.py
Output: firetitan/models/assets/tokenizer/{tokenizer.json,tokenizer_config.json,special_tokens_map.json}.
Training is deterministic for a given corpus, so rerunning it on an unchanged corpus rewrites the same files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parents[1]
CORPUS_DIR = ROOT / "scripts" / "corpus"
OUT_DIR = ROOT / "firetitan" / "models" / "assets" / "tokenizer"

VOCAB_SIZE = 4096
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# ChatML. `add_generation_prompt` opens an assistant turn so sampling continues as the assistant.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def corpus_files(corpus_dir: Path) -> list[str]:
    files = sorted(str(p) for p in corpus_dir.glob("*.txt"))
    if not files:
        raise SystemExit(f"no *.txt files in {corpus_dir}")
    return files


def build_tokenizer(files: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # Digits are split one per token (as Qwen does) so arithmetic is spelled digit by digit and the
    # merge budget goes to words rather than to whichever numbers the corpus happened to contain.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    return tok


def tokenizer_config() -> dict[str, object]:
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "padding_side": "right",
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS_DIR)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args()

    tok = build_tokenizer(corpus_files(args.corpus), args.vocab_size)
    if tok.get_vocab_size() != args.vocab_size:
        raise SystemExit(f"trained vocab is {tok.get_vocab_size()}, wanted {args.vocab_size}: corpus too small")
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))

    args.out.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out / "tokenizer.json"), pretty=False)
    (args.out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    special_map = {"eos_token": IM_END, "pad_token": ENDOFTEXT, "additional_special_tokens": [IM_START, IM_END]}
    (args.out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out} (vocab {tok.get_vocab_size()}, {size} bytes)")


if __name__ == "__main__":
    main()
