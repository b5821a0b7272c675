"""Optimizations (--opt, --ladder, --ablation): the plugin kind, the axis, the built-ins' math,
the packing contamination probe, the memory model's terms and the ladder report."""

from __future__ import annotations

import json

import pytest
import torch

from ftbench.harness.cell.packing import pack
from ftbench.harness.cell.packing_probe import contamination_probe
from ftbench.harness.contract.api import Encoded, FtbenchError
from ftbench.harness.contract.config import CellSpec, Recipe
from ftbench.harness.contract.registry import Registry
from ftbench.harness.grid.expand import Grid, opt_axis
from ftbench.harness.grid.memplan import plan_cell
from ftbench.plugins import _opt_kernels

from conftest import TINY, ftbench, records


@pytest.fixture(scope="module")
def reg():
    return Registry.load()


def _llama(vocab=97, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def test_list_shows_each_optimization_and_why_not():
    listing = json.loads(ftbench("list", "--json", check=True).stdout)
    opts = {o["name"]: o for o in listing["optimizations"]}
    assert {"attn", "chunked-ce", "liger", "adamw", "adamw-8bit", "optim-in-backward", "act-offload",
            "doc-packing"} <= set(opts)
    assert opts["chunked-ce"]["available"] and opts["chunked-ce"]["plugin"] == "optimizations"
    if listing["optimizations"][0]["device"] == "cpu":
        assert not opts["act-offload"]["available"] and "cuda" in opts["act-offload"]["unavailable_because"]
        assert not opts["liger"]["available"]
    assert opts["adamw-8bit"]["math"] == "numerics" and opts["chunked-ce"]["math"] == "tolerance"


def test_unsupported_combinations_exit_2_before_any_cell(tmp_path):
    out = tmp_path / "out"
    proc = ftbench("run", "--backend", "ddp", "--nproc", "2", "--opt", "optim-in-backward", "--out", out, *TINY)
    assert proc.returncode == 2 and "optim-in-backward" in proc.stderr and "'ddp'" in proc.stderr
    proc = ftbench("run", "--task", "translation", "--backend", "eager", "--opt", "chunked-ce", "--out", out, *TINY)
    assert proc.returncode == 2 and "decoder" in proc.stderr and "encoder-decoder" in proc.stderr
    proc = ftbench("run", "--backend", "eager", "--opt", "chunked-cee", "--out", out, *TINY)
    assert proc.returncode == 2 and "did you mean 'chunked-ce'" in proc.stderr.lower()
    assert not (out / "results.jsonl").exists()


def test_opt_axis_ids_and_fingerprints(reg):
    cells = Grid(axes={"task": ["generation"], "backend": ["eager"], "opt": ["", "chunked-ce", "adamw-8bit"]},
                 settings={"steps": 4, "warmup": 1}).cells(reg)
    plain, chunked, eight = cells
    # No --opt: the id of a cell from before optimizations existed.
    assert plain.cell_id == CellSpec(task="generation", backend="eager", model="tiny-gpt2",
                                     recipe=Recipe(steps=4, warmup=1)).cell_id
    assert len({plain.cell_id, chunked.cell_id, eight.cell_id}) == 3
    assert chunked.fingerprint() == plain.fingerprint()  # same math: parity-checked against the plain cell
    assert eight.fingerprint() != plain.fingerprint() and eight.recipe.numerics == "adamw-8bit"
    assert opt_axis([], ["a", "b:x=1", "c"], []) == ["", "a", "a+b:x=1", "a+b:x=1+c"]
    assert opt_axis(["attn:impl=eager"], ["attn:impl=sdpa"], []) == ["attn:impl=eager", "attn:impl=sdpa"]
    assert opt_axis([], [], ["a", "b"]) == ["", "a", "b"]
    with pytest.raises(FtbenchError, match="--ladder and --ablation"):
        opt_axis([], ["a"], ["b"])


def test_chunked_loss_equals_the_full_loss_and_its_gradients():
    full, chunked = _llama(), _llama()
    _opt_kernels.install_chunked_head(chunked, chunks=7)
    ids = torch.randint(0, 97, (3, 20))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    logits = full(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                             ignore_index=-100, reduction="sum")
    got = _opt_kernels.chunked_loss_fn(chunked)(chunked, batch)
    want.backward()
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    w_full, w_chunked = full.lm_head.weight.grad, chunked.get_output_embeddings().linear.weight.grad
    assert torch.allclose(w_full, w_chunked, rtol=1e-4, atol=1e-6)  # other summation order
    # Without targets it is the output layer (generation).
    assert chunked(input_ids=ids).logits.shape == (3, 20, 97)


def test_optimizer_in_backward_steps_as_adamw_does():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.AdamW(a.parameters(), lr=0.1)
    opt_b = _opt_kernels.InBackward(b.parameters(), lambda ps: torch.optim.AdamW(ps, lr=0.1))
    for _ in range(3):
        x = torch.randn(5, 8)
        a(x).square().sum().backward()
        opt_a.step()
        opt_a.zero_grad()
        b(x).square().sum().backward()  # steps inside backward
        assert all(p.grad is None for p in b.parameters())  # each gradient freed once applied
    assert torch.allclose(a.weight, b.weight, atol=1e-6) and torch.allclose(a.bias, b.bias, atol=1e-6)


def _docs(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        length = int(torch.randint(5, 14, (1,), generator=g))
        ids = [1] + torch.randint(3, 97, (length,), generator=g).tolist() + [2]
        docs.append(Encoded(ids, [-100] + ids[1:]))
    return docs


def test_document_packing_keeps_each_documents_loss_and_cross_packing_departs():
    model, docs = _llama(), _docs()
    rows = pack(docs, 32, documents=True)
    assert all(len(r.input_ids) == 32 and r.position_ids[0] >= 0 for r in rows)  # full rows: no padding
    masked = contamination_probe(model, docs, 32, documents=True, device=torch.device("cpu"))
    crossing = contamination_probe(model, docs, 32, documents=False, device=torch.device("cpu"))
    assert masked["documents"] >= 4 and masked["max_rel_dev"] < 1e-5
    assert crossing["documents"] == masked["documents"] and crossing["max_rel_dev"] > 1e-3


def test_plan_predicts_less_with_chunked_loss_and_8bit_states(reg):
    cells = Grid(axes={"task": ["generation"], "backend": ["eager"], "model": ["llama-32k"]},
                 ablation=["chunked-ce", "adamw-8bit", "optim-in-backward"],
                 settings={"steps": 4, "warmup": 1}).cells(reg)
    pred = {c.opt: plan_cell(reg, c).prediction for c in cells}
    base = pred[""]
    assert pred["chunked-ce"].device_bytes < base.device_bytes
    assert pred["chunked-ce"].activation_bytes < base.activation_bytes
    assert pred["adamw-8bit"].breakdown["optimizer"] * 4 == base.breakdown["optimizer"]
    assert pred["optim-in-backward"].breakdown["gradients"] < base.breakdown["gradients"]


@pytest.mark.slow
def test_a_ladder_runs_and_the_report_shows_it(tmp_path):
    out = tmp_path / "out"
    ftbench("run", "--task", "generation", "--backend", "eager", "--opt", "attn:impl=eager", "--ladder",
            "attn:impl=sdpa,chunked-ce:chunks=4,adamw:impl=foreach,optim-in-backward,doc-packing", "--out", out,
            *TINY, check=True)
    recs = records(out)
    assert [r["status"] for r in recs] == ["ok"] * 6
    assert all(r["parity"].get("passed") for r in recs[1:4])  # exact ones: parity with the baseline
    assert recs[4]["opt_verdict"]["kind"] == "numerics changed" and recs[4]["opt_verdict"]["passed"] is not None
    assert recs[5]["packing_probe"]["max_rel_dev"] < 1e-5 and recs[5]["pad_fraction"] < 0.01
    ftbench("report", out, check=True)
    md = (out / "report" / "summary.md").read_text()
    assert "## Optimization ladder" in md and "+chunked-ce:chunks=4" in md
    assert (out / "report" / "plots" / "ladder.png").exists()


def _rung(opt, numerics="", tokens=None, peak=None, eval_loss=4.0, metric=60.0, optimizations=()):
    from results_factory import make_record

    rec = make_record(recipe=Recipe(steps=12, warmup=2, seq_len=32, batch_size=4, numerics=numerics),
                      metric_value=metric)
    rec["config"]["opt"] = opt
    rec["cell_id"] = f"{rec['cell_id']}-{opt}"
    rec["eval_loss"], rec["tokens_per_s"], rec["train_peak_memory_bytes"] = eval_loss, tokens, peak
    rec["optimizations"] = [{"spec": s, "math": m, "tolerance": 0.05} for s, m in optimizations]
    return rec


def test_numerics_changed_is_judged_on_quality_within_the_declared_tolerance():
    from ftbench.harness.results.opt_verdict import annotate_optimizations, verdict_label

    base = _rung("")
    ok = _rung("adamw-8bit", "adamw-8bit", eval_loss=4.1, metric=61.0, optimizations=[("adamw-8bit", "numerics")])
    bad = _rung("adamw-8bit", "adamw-8bit", eval_loss=4.4, metric=66.0, optimizations=[("adamw-8bit", "numerics")])
    better = _rung("doc-packing", "doc-packing", eval_loss=3.0, metric=40.0,
                   optimizations=[("doc-packing", "numerics")])
    for rec in (ok, bad, better):
        annotate_optimizations(rec, [base])
    assert ok["opt_verdict"]["passed"] and ok["opt_verdict"]["eval_loss_change"] == pytest.approx(0.025)
    assert not bad["opt_verdict"]["passed"]  # 10% worse than the baseline, tolerance 5%
    assert better["opt_verdict"]["passed"]  # better always passes
    assert verdict_label(ok["opt_verdict"]).startswith("numerics changed: eval loss +2.5%")
    lonely = _rung("adamw-8bit", "adamw-8bit", optimizations=[("adamw-8bit", "numerics")])
    annotate_optimizations(lonely, [])
    assert lonely["opt_verdict"]["passed"] is None and "baseline" in lonely["opt_verdict"]["reason"]


def test_ladder_rows_show_changes_from_the_previous_rung_and_the_baseline():
    from ftbench.harness.analysis.ladder_report import ladder_frame, ladder_rows
    from ftbench.harness.analysis.resultset import ResultSet

    recs = [_rung("", tokens=100.0, peak=400.0), _rung("a", tokens=120.0, peak=300.0),
            _rung("a+b", tokens=90.0, peak=300.0)]
    rows = ladder_rows(ResultSet(path=None, records=recs))
    assert [r["step"] for r in rows] == ["baseline", "+a", "+b"] and rows[0]["kind"] == "ladder"
    assert rows[2]["vs_prev"]["tokens_per_s"] == pytest.approx(-0.25)
    assert rows[2]["vs_base"]["tokens_per_s"] == pytest.approx(-0.10)
    assert rows[1]["vs_base"]["train_peak_bytes"] == pytest.approx(-0.25)
    assert list(ladder_frame(ResultSet(path=None, records=recs))["Δ prev"]) == ["-", "+20.0%", "-25.0%"]
    ablation = ladder_rows(ResultSet(path=None, records=recs[:2] + [_rung("b", tokens=90.0)]))
    assert {r["kind"] for r in ablation} == {"ablation"} and not ablation[2]["vs_prev"]


def test_the_baseline_is_found_in_records_read_back_from_disk():
    from ftbench.harness.results.opt_verdict import baseline_of

    base = json.loads(json.dumps(_rung("")))  # tuples (betas) come back as lists
    rec = _rung("adamw-8bit", "adamw-8bit", optimizations=[("adamw-8bit", "numerics")])
    assert baseline_of(rec, [base]) is base
