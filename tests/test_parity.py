"""Loss parity between backends, and the recipe fingerprint it relies on.

The end-to-end part reads the shared run of every backend (tests/backend_grid.py):
fp32 on CPU, 8 steps, tiny-gpt2, data-parallel backends on 2 ranks.  The
bounds below were measured on the 2-core development machine (see the
``MEASURED`` comment) and leave about 10x headroom.
"""

from __future__ import annotations

import math

import pytest

from backend_grid import RECIPE, WIDE, all_backends_run, by_backend
from conftest import ftbench, records
from ftbench.harness.contract.config import CellSpec, Recipe
from ftbench.harness.results.parity import TOLERANCES, annotate_parity

# MEASURED (fp32, CPU, 12 steps, 2 ranks, largest relative deviation from eager): zero0-3,
# ddp and fsdp 1.1e-7 (all the same: one reduction order); compile 8.4e-7; zero2-offload and
# zero3-offload (DeepSpeedCPUAdam) 6.7e-7.  Bounds: about 10x the measurement.
TIGHT = 1e-6
COMPILED = 1e-5
OFFLOAD = 1e-5


# ------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def run():
    return all_backends_run()


def test_eager_is_the_reference_and_runs_first(run):
    _, _, recs = run
    assert recs[0]["backend"] == "eager"
    assert recs[0]["parity"]["status"] == "reference"


@pytest.mark.parametrize("backend,bound", [("compile", COMPILED), ("zero0", TIGHT), ("zero1", TIGHT),
                                           ("zero2", TIGHT), ("zero3", TIGHT), ("ddp", TIGHT),
                                           ("fsdp", TIGHT), ("zero2-offload", OFFLOAD)])
def test_backends_match_eager_step_by_step(run, backend, bound):
    _, _, recs = run
    rec = by_backend(recs)[backend]
    eager = by_backend(recs)["eager"]
    assert rec["status"] == "ok", rec["error"]
    assert rec["recipe_fingerprint"] == eager["recipe_fingerprint"]
    p = rec["parity"]
    assert p["status"] == "compared" and p["reference"] == "eager", p
    assert p["steps_compared"] == len(eager["train_loss"]) == 8
    # The field agrees with an independent computation from the two curves.
    dev = max(abs(a - b) / abs(b) for a, b in zip(rec["train_loss"], eager["train_loss"]))
    assert math.isclose(p["max_rel_dev"], dev, rel_tol=1e-9, abs_tol=1e-15)
    assert dev <= bound, f"{backend} deviates {dev:.2e} from eager (measured bound {bound:.0e})"
    assert p["passed"] is True and p["tolerance"] == TOLERANCES["fp32"]


def test_summary_table_shows_parity(run):
    _, stdout, _ = run
    assert "parity" in stdout and "reference" in stdout
    assert stdout.count("✓") >= 8


def test_a_different_recipe_is_not_compared_and_the_table_says_why(run):
    out, _, before = run
    # A second run into the same result set, with another learning rate: the
    # earlier cells stay, the new one (a single-process DeepSpeed cell) has a
    # recipe of its own and must not be compared with them.
    proc = ftbench("run", "--task", "generation", "--backend", "zero1", *RECIPE, "--lr", "0.001", "--out", out,
                   env=WIDE, timeout=600, check=True)
    new = records(out)[len(before):]
    assert len(new) == 1 and new[0]["status"] == "ok", new
    rec = new[0]
    assert rec["recipe_fingerprint"] != before[0]["recipe_fingerprint"]
    p = rec["parity"]
    assert p["status"] == "not-compared" and p.get("max_rel_dev") is None
    assert "recipe differs from eager" in p["reason"] and "lr 0.003→0.001" in p["reason"]
    assert "recipe differs from eager: lr 0.003→0.001" in proc.stdout


# -------------------------------------------------------------- unit level


def _rec(backend, losses, fp="A", status="ok", precision="fp32", lr=3e-3, nproc=1):
    return {"backend": backend, "train_loss": losses, "recipe_fingerprint": fp, "status": status, "nproc": nproc,
            "task": "generation", "model": "tiny-gpt2", "data": "builtin", "cell_id": backend + fp,
            "config": {"recipe": {"precision": precision, "lr": lr}, "columns": []}}


def _is_ref(name):
    return name == "eager"


def test_reference_backend_wins_over_an_earlier_cell():
    earlier = [_rec("compile", [2.0, 1.0]), _rec("eager", [2.0, 1.5])]
    rec = _rec("zero2", [2.0, 1.5])
    annotate_parity(rec, earlier, _is_ref)
    assert rec["parity"]["reference"] == "eager" and rec["parity"]["max_rel_dev"] == 0.0


def test_without_a_reference_backend_the_first_finished_cell_is_the_reference():
    first = _rec("compile", [2.0, 1.0])
    annotate_parity(first, [], _is_ref)
    assert first["parity"]["status"] == "reference"
    second = _rec("zero2", [2.0, 1.1])
    annotate_parity(second, [_rec("eager", [1, 1], status="error"), first], _is_ref)
    p = second["parity"]
    assert p["reference"] == "compile" and p["passed"] is False
    assert math.isclose(p["max_rel_dev"], 0.1) and p["worst_step"] == 1 and "deviates" in p["reason"]


def test_tolerance_depends_on_precision():
    ref = _rec("eager", [2.0, 1.0], precision="bf16")
    rec = _rec("compile", [2.0, 1.01], precision="bf16")
    annotate_parity(rec, [ref], _is_ref)
    assert rec["parity"]["passed"] is True and rec["parity"]["tolerance"] == TOLERANCES["bf16"]
    assert TOLERANCES["fp32"] < TOLERANCES["fp16"] <= TOLERANCES["bf16"]


