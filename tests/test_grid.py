"""Grid files: exact expansion, sweeps, exclusions, per-cell settings, CLI
overrides, errors that name the bad key, and sharding."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.grid.files import build_grid, grid_from_dict, load_grid_text, parse_duration, select_shard
from ftbench.harness.grid.request import GridRequest
from ftbench.harness.contract.registry import Registry

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reg():
    return Registry.load()


def _write(tmp_path, text, name="grid.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _key(c):
    return (str(c.task), str(c.backend), c.model, c.recipe.lr, c.recipe.seq_len, c.repeat)


YAML = """
task: [generation]
backend: [eager]
model: [tiny-gpt2, tiny-llama]
sweep: {lr: [1e-3, 3.0e-3], seq_len: [32, 64]}
settings: {steps: 12, warmup: 2}
time_limit: 5m
exclude:
  - {model: tiny-llama, seq_len: 64}
per_cell:
  - {match: {model: tiny-llama}, time_limit: 1h}
repeat: 2
"""

TOML = """
task = ["generation"]
backend = ["eager"]
model = ["tiny-gpt2", "tiny-llama"]
repeat = 2
time_limit = "5m"

[sweep]
lr = [1e-3, 3e-3]
seq_len = [32, 64]

[settings]
steps = 12
warmup = 2

[[exclude]]
model = "tiny-llama"
seq_len = 64

[[per_cell]]
match = { model = "tiny-llama" }
time_limit = "1h"
"""


def test_grid_file_expands_to_exactly_the_expected_cells(tmp_path, reg):
    cells = build_grid(GridRequest(_write(tmp_path, YAML))).cells(reg)
    expected = set()
    for model in ("tiny-gpt2", "tiny-llama"):
        for lr in (1e-3, 3e-3):
            for seq in (32, 64):
                if model == "tiny-llama" and seq == 64:
                    continue  # the exclusion
                for rep in (0, 1):
                    expected.add(("generation", "eager", model, lr, seq, rep))
    assert len(cells) == len(expected) == 12
    assert {_key(c) for c in cells} == expected
    for c in cells:
        assert c.recipe.steps == 12 and c.recipe.warmup == 2
        # the per-cell rule beats the file-wide limit, for matching cells only
        assert c.time_limit_s == (3600.0 if c.model == "tiny-llama" else 300.0)
    # repeats share the cell id; different settings never do
    assert len({c.cell_id for c in cells}) == 6


def test_toml_and_yaml_give_the_same_cells(tmp_path, reg):
    a = build_grid(GridRequest(_write(tmp_path, YAML))).cells(reg)
    b = build_grid(GridRequest(_write(tmp_path, TOML, "grid.toml"))).cells(reg)
    assert [c.to_dict() for c in a] == [c.to_dict() for c in b]


def test_cli_overrides_replace_axes_settings_sweeps_and_per_cell_rules(tmp_path, reg):
    grid = build_grid(GridRequest(_write(tmp_path, YAML), axes={"model": ("tiny-gpt2",)},
                                  settings={"lr": 0.01, "steps": 8, "time_limit_s": 30.0}, repeat=1))
    cells = grid.cells(reg)
    assert {_key(c) for c in cells} == {("generation", "eager", "tiny-gpt2", 0.01, 32, 0),
                                        ("generation", "eager", "tiny-gpt2", 0.01, 64, 0)}
    assert all(c.recipe.steps == 8 and c.time_limit_s == 30.0 for c in cells)
    # a command-line time limit also wins over a matching per_cell rule
    cells = build_grid(GridRequest(_write(tmp_path, YAML), axes={"model": ("tiny-llama",)},
                                   settings={"time_limit_s": 30.0})).cells(reg)
    assert cells and all(c.time_limit_s == 30.0 for c in cells)


def test_exclusion_matches_backend_name_with_options(tmp_path, reg):
    text = """
