"""LoRA through peft: full and LoRA cells of one model in one grid, on every
backend, parity between LoRA backends, trainable parameters in the record.

One shared run per session keeps the cost down: the default suite runs
eager (full and LoRA) and ddp on two ranks; the slow suite adds compile,
fsdp and the DeepSpeed stages.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pytest

from conftest import ftbench, records

RECIPE = {"steps": 8, "warmup": 2, "batch_size": 4, "seq_len": 32, "eval_examples": 8, "nproc": 2}
FAST = ("eager", "ddp")
SLOW = ("compile", "fsdp", "zero0", "zero2", "zero3")


@functools.cache
def lora_run(backends: tuple[str, ...]) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="ftbench-lora-"))
    others = [b for b in backends if b != "eager"]
    grid = tmp / "grid.yaml"
    settings = ", ".join(f"{k}: {v}" for k, v in RECIPE.items())
    text = (f"task: [generation]\nbackend: [{', '.join(backends)}]\n"
            f'sweep: {{tuning: [full, "lora:r=4,alpha=8"]}}\nsettings: {{{settings}}}\n')
    if others:
        text += f"exclude:\n  - {{backend: [{', '.join(others)}], tuning: [full]}}\n"
    grid.write_text(text)
    ftbench("run", "--grid", grid, "--out", tmp / "run", timeout=1500, check=True)
    return records(tmp / "run")


def _check(recs: list[dict], backends) -> None:
    full = next(r for r in recs if r["config"]["recipe"]["tuning"] == "full")
    lora = {r["backend"]: r for r in recs if r["config"]["recipe"]["tuning"] != "full"}
    assert set(lora) == set(backends)
    assert full["status"] == "ok"
    for backend, rec in lora.items():
        assert rec["status"] == "ok", (backend, rec.get("error"))
        # Adapters only: a small share of the model, the same for every backend.
        assert rec["total_params"] >= full["total_params"]
        assert 0 < rec["trainable_params"] < 0.05 * full["trainable_params"], backend
        assert rec["trainable_params"] == lora["eager"]["trainable_params"]
        if backend != "eager":
            assert rec["recipe_fingerprint"] == lora["eager"]["recipe_fingerprint"]
            parity = rec["parity"]
            assert parity["status"] == "compared" and parity["passed"], (backend, parity)
    assert lora["eager"]["recipe_fingerprint"] != full["recipe_fingerprint"]
    # LoRA really trained (the loss moved), and not as a silent full-tuning run.
    losses = lora["eager"]["train_loss"]
    assert losses[-1] < losses[0]


def test_lora_and_full_cells_in_one_grid():
    _check(lora_run(FAST), FAST)


@pytest.mark.slow
def test_lora_on_compile_fsdp_and_deepspeed_stages():
    _check(lora_run(("eager",) + SLOW), ("eager",) + SLOW)


def test_default_targets_follow_the_model_family():
    import torch

    from ftbench.harness.cell.lora import apply_lora, default_targets
    from ftbench.harness.grid.finetune_checks import _ShapeTokenizer
    from ftbench.harness.contract.lora_options import parse_lora
    from ftbench.harness.contract.registry import Registry

    reg = Registry.load()
    expected = {"tiny-gpt2": ["c_attn"], "tiny-llama": ["q_proj", "v_proj"], "tiny-t5": ["q", "v"],
                "tiny-bert": ["query", "value"]}
    for name, targets in expected.items():
        preset = reg.model(name)
        head = "classification" if preset.kind == "encoder" else "lm"
        with torch.device("meta"):
            model = preset.build(tokenizer=_ShapeTokenizer(), head=head, num_labels=2)
        assert default_targets(model) == targets, name
        tuned = apply_lora(model, parse_lora("lora"), head, preset.kind)
        lora_names = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in tuned.named_parameters() if "lora_A" in n}
        assert lora_names == set(targets), name
        trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n or "classifier" in n or "score" in n for n in trainable), name


def test_plan_counts_gradients_and_optimizer_state_of_the_lora_parameters_only():
    """`ftbench plan --tuning lora` tunes the model as the worker does: the same trainable count as a real cell."""
    recs = lora_run(FAST)
    by_tuning = {r["config"]["recipe"]["tuning"]: r for r in recs if r["backend"] == "eager"}
    full, lora = by_tuning["full"], by_tuning["lora:r=4,alpha=8"]
    settings = [a for k, v in RECIPE.items() if k != "nproc" for a in (f"--{k.replace('_', '-')}", v)]
    proc = ftbench("plan", "--task", "generation", "--backend", "eager", "--tuning", "lora:r=4,alpha=8",
                   *settings, "--json", check=True)
    [cell] = json.loads(proc.stdout)
    planned = cell["prediction"]["breakdown"]
    trainable = lora["trainable_params"]
    assert 0 < trainable < 0.05 * full["trainable_params"]
    # fp32 gradients and two fp32 AdamW moments for the adapters; the frozen weights are still held.
    assert planned["gradients"] == 4 * trainable
    assert planned["optimizer"] == 2 * 4 * trainable
    assert planned["weights"] == 4 * lora["total_params"]
    # The prediction each run records comes from the same count.
    assert lora["memory_predicted"]["breakdown"]["gradients"] == 4 * trainable
    assert full["memory_predicted"]["breakdown"]["gradients"] == 4 * full["trainable_params"]
