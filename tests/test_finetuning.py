"""Fine-tuning real checkpoints: recipe defaults by origin, quality before and
after, streamed batches, packing, and the pre-run checks of these settings.

The "checkpoint" is pre-trained by the test itself (examples/pretrain_small.py,
a few dozen steps of a 2-layer GPT-2 on the generation task's built-in text)
and saved as a local model directory: nothing is downloaded.
"""

from __future__ import annotations

import functools
import importlib.util
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT, TINY, ftbench, records


def _pretrain_module():
    spec = importlib.util.spec_from_file_location("pretrain_small", ROOT / "examples" / "pretrain_small.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@functools.cache
def checkpoint(width: int = 32, vocab: int = 2000) -> str:
    """A small GPT-2 pre-trained on the built-in generation text, saved as a model directory."""
    mod = _pretrain_module()
    out = Path(tempfile.mkdtemp(prefix="ftbench-ckpt-")) / f"gpt2-{width}"
    return mod.pretrain(mod.corpus("builtin"), str(out), "gpt2", steps=40, width=width, layers=2 if width > 16 else 1,
                        seq_len=64, batch=8, vocab=vocab)


@functools.cache
def finetuned_with_defaults() -> dict:
    out = Path(tempfile.mkdtemp(prefix="ftbench-ft-")) / "run"
    ftbench("run", "--task", "generation", "--backend", "eager", "--model", checkpoint(), *TINY, "--out", out,
            check=True)
    (rec,) = records(out)
    return rec


def test_pretrained_checkpoint_gets_the_fine_tuning_recipe_and_improves():
    rec = finetuned_with_defaults()
    assert rec["status"] == "ok"
    recipe = rec["config"]["recipe"]
    assert rec["recipe_defaults"] == recipe["recipe_defaults"] == "pretrained"
    assert (recipe["lr"], recipe["schedule"], recipe["weight_decay"]) == (5e-5, "linear", 0.0)
    before = rec["metrics_before"]
    assert set(before) >= {"eval_loss", "perplexity"}
    assert rec["eval_loss"] < before["eval_loss"], (before, rec["eval_loss"])
    assert rec["eval_before_s"] > 0 and not rec.get("warnings")
    assert 0 < rec["pad_fraction"] < 1


def test_explicit_settings_beat_the_defaults_of_either_origin():
    from ftbench.harness.grid.expand import Grid
    from ftbench.harness.contract.registry import Registry

    reg = Registry.load()

    def recipe(model, **settings):
        (cell,) = Grid(axes={"task": ["generation"], "backend": ["eager"], "model": [model]},
                       settings=settings).cells(reg)
        return cell

    hub, preset = recipe("someone/some-model"), recipe("tiny-gpt2")
    assert (hub.recipe.lr, hub.recipe.recipe_defaults) == (5e-5, "pretrained")
    assert (preset.recipe.lr, preset.recipe.schedule, preset.recipe.recipe_defaults) == (3e-3, "cosine", "scratch")
    mine = recipe("someone/some-model", lr=1e-4, schedule="cosine")
    assert (mine.recipe.lr, mine.recipe.schedule, mine.recipe.weight_decay) == (1e-4, "cosine", 0.0)
    forced = recipe("tiny-gpt2", recipe_defaults="pretrained")
    assert forced.recipe.lr == 5e-5 and forced.fingerprint() != preset.fingerprint()
    # Defaults and packing enter the fingerprint only when they differ from what earlier runs did.
    assert recipe("tiny-gpt2", packing=True).fingerprint() != preset.fingerprint()
    from ftbench.harness.contract.config import Recipe

    assert Recipe().fingerprint("t", {}, "m", "d") == Recipe(packing=False).fingerprint("t", {}, "m", "d")


def test_tuning_that_worsens_held_out_loss_is_flagged_in_the_record():
    from ftbench.harness.results.record import tuning_made_worse

    rec = {"status": "ok", "eval_loss": 6.7, "metrics_before": {"eval_loss": 4.7}}
    assert "worse" in tuning_made_worse(rec) and "--lr" in tuning_made_worse(rec)
    assert tuning_made_worse({**rec, "eval_loss": 4.0}) is None


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_steps(tmp_path):
    """20 and 600 steps of one cell peak within 5%: batches are collated per step, not all up front
    (pre-collated, 600 steps of 32 x 256 tokens would add ~120 MB to a ~400 MB process).

    Slow (600 steps); the default suite checks the same property in-process with
    test_step_stream_collates_each_step_once_and_keeps_no_batch."""
    model = checkpoint(width=8, vocab=300)  # a few ms per step even at 32 x 256 tokens
    peaks = {}
    for steps in (20, 600):
        out = tmp_path / f"s{steps}"
        ftbench("run", "--task", "generation", "--backend", "eager", "--model", model, "--steps", steps,
                "--warmup", "2", "--batch-size", "32", "--seq-len", "256", "--eval-examples", "8", "--out", out,
                "--time-limit", "3600", timeout=3600, check=True)
        (rec,) = records(out)
        assert rec["status"] == "ok"
        peaks[steps] = rec["peak_memory_bytes"]
    assert abs(peaks[600] - peaks[20]) <= 0.05 * peaks[20], peaks


def test_packing_fills_rows_and_raises_throughput(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("task: [generation]\nbackend: [eager]\nsweep: {packing: [false, true]}\n"
                    "settings: {steps: 12, warmup: 2, batch_size: 8, seq_len: 64, eval_examples: 16}\n")
    ftbench("run", "--grid", grid, "--out", tmp_path / "run", check=True)
    recs = {r["config"]["recipe"]["packing"]: r for r in records(tmp_path / "run")}
    packed, padded = recs[True], recs[False]
    assert packed["status"] == padded["status"] == "ok"
    assert packed["pad_fraction"] < 0.02 < 0.3 < padded["pad_fraction"]
    assert packed["packed_rows"] > 0 and packed["recipe_fingerprint"] != padded["recipe_fingerprint"]
    # Same padded shape per step, about three times the real tokens: far more than timing noise.
    assert packed["tokens_per_s"] > 1.5 * padded["tokens_per_s"]


def test_pack_concatenates_in_order_and_keeps_labels():
    from ftbench.harness.contract.api import Encoded
    from ftbench.harness.cell.packing import pack

    rows = [Encoded([1, 5, 6, 2], [-100, 5, 6, 2]), Encoded([1, 7, 2], [-100, 7, 2]), Encoded([1, 8, 2], [-100, 8, 2])]
    packed = pack(rows, 4)
    assert [r.input_ids for r in packed] == [[1, 5, 6, 2], [1, 7, 2, 1]]  # the partial last row is dropped
    assert packed[1].labels == [-100, 7, 2, -100]


@pytest.mark.parametrize("args, phrases", [
    (["--tuning", "lora:rank=8"], ["unknown LoRA option 'rank=8'", "r, alpha, dropout, targets"]),
    (["--tuning", "lora:targets=nonexistent"], ["match no module", "c_attn", "targets="]),
    (["--task", "classification", "--packing"], ["packing needs a task", "Drop --packing"]),
    (["--task", "translation", "--packing"], ["decoder (causal LM) models", "tiny-t5"]),
])
def test_bad_fine_tuning_settings_exit_2_before_any_cell(tmp_path, args, phrases):
    if "--task" not in args:
        args = ["--task", "generation", *args]
    proc = ftbench("run", *args, "--backend", "eager", *TINY, "--out", tmp_path / "out")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    text = " ".join(proc.stderr.split())
    for phrase in phrases:
        assert phrase in text, text
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_lora_without_peft_exits_2_with_the_install_hint(tmp_path):
    blocked = tmp_path / "block" / "peft"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('peft is blocked for this test')\n")
    proc = ftbench("run", "--task", "generation", "--backend", "eager", "--tuning", "lora", *TINY,
                   "--out", tmp_path / "out", env={"PYTHONPATH": str(tmp_path / "block")})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pip install 'ftbench[lora]'" in " ".join(proc.stderr.split())


def test_report_and_run_table_show_the_metric_before_tuning():
    from types import SimpleNamespace

    from ftbench.harness.analysis.report import display_frame, records_frame, summary_frame
    from ftbench.harness.running.progress import metric_change

    base = {"cell_id": "a", "task": "generation", "backend": "eager", "model": "m", "status": "ok",
            "metric": "perplexity", "metric_value": 75.0, "higher_is_better": False, "config": {"recipe": {}}}
    tuned = dict(base, metrics_before={"perplexity": 113.0, "eval_loss": 4.73})
    shown = display_frame(summary_frame(records_frame(SimpleNamespace(records=[tuned, dict(base, cell_id="b")]))))
    assert list(shown["metric"]) == ["perplexity ↓ 75 (from 113)", "perplexity ↓ 75"]
    assert metric_change(tuned) == " (from 113)" and metric_change(base) == ""


def test_step_stream_collates_each_step_once_and_keeps_no_batch():
    import gc
    import weakref

    from ftbench.harness.contract.api import Encoded
    from ftbench.harness.cell.batches import StepStream, batch_plan
    from ftbench.harness.cell.modeling import collate
    from ftbench.harness.contract.config import Recipe

    rows = [Encoded([1] + [5 + i % 7] * (3 + i % 5) + [2], [-100] + [5 + i % 7] * (3 + i % 5) + [2]) for i in range(50)]
    recipe = Recipe(steps=600, warmup=1, batch_size=4, seq_len=16)

    def make(ix):
        return collate([rows[i] for i in ix], "decoder", "lm", 0, 16, "max_length")

    plan = batch_plan(len(rows), recipe, 1, 0, recipe.seed)
    stream = StepStream(plan, make, world_size=1, pin=False)
    alive = []
    for micro, counts in stream:
        alive.append(weakref.ref(micro[0]["input_ids"]))
    del micro
    gc.collect()
    assert sum(r() is not None for r in alive) == 0
    assert len(stream.counts) == len(stream.shapes) == 600
    # The same batches, in the same order, as collating each planned micro-batch by hand.
    by_hand = [[make(ix) for ix in micros] for _, micros in plan[:5]]
    again = list(StepStream(plan[:5], make, 1, False))
    assert len(again) == 5
    for m1, (m2, _) in zip(by_hand, again):
        assert len(m1) == len(m2) and all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(m1, m2))


def test_lora_on_a_checkpoint_defaults_to_the_adapter_learning_rate_and_explicit_wins():
    from ftbench.harness.contract.registry import Registry
    from ftbench.harness.grid.expand import Grid

    reg = Registry.load()

    def cell(model, **settings):
        (c,) = Grid(axes={"task": ["generation"], "backend": ["eager"], "model": [model]},
                    settings=settings).cells(reg)
        return c

    lora = cell("someone/some-model", tuning="lora")
    assert (lora.recipe.lr, lora.recipe.schedule, lora.recipe.recipe_defaults) == (2e-4, "linear", "pretrained")
    assert cell("someone/some-model", tuning="lora:r=4,alpha=8").recipe.lr == 2e-4
    assert cell("someone/some-model", tuning="freeze-embeddings").recipe.lr == 5e-5  # not an adapter
    explicit = cell("someone/some-model", tuning="lora", lr=5e-5)
    assert explicit.recipe.lr == 5e-5 and explicit.fingerprint() != lora.fingerprint()
    assert cell("tiny-gpt2", tuning="lora").recipe.lr == 3e-3  # from scratch: the scratch table


@pytest.mark.slow
def test_lora_without_lr_improves_a_checkpoint_clearly_more_than_at_the_full_tuning_rate(tmp_path):
    """The same LoRA cell, same steps: the adapter default (2e-4) against Trainer's 5e-5."""
    out = tmp_path / "run"
    for extra in ([], ["--lr", "5e-5"]):
        ftbench("run", "--task", "generation", "--backend", "eager", "--model", checkpoint(), "--tuning", "lora",
                *TINY, *extra, "--out", out, check=True)
    gain = {}
    for rec in records(out):
        assert rec["status"] == "ok" and rec["recipe_defaults"] == "pretrained", rec.get("error")
        gain[rec["config"]["recipe"]["lr"]] = rec["metrics_before"]["perplexity"] - rec["metric_value"]
    assert set(gain) == {2e-4, 5e-5}
    # Measured: 0.044 against 0.011 perplexity in 12 steps (0.14 against 0.04 in 40); twice is a wide margin.
    assert gain[5e-5] > 0 and gain[2e-4] > 2 * gain[5e-5], gain
