"""Task and backend specs are parsed once into a typed value whose spelling keeps every cell id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.contract.config import CellSpec, Launch, Recipe
from ftbench.harness.contract.specs import Spec

ROOT = Path(__file__).resolve().parent.parent


def test_a_spec_parses_once_and_spells_itself_as_written():
    spec = Spec.parse(" deepspeed : stage=3, offload=cpu ,lr=1e-4")
    assert spec.name == "deepspeed"
    assert spec.options == {"stage": 3, "offload": "cpu", "lr": 1e-4}
    # Values keep their text (1e-4 is not respelled 0.0001), in the order written.
    assert str(spec) == "deepspeed:stage=3,offload=cpu,lr=1e-4"
    assert Spec.parse(str(spec)) == spec
    assert str(Spec.of("compile", {"mode": "default", "dynamic": False})) == "compile:mode=default,dynamic=false"


@pytest.mark.parametrize("text, words", [("", "empty"), (":a=1", "no name"), ("x:a", "malformed"),
                                         ("x:a=1,a=2", "twice")])
def test_a_bad_spec_says_what_is_wrong(text, words):
    with pytest.raises(FtbenchError, match=words):
        Spec.parse(text)


def test_a_cell_holds_parsed_specs_and_a_typed_launch():
    cell = CellSpec(task="translation:source=de", backend="ddp", model="tiny-t5", nproc=2,
                    launcher={"nnodes": 2, "master_addr": "10.0.0.7"})
    assert cell.task.name == "translation" and cell.task.options == {"source": "de"}
    assert cell.launcher == Launch(nnodes=2, master_addr="10.0.0.7") and cell.nnodes == 2
    assert (cell.launcher.rank, cell.launcher.port) == (0, Launch.DEFAULT_PORT)
    # The JSON form is what it always was: the spec's spelling, only the launch keys given.
    d = json.loads(json.dumps(cell.to_dict()))
    assert (d["task"], d["backend"], d["launcher"]) == ("translation:source=de", "ddp",
                                                        {"nnodes": 2, "master_addr": "10.0.0.7"})
    assert CellSpec.from_dict(d) == cell and CellSpec.from_dict(d).cell_id == cell.cell_id
    with pytest.raises(FtbenchError, match="unknown launcher key"):
        CellSpec(task="generation", backend="ddp", model="m", launcher={"nodes": 2})


def test_every_baseline_record_rebuilds_its_cell_id_and_fingerprint_from_its_config():
    """Parsing specs into values must not change one id or fingerprint of the committed baseline."""
    records = [json.loads(line) for line in (ROOT / "results/baseline-cpu/results.jsonl").read_text().splitlines()]
    assert records
    for r in records:
        cell = CellSpec.from_dict(r["config"])
        assert (cell.cell_id, cell.fingerprint()) == (r["cell_id"], r["recipe_fingerprint"])


def test_a_spec_with_options_keeps_the_id_its_text_had():
    # Pinned from the release before specs were typed: the id hashed the text as given.
    cell = CellSpec(task="generation", backend="deepspeed:stage=3,offload=cpu", model="tiny-gpt2",
                    recipe=Recipe(steps=20))
    assert cell.cell_id == "35482f1ad940557d"


def test_the_micro_batch_is_derived_in_one_place():
    recipe = Recipe(batch_size=16, grad_accum=2)
    assert recipe.micro_batch(2) == 4
    assert CellSpec(task="generation", backend="ddp", model="m", nproc=4, recipe=recipe).micro_batch == 2