def test_a_curve_that_goes_non_finite_fails():
    rec = _rec("compile", [2.0, float("nan")], status="diverged")
    annotate_parity(rec, [_rec("eager", [2.0, 1.0])], _is_ref)
    assert rec["parity"]["passed"] is False and rec["parity"]["max_rel_dev"] == math.inf


def test_different_recipe_names_the_difference():
    rec = _rec("compile", [2.0, 1.0], fp="B", lr=1e-3)
    annotate_parity(rec, [_rec("eager", [2.0, 1.0], fp="A")], _is_ref)
    assert rec["parity"]["status"] == "not-compared"
    assert rec["parity"]["reason"] == "recipe differs from eager: lr 0.003→0.001"


def test_failed_cell_is_not_compared():
    rec = _rec("zero3", [], status="error")
    annotate_parity(rec, [_rec("eager", [2.0])], _is_ref)
    assert rec["parity"]["status"] == "not-compared" and "error" in rec["parity"]["reason"]


# ------------------------------------------------------------ fingerprint


def _fp(**changes):
    spec = CellSpec(task="generation", backend="eager", model="tiny-gpt2")
    recipe_keys = {k: v for k, v in changes.items() if k in Recipe.__dataclass_fields__}
    cell_keys = {k: v for k, v in changes.items() if k not in recipe_keys}
    spec = spec.with_(recipe=Recipe(**recipe_keys), **cell_keys)
    return spec.fingerprint()


@pytest.mark.parametrize("change", [
    {"lr": 1e-3}, {"seed": 1}, {"batch_size": 16}, {"steps": 60}, {"schedule": "linear"},
    {"lr_warmup_steps": 3}, {"max_grad_norm": 0.5}, {"weight_decay": 0.0}, {"betas": (0.9, 0.95)},
    {"eps": 1e-6}, {"precision": "bf16"}, {"tuning": "freeze-embeddings"}, {"seq_len": 32},
    {"padding": "longest"}, {"model": "tiny-llama"}, {"data": "/some/dir"}, {"task": "generation:x=1"},
    {"columns": (("text", "sentence"),)},
])
def test_fingerprint_covers_the_math(change):
    assert _fp(**change) != _fp()


@pytest.mark.parametrize("change", [
    {"backend": "zero3"}, {"nproc": 2}, {"grad_accum": 2}, {"grad_checkpointing": True}, {"warmup": 3},
    {"eval_examples": 8}, {"repeat": 1},
])
def test_fingerprint_ignores_how_the_step_is_run(change):
    assert _fp(**change) == _fp()


def test_grid_runs_reference_backends_first():
    from ftbench.harness.grid.expand import Grid
    from ftbench.harness.contract.registry import Registry

    cells = Grid(axes={"task": ["generation"], "backend": ["compile", "ddp", "eager"]},
                 settings={"nproc": 2}).cells(Registry.load())
    assert [str(c.backend) for c in cells] == ["eager", "compile", "ddp"]


@pytest.mark.slow
def test_gradient_accumulation_keeps_parity(tmp_path):
    # grad_accum splits the same global batch differently, so it is not part of the
    # fingerprint: cells with 2 micro-batches per rank are compared with eager's 1.
    # This checks DeepSpeed's division by its accumulation steps, DDP's no_sync and
    # FSDP's per-micro-batch reduce-scatter against the runner's normalisation.
    out = tmp_path / "out"
    recipe = ["--steps", "8", "--warmup", "2", "--batch-size", "8", "--seq-len", "32", "--eval-examples", "8"]
    ftbench("run", "--task", "generation", "--backend", "eager", *recipe, "--out", out, check=True)
    ftbench("run", "--task", "generation", "--backend", "zero2", "--backend", "ddp", "--backend", "fsdp",
            "--nproc", "2", "--grad-accum", "2", *recipe, "--out", out, check=True)
    recs = by_backend(records(out))
    for backend in ("zero2", "ddp", "fsdp"):
        p = recs[backend]["parity"]
        assert recs[backend]["config"]["recipe"]["grad_accum"] == 2
        assert p["status"] == "compared" and p["reference"] == "eager", (backend, p)
        assert p["max_rel_dev"] <= TIGHT, (backend, p)


def test_late_drift_is_reported_but_an_early_deviation_fails():
    from ftbench.harness.results.parity import WINDOW, parity_label

    steps = WINDOW + 20
    ref = _rec("eager", [2.0] * steps)
    # Same math: identical in the window, then rounding drift grows (as measured on tiny-t5).
    drift = [2.0] * WINDOW + [2.0 * (1 + 1e-7 * 3 ** k) for k in range(20)]
    rec = _rec("ddp", drift)
    annotate_parity(rec, [ref], _is_ref)
    p = rec["parity"]
    assert p["passed"] is True and p["window_max_rel_dev"] == 0.0 and p["max_rel_dev"] > TOLERANCES["fp32"]
    # The step where the curve left the tolerance is named, so a differing time to target can be explained.
    first_out = WINDOW + next(k for k in range(20) if 1e-7 * 3 ** k > TOLERANCES["fp32"])
    assert p["left_tolerance_at_step"] == first_out
    assert f"drift {p['max_rel_dev']:.1e} from step {first_out}" in parity_label(p)
    # Different math: off by 1e-3 at step 2, inside the window.
    wrong = _rec("ddp", [2.0, 2.0, 2.002] + [2.0] * (steps - 3))
    annotate_parity(wrong, [ref], _is_ref)
    assert wrong["parity"]["passed"] is False and "at step 2" in wrong["parity"]["reason"]
