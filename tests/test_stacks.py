"""The stacks people run (accelerate, the HF Trainer) and the fairness check between cells."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT, ftbench, records

#: Two micro-batches per step, so that a per-micro-batch loss mean really differs from the recipe's.
RECIPE = ["--steps", "4", "--warmup", "1", "--batch-size", "4", "--grad-accum", "2", "--seq-len", "32",
          "--eval-examples", "4"]
PLANTED = {"FTBENCH_PLUGINS_EXTRA": "fairness_plugin",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])),
           "COLUMNS": "300"}


@functools.cache
def planted_run() -> Path:
    """eager, accelerate (the same math through another stack), two cells with one planted difference each,
    and the Trainer's own loop."""
    out = Path(tempfile.mkdtemp(prefix="ftbench-fairness-")) / "run"
    ftbench("run", "--task", "generation", "--backend", "eager", "--backend", "accelerate", "--backend", "permicro",
            "--backend", "eagerattn", "--backend", "trainer", *RECIPE, "--out", out, env=PLANTED, timeout=600,
            check=True)
    return out


def by_backend(out) -> dict[str, dict]:
    return {r["backend"]: r for r in records(out)}


def test_records_say_what_each_cell_computed():
    recs = by_backend(planted_run())
    eager = recs["eager"]
    assert eager["as_run"]["attention"] == "sdpa"
    assert eager["as_run"]["loss_normalisation"].startswith("sum over micro-batches and ranks")
    assert len(eager["lr_per_step"]) == 4 and eager["lr_per_step"][0] == pytest.approx(3e-3 / 1)
    assert len(eager["step_tokens"]["loss"]) == 4 and all(n > 0 for n in eager["step_tokens"]["loss"])
    # The same rows in the same order, whoever ran them.
    assert len({r["as_run"]["data_order_digest"] for r in recs.values()}) == 1


def test_explain_names_a_planted_loss_normalisation():
    out = planted_run()
    proc = ftbench("explain", out, "eager", "permicro", env=PLANTED)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "loss normalisation" in proc.stdout and "mean per micro-batch" in proc.stdout
    assert "changes the math" in proc.stdout and "attention" not in proc.stdout
    # The planted normalisation is real: its losses leave the reference's.
    assert by_backend(out)["permicro"]["parity"]["max_rel_dev"] > 1e-4


def test_explain_names_a_planted_attention_implementation():
    proc = ftbench("explain", planted_run(), "eager", "eagerattn", env=PLANTED)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "attention implementation: sdpa ≠ eager (speed/rounding only)" in proc.stdout
    assert "loss normalisation" not in proc.stdout


def test_equal_cells_show_no_difference():
    proc = ftbench("explain", planted_run(), "eager", "accelerate", env=PLANTED)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no differences" in proc.stdout


def test_report_shows_a_differs_column():
    out = planted_run()
    proc = ftbench("report", out, env=PLANTED, check=True)
    md = (out / "report" / "summary.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| task"))
    assert "differs" in header
    rows = {line.split("|")[2].strip(): line for line in md.splitlines() if line.startswith("| generation")}
    assert "math: loss norm" in rows["permicro"]
    assert "other: attention" in rows["eagerattn"]
    assert "| none" in rows["accelerate"]
    assert "did not compute the same run" in md and "permicro" in md.split("did not compute the same run")[1]
    assert proc.returncode == 0


def test_explain_rejects_an_unknown_cell_with_the_candidates():
    proc = ftbench("explain", planted_run(), "eager", "nosuch", env=PLANTED)
    assert proc.returncode == 2
    assert "no cell 'nosuch'" in proc.stderr and "generation/permicro" in proc.stderr


def test_stacks_missing_are_unavailable_with_the_reason(monkeypatch):
    from ftbench.plugins import accelerate_backend, hf_trainer
    from ftbench import Unavailable

    monkeypatch.setattr(accelerate_backend, "package_version", lambda name: None)
    monkeypatch.setattr(hf_trainer, "package_version", lambda name: None if name == "accelerate" else "5.25.0")
    with pytest.raises(Unavailable, match="pip install accelerate"):
        accelerate_backend.AccelerateEngine.check_available({})
    with pytest.raises(Unavailable, match="needs accelerate"):
        hf_trainer.TrainerEngine.check_available({})
    monkeypatch.setattr(hf_trainer, "package_version", lambda name: "4.40.0" if name == "transformers" else "1.0")
    with pytest.raises(Unavailable, match=r"transformers>=4\.57"):
        hf_trainer.TrainerEngine.check_available({})


def test_bad_stack_options_are_rejected_before_any_cell():
    proc = ftbench("run", "--backend", "accelerate:dist=horovod", "--out", tempfile.mkdtemp())
    assert proc.returncode == 2 and "invalid accelerate dist='horovod'" in proc.stderr
    proc = ftbench("run", "--backend", "trainer:stage=2", "--out", tempfile.mkdtemp())
    assert proc.returncode == 2 and "needs dist=deepspeed" in proc.stderr


def test_deepspeed_buffers_are_sized_from_the_model_as_hugging_face_does():
    from ftbench.plugins.deepspeed_zero import hf_auto_sizing

    assert hf_auto_sizing(576, 3) == {"reduce_bucket_size": 331776, "stage3_prefetch_bucket_size": 298598,
                                      "stage3_param_persistence_threshold": 5760}
    assert hf_auto_sizing(576, 2) == {"reduce_bucket_size": 331776}
    assert hf_auto_sizing(576, 0) == {}


