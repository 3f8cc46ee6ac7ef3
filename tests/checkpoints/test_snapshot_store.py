"""SnapshotStore on the nano model: base in HF layout, exact deltas, wrong-base refusal, corruption, LoRA."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from firetitan.checkpoints import SnapshotStore
from firetitan.checkpoints.store import BASE_WEIGHTS_FILE, DELTA_FILE
from firetitan.errors import ConflictError, InvalidRequestError, SnapshotError
from firetitan.models import load_model

NANO = "firetitan/nano-qwen3"


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key


def _flip_byte(path, offset_from_end: int = 1) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def store(tmp_path) -> SnapshotStore:
    return SnapshotStore(tmp_path)


def test_base_loads_in_transformers_with_identical_logits(store, nano, nano_tokenizer, input_ids) -> None:
    m = store.save_base("step-0-a1b2c3d4", nano.state_dict(), nano.config, nano_tokenizer, base_model=NANO)
    assert (m.kind, m.identity, m.base_model, m.previous_snapshot_identity) == ("base", "step-0-a1b2c3d4", NANO, None)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(m.files)
    assert m.size_bytes > m.full_size_bytes > 0
    assert set(m.dtypes) == set(nano.state_dict()) and set(m.dtypes.values()) == {"float32"}
    assert store.verify(m.identity) == m
    assert json.loads((store.base_dir(m.identity) / "manifest.json").read_text())["checksum"] == m.checksum

    loaded = AutoModelForCausalLM.from_pretrained(store.base_dir(m.identity), attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, nano(input_ids).logits)
    # Our own loader reads the same directory as a local model.
    again = load_model(store.base_dir(m.identity))
    _assert_bit_equal(_state(again), _state(nano))
    _assert_bit_equal(store.load_state_dict(m.identity), _state(nano))


def test_delta_reproduces_weights_bit_for_bit(adamw_steps, store, nano) -> None:
    base_sd = _state(nano)
    base = store.save_base("base-x", base_sd, nano.config, base_model=NANO)
    opt = torch.optim.AdamW(nano.parameters(), lr=1e-4)
    adamw_steps(nano, opt, 2)
    after2 = _state(nano)
    d1 = store.save_delta("delta-2", after2, base.identity)
    adamw_steps(nano, opt, 1, seed=5)
    after3 = _state(nano)
    d2 = store.save_delta("delta-3", after3, base.identity, base_state_dict=base_sd)

    for d in (d1, d2):
        assert d.kind == "delta"
        assert d.previous_snapshot_identity == base.identity
        assert d.previous_snapshot_checksum == base.checksum
        assert d.base_model == NANO
        assert d.size_bytes < 0.75 * base.size_bytes  # fp32 Adam steps touch every weight; still compact
        store.verify(d.identity)
    # Each delta applies directly to the base (not chained), with or without the caller's base copy.
    _assert_bit_equal(store.load_state_dict(d1.identity, base_sd), after2)
    _assert_bit_equal(store.load_state_dict(d2.identity, base_sd, base_identity=base.identity), after3)
    _assert_bit_equal(store.load_state_dict(d2.identity), after3)
    assert not torch.equal(after2["model.embed_tokens.weight"], after3["model.embed_tokens.weight"])


def test_unchanged_weights_give_a_tiny_delta(store, nano) -> None:
    sd = _state(nano)
    base = store.save_base("base-same", sd, nano.config)
    d = store.save_delta("delta-same", sd, base.identity)
    assert d.size_bytes < 0.01 * base.size_bytes
    _assert_bit_equal(store.load_state_dict(d.identity, sd), sd)


def test_delta_against_the_wrong_base_is_refused(adamw_steps, store, nano) -> None:
    base_sd = _state(nano)
    base = store.save_base("base-a", base_sd, nano.config)
    other_sd = _state(load_model(NANO, seed=99))
    other = store.save_base("base-b", other_sd, nano.config)
    adamw_steps(nano, torch.optim.AdamW(nano.parameters(), lr=1e-4), 1)
    d = store.save_delta("delta-a", _state(nano), base.identity)

    with pytest.raises(SnapshotError, match="differs at tensor"):
        store.load_state_dict(d.identity, other_sd)
    with pytest.raises(SnapshotError, match="base-b"):
        store.load_state_dict(d.identity, base_sd, base_identity=other.identity)
    half = dict(base_sd)
    half["model.norm.weight"] = half["model.norm.weight"].to(torch.bfloat16)
    with pytest.raises(SnapshotError, match="bfloat16"):
        store.load_state_dict(d.identity, half)
    # Deltas are made against bases only.
    with pytest.raises(SnapshotError, match="base snapshot only"):
        store.save_delta("delta-of-delta", _state(nano), d.identity)
    assert SnapshotError("x").status_code == 409


def test_flipped_byte_fails_verify_and_load(adamw_steps, store, nano) -> None:
    base = store.save_base("base-c", _state(nano), nano.config)
    adamw_steps(nano, torch.optim.AdamW(nano.parameters(), lr=1e-4), 1)
    d = store.save_delta("delta-c", _state(nano), base.identity)

    _flip_byte(store.base_dir(base.identity) / BASE_WEIGHTS_FILE)
    with pytest.raises(SnapshotError, match=r"model\.safetensors"):
        store.verify(base.identity)
    with pytest.raises(SnapshotError, match="corrupt"):
        store.load_state_dict(base.identity)

    delta_file = store.snapshots_dir / d.identity / DELTA_FILE
    _flip_byte(delta_file, offset_from_end=100)
    with pytest.raises(SnapshotError, match=r"delta\.safetensors"):
        store.verify(d.identity)

    (store.snapshots_dir / d.identity / "stray.bin").write_bytes(b"x")
    with pytest.raises(SnapshotError, match="extra"):
        store.verify(d.identity)


def test_corrupt_delta_payload_is_refused_on_apply(adamw_steps, store, nano) -> None:
    base_sd = _state(nano)
    base = store.save_base("base-d", base_sd, nano.config)
    adamw_steps(nano, torch.optim.AdamW(nano.parameters(), lr=1e-4), 1)
    d = store.save_delta("delta-d", _state(nano), base.identity)
    _flip_byte(store.snapshots_dir / d.identity / DELTA_FILE, offset_from_end=1000)
    with pytest.raises(SnapshotError):
        store.load_state_dict(d.identity, base_sd)


def test_same_name_is_idempotent_and_different_content_conflicts(store, nano) -> None:
    sd = _state(nano)
    first = store.save_base("step-1-abcd", sd, nano.config)
    again = store.save_base("step-1", sd, nano.config, client_suffix="abcd")
    assert again == first  # the existing manifest, created_at included
    changed = dict(sd)
    changed["model.norm.weight"] = changed["model.norm.weight"] + 1
    with pytest.raises(ConflictError) as info:
        store.save_base("step-1-abcd", changed, nano.config)
    assert info.value.field == "name"
    assert [m.identity for m in store.list()] == ["step-1-abcd"]
    assert [p.name for p in store.snapshots_dir.iterdir()] == ["step-1-abcd"]  # no temp dirs left behind
    _assert_bit_equal(store.load_state_dict("step-1-abcd"), sd)


def test_tied_embeddings_are_stored_once_and_reload(adamw_steps, store, tied_model, input_ids) -> None:
    sd = tied_model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    base = store.save_base("tied-base", sd, tied_model.config)
    assert base.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in base.dtypes
    loaded = AutoModelForCausalLM.from_pretrained(store.base_dir(base.identity), attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, tied_model(input_ids).logits)
    restored = store.load_state_dict(base.identity)
    assert restored["lm_head.weight"] is restored["model.embed_tokens.weight"]

    adamw_steps(tied_model, torch.optim.AdamW(tied_model.parameters(), lr=1e-3), 1)
    d = store.save_delta("tied-delta", tied_model.state_dict(), base.identity)
    _assert_bit_equal(store.load_state_dict(d.identity, restored), _state(tied_model))
    fresh = type(tied_model)(tied_model.config).eval()
    fresh.load_state_dict(store.load_state_dict(d.identity))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids).logits, tied_model(input_ids).logits)


def test_tie_config_with_untied_weights_is_refused(store, tied_model) -> None:
    sd = {k: v.clone() for k, v in tied_model.state_dict().items()}
    sd["lm_head.weight"] += 1
    with pytest.raises(SnapshotError, match="tie_word_embeddings"):
        store.save_base("untied", sd, tied_model.config)


def test_lora_adapter_reloads_in_peft_with_identical_logits(adamw_steps, store, nano, input_ids) -> None:
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(nano, config)
    adamw_steps(peft_model, torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2), 2)
    m = store.save_lora("lora-1-a1b2c3d4", peft_model, base_model=NANO)
    assert m.kind == "lora" and m.base_model == NANO
    assert m.lora == {"rank": 4, "alpha": 32.0, "target_modules": ["q_proj", "up_proj", "v_proj"]}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(m.files)
    assert all("lora_" in k for k in m.dtypes)
    store.verify(m.identity)

    reloaded = PeftModel.from_pretrained(load_model(NANO), store.lora_dir(m.identity)).eval()
    with torch.no_grad():
        want = peft_model(input_ids=input_ids).logits
        assert not torch.equal(want, load_model(NANO)(input_ids).logits)  # the adapter really does something
        assert torch.equal(reloaded(input_ids=input_ids).logits, want)
    assert set(store.load_state_dict(m.identity)) == set(m.dtypes)
    with pytest.raises(InvalidRequestError):
        store.base_dir(m.identity)
    with pytest.raises(InvalidRequestError):
        store.save_delta("delta-of-lora", _state(nano), m.identity, codec="lz4")
    with pytest.raises(SnapshotError):
        store.save_delta("delta-of-lora", _state(nano), m.identity)


def test_list_orders_by_creation_and_delete(store, nano) -> None:
    sd = _state(nano)
    store.save_base("b1", sd, nano.config)
    store.save_delta("d1", sd, "b1", codec="zlib")
    assert [m.identity for m in store.list()] == ["b1", "d1"]
    assert store.manifest("d1").compression == "zlib"
    _assert_bit_equal(store.load_state_dict("d1", sd), sd)
    store.delete("d1")
    assert [m.identity for m in store.list()] == ["b1"]
    assert not store.exists("d1")


def test_concurrent_saves_of_one_identity_publish_once(store, nano) -> None:
    sd = _state(nano)
    with ThreadPoolExecutor(max_workers=3) as pool:
        manifests = list(pool.map(lambda _: store.save_base("race-1", sd, nano.config), range(3)))
    assert len({m.checksum for m in manifests}) == 1
    assert [p.name for p in store.snapshots_dir.iterdir()] == ["race-1"]
    # A writer that died mid-save leaves only a hidden temp dir, which readers never see.
    (store.snapshots_dir / ".tmp-crashed-123-abcd").mkdir()
    (store.snapshots_dir / ".tmp-crashed-123-abcd" / "model.safetensors").write_bytes(b"partial")
    assert [m.identity for m in store.list()] == ["race-1"]


def test_a_dead_writers_marker_beside_published_files_goes_on_the_next_read(store, nano) -> None:
    """A writer killed after publishing its files but before removing its pending marker leaves both;
    the next read removes the orphaned marker (a live writer's marker is left for the writer)."""
    import subprocess

    from firetitan.checkpoints import pending

    store.save_base("step-1", _state(nano), nano.config)
    pending.mark(store.snapshots_dir, "step-1", "base", None)  # this (live) process as the writer
    store.manifest("step-1")
    assert pending.read(store.snapshots_dir, "step-1") is not None
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: its pid no longer runs
    marker_path = store.snapshots_dir / pending.PENDING_DIR / "step-1.json"
    marker_path.write_text(json.dumps({**json.loads(marker_path.read_text()), "writer_pid": child.pid}))
    assert store.manifest("step-1").identity == "step-1"
    assert pending.read(store.snapshots_dir, "step-1") is None