task: [generation]
backend: [eager, "eager:foo=1"]
exclude: [{backend: eager, model: tiny-gpt2}]
model: [tiny-gpt2, tiny-llama]
"""
    cells = grid_from_dict(load_grid_text(text, "g.yaml"), "g.yaml").cells(reg)
    assert {(str(c.backend), c.model) for c in cells} == {("eager", "tiny-llama"), ("eager:foo=1", "tiny-llama")}


@pytest.mark.parametrize("text, must_contain", [
    ("task: [generation]\nbackends: [eager]\n", ["'backends'", "did you mean 'backend'", "allowed:", "exclude"]),
    ("task: [generation]\nsteps: 10\n", ["'steps'", "settings"]),
    ("task: [generation]\nsettings: {stpes: 10}\n", ["'stpes'", "settings", "did you mean 'steps'", "seq_len"]),
    ("task: [generation]\nsettings: {steps: ten}\n", ["settings.steps", "integer", "'ten'"]),
    ("task: [generation]\nsettings: {precision: fp64}\nbackend: [eager]\n", ["precision", "fp64", "fp32, bf16, fp16"]),
    ("task: [generation]\nsweep: {lrr: [1, 2]}\n", ["'lrr'", "sweep", "did you mean 'lr'"]),
    ("task: [generation]\nsweep: {lr: 0.1}\n", ["sweep.lr", "non-empty list"]),
    ("task: [generation]\nexclude: [{colour: red}]\n", ["'colour'", "exclude", "allowed: backend, data, model, opt, task"]),
    ("task: [generation]\nper_cell: [{match: {backend: eager}, steps: 3}]\n", ["'steps'", "per_cell",
                                                                              "time_limit"]),
    ("task: [generation]\ntime_limit: soon\n", ["time_limit", "'soon'", "15m"]),
    ("task: [generation]\nrepeat: 0\n", ["repeat", ">= 1"]),
    ("task: generation\nbackend: [eagre]\n", ["grid file", "unknown backend 'eagre'", "Did you mean 'eager'",
                                              "Available:"]),
    ("task: [generation\n", ["invalid YAML"]),
])
def test_invalid_grid_files_name_the_bad_key_and_the_allowed_values(tmp_path, reg, text, must_contain):
    with pytest.raises(FtbenchError) as e:
        build_grid(GridRequest(_write(tmp_path, text))).cells(reg)
    msg = str(e.value)
    assert "grid.yaml" in msg
    for part in must_contain:
        assert part in msg, (part, msg)


def test_cli_reports_a_bad_grid_with_exit_status_2(tmp_path):
    from click.testing import CliRunner

    from ftbench.harness.cli import main

    res = CliRunner().invoke(main, ["run", "--grid", _write(tmp_path, "task: [generation]\nbakend: [eager]\n")])
    assert res.exit_code == 2
    assert "bakend" in res.output and "did you mean 'backend'" in res.output


def test_parse_duration():
    assert parse_duration(90, "t") == 90.0
    assert parse_duration("90s", "t") == 90.0
    assert parse_duration("15m", "t") == 900.0
    assert parse_duration("1.5h", "t") == 5400.0
    with pytest.raises(FtbenchError, match="invalid duration"):
        parse_duration("-3m", "t")


def test_shards_are_disjoint_balanced_cover_the_grid_and_keep_repeats_together(tmp_path, reg):
    cells = build_grid(GridRequest(_write(tmp_path, YAML))).cells(reg)
    for n in (1, 2, 3, 4, 7):
        shards = [select_shard(cells, f"{i}/{n}") for i in range(1, n + 1)]
        keys = [{(c.cell_id, c.repeat) for c in s} for s in shards]
        assert sum(len(k) for k in keys) == len(cells)                      # disjoint
        assert set().union(*keys) == {(c.cell_id, c.repeat) for c in cells}  # covering
        ids = [{c.cell_id for c in s} for s in shards]
        assert max(map(len, ids)) - min(map(len, ids)) <= 1                 # balanced
        for s in shards:                                                    # repeats together
            for c in s:
                assert sum(1 for d in s if d.cell_id == c.cell_id) == 2
    # deterministic whatever the order the cells come in
    assert {c.cell_id for c in select_shard(cells[::-1], "2/3")} == {c.cell_id for c in select_shard(cells, "2/3")}
    with pytest.raises(FtbenchError, match="i/N"):
        select_shard(cells, "4/3")


@pytest.mark.parametrize("name", ["cpu-smoke.yaml", "gpu.yaml"])
def test_example_grids_are_valid(name, reg):
    grid = build_grid(GridRequest(str(ROOT / "grids" / name)))
    assert grid.repeat >= 1
    if name == "cpu-smoke.yaml":
        cells = grid.cells(reg)
        assert len(cells) == 12 and all(c.device in ("auto", "cpu") for c in cells)
        assert {(str(c.backend), c.model) for c in cells} == {("eager", "tiny-gpt2"), ("eager", "tiny-llama"),
                                                         ("compile", "tiny-gpt2"), ("zero2", "tiny-gpt2")}


def test_default_grid_is_every_task_on_every_available_backend():
    from ftbench.harness.grid.files import build_grid
    from ftbench.harness.contract.registry import Registry

    reg = Registry.load()
    cells = build_grid(GridRequest()).cells(reg)
    backends = [n for n, e in reg.backends.items() if e.obj.preset_of is None and reg.backend_availability(n) is None]
    assert {(str(c.task), str(c.backend)) for c in cells} == {(t, b) for t in reg.tasks for b in backends}
    assert len(cells) == len(reg.tasks) * len(backends)
    for c in cells:
        assert c.nproc == (2 if reg.backend(c.backend.name).data_parallel else 1)
        assert reg.model(c.model).kind == reg.task(c.task.name).model_kinds[0]


def test_the_committed_baseline_keeps_its_cell_ids_and_fingerprints():
    """New settings at their defaults must not change existing ids (see config.ADDED_LATER)."""
    import json

    from ftbench.harness.grid.files import build_grid
    from ftbench.harness.contract.registry import Registry

    root = Path(__file__).resolve().parent.parent
    base = [json.loads(line) for line in (root / "results/baseline-cpu/results.jsonl").read_text().splitlines()]
    cells = build_grid(GridRequest(str(root / "grids/cpu-smoke.yaml"))).cells(Registry.load())
    assert {(c.cell_id, c.fingerprint()) for c in cells} == {(r["cell_id"], r["recipe_fingerprint"]) for r in base}