def test_memory_model_follows_the_buckets_deepspeed_is_given():
    """The predicted ZeRO-2 reduction phase is hidden² buckets, or the bucket a ds.* option sets."""
    from ftbench.harness.contract.config import Recipe
    from ftbench.harness.contract.memory_model import ModelShape, ParamCounts, predict
    from ftbench.plugins.deepspeed_zero import DeepSpeedEngine

    counts = ParamCounts(total=135_000_000, trainable=135_000_000, largest_layer=28_000_000)
    shape = ModelShape("decoder", hidden=576, layers=30, ffn=1536, vocab=49152, heads=9)
    recipe = Recipe(seq_len=64)

    def reduction(options):
        plan = DeepSpeedEngine.memory_plan({"stage": 2, **options}, 2)
        return predict(counts, shape, recipe, plan, 2, 2).phases["gradient reduction"]

    assert reduction({}) == 2 * 4 * 576 ** 2
    assert reduction({"ds.zero_optimization.reduce_bucket_size": 5e8}) == 2 * 4 * 135_000_000


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sharding_saves_memory_at_135m_parameters():
    """SmolLM2-135M's shape on 2 ranks: ZeRO-3 (buffers sized as Hugging Face sizes them) and FSDP
    train below DDP's per-rank peak, with loss parity.  With DeepSpeed's raw 5e8/5e7 buffers ZeRO-3
    used more than DDP at this size."""
    out = Path(tempfile.mkdtemp(prefix="ftbench-135m-")) / "run"
    ftbench("run", "--task", "generation", "--model", "smollm2-135m-shape", "--backend", "ddp", "--backend", "fsdp",
            "--backend", "zero3", "--nproc", "2", "--steps", "3", "--warmup", "1", "--batch-size", "4",
            "--seq-len", "128", "--eval-examples", "2", "--time-limit", "1200", "--out", out, timeout=3600, check=True)
    recs = by_backend(out)
    assert all(r["status"] == "ok" for r in recs.values()), {b: r["error"] for b, r in recs.items()}
    ddp = recs["ddp"]["train_peak_memory_bytes"]
    for backend in ("fsdp", "zero3"):
        assert recs[backend]["train_peak_memory_bytes"] < ddp, (backend, recs[backend]["train_peak_memory_bytes"], ddp)
        assert recs[backend]["parity"]["passed"], recs[backend]["parity"]
    sizing = recs["zero3"]["backend_stats"]["deepspeed_config"]["zero_optimization"]
    assert sizing["reduce_bucket_size"] == 576 ** 2 and sizing["stage3_param_persistence_threshold"] == 5760


def test_compare_notes_pairs_that_did_not_compute_the_same_run():
    from ftbench.harness.analysis.compare import fairness_notes

    recs = by_backend(planted_run())
    notes = fairness_notes("generation · eager", [recs["eager"]], [recs["permicro"]])
    assert len(notes) == 1 and "loss normalisation" in notes[0] and "did not compute the same run" in notes[0]
    assert fairness_notes("generation · eager", [recs["eager"]], [recs["eagerattn"]]) == []


def test_deepspeed_config_sizes_buffers_from_the_model_and_ds_options_win():
    import torch

    from ftbench import EngineContext, Recipe
    from ftbench.plugins.deepspeed_zero import DeepSpeedEngine

    def config(options, hidden):
        ctx = EngineContext(recipe=Recipe(), device=torch.device("cpu"), loss_fn=None, world_size=2)
        return DeepSpeedEngine(DeepSpeedEngine.validate_options(options), ctx).build_config(hidden)["zero_optimization"]

    assert config({"stage": 3}, 64) == {"stage": 3, "reduce_bucket_size": 4096, "stage3_prefetch_bucket_size": 3686,
                                        "stage3_param_persistence_threshold": 640}
    assert config({"stage": 2, "ds.zero_optimization.reduce_bucket_size": 5e8}, 64)["reduce_bucket_size"] == 5e8
    assert config({"stage": 0}, 64) == {"stage": 0}


def test_trainer_knows_which_models_normalise_by_the_item_count():
    """The Trainer scales the loss of every model whose forward takes **kwargs; only some use the count."""
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel, LlamaForCausalLM, T5ForConditionalGeneration

    from ftbench.plugins.hf_trainer import model_uses_item_count

    assert model_uses_item_count(GPT2LMHeadModel) and model_uses_item_count(LlamaForCausalLM)
    assert not model_uses_item_count(T5ForConditionalGeneration)
    assert not model_uses_item_count(GPT2ForSequenceClassification)


def test_the_trainer_runs_its_own_loop_over_the_same_rows_and_names_how_it_differs():
    recs = by_backend(planted_run())
    eager, trainer = recs["eager"], recs["trainer"]
    assert trainer["status"] == "ok" and len(trainer["train_loss"]) == len(trainer["step_times_s"]) == 4
    assert trainer["as_run"]["data_order_digest"] == eager["as_run"]["data_order_digest"]
    assert trainer["lr_per_step"] == pytest.approx(eager["lr_per_step"], rel=1e-12)
    # Same math but for what the record names: close to eager's curve, with the reasons listed.
    assert trainer["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-3)
    named = " ".join(trainer["as_run"]["differences"])
    assert "collation" in named and "weight decay" in named
    proc = ftbench("explain", planted_run(), "eager", "trainer", env=PLANTED)
    assert proc.returncode == 1 and "weight decay" in proc.stdout and "changes the math" in proc.stdout
