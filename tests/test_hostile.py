"""Hostile inputs and shared machines: what a file, a plugin or a neighbour on
the machine could do to a run, and what ftbench does instead
(docs/reliability.md).

Each test reproduces one way in and checks the clear refusal (exit 2 before
any cell runs) or the bounded cost that replaced it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from ftbench.harness.cli import main
from ftbench.harness.contract.config import CellSpec

from conftest import ROOT, pip_install_copy, processes_with_env, records

TINY = ["--steps", "6", "--warmup", "1", "--seq-len", "32", "--batch-size", "4"]


# --------------------------------------------------- model directories and code


def _code_model_dir(tmp_path: Path) -> tuple[Path, Path]:
    """A model directory whose config asks transformers to import its own Python file."""
    d = tmp_path / "custom-model"
    d.mkdir()
    marker = tmp_path / "code-ran"
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    for module in ("configuration_custom", "modeling_custom", "tokenization_custom"):
        (d / f"{module}.py").write_text(payload)
    (d / "config.json").write_text(json.dumps({
        "model_type": "custom-never-registered", "architectures": ["CustomForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}}))
    (d / "model.safetensors").write_bytes(b"")
    return d, marker


def _run_without_answer(args, stdin, cache: Path, timeout=60) -> subprocess.CompletedProcess:
    env = {**os.environ, "FTBENCH_CACHE": str(cache), "HF_MODULES_CACHE": str(cache / "hf-modules"),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ftbench.harness.cli", *map(str, args)], stdin=stdin,
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def test_model_directory_code_is_refused_without_a_prompt(tmp_path):
    """Neither a closed stdin nor a terminal ever sees transformers' "[y/N]" prompt; nothing is imported."""
    d, marker = _code_model_dir(tmp_path)
    args = ["run", "--task", "generation", "--backend", "eager", "--model", d, *TINY, "--out", tmp_path / "out"]
    closed = _run_without_answer(args, subprocess.DEVNULL, tmp_path / "cache")
    leader, follower = pty.openpty()  # a terminal on stdin: where transformers would ask and wait
    try:
        with_tty = _run_without_answer(["plan", *args[1:-2]], follower, tmp_path / "cache")
    finally:
        os.close(leader)
        os.close(follower)
    for proc in (closed, with_tty):
        text = proc.stdout + proc.stderr
        message = " ".join(text.split())
        assert proc.returncode == 2, text
        assert "Traceback" not in text and "[y/N]" not in text and "custom code" not in text, text
        for phrase in ("would run its own Python code", "configuration_custom.py", "modeling_custom.py",
                       "tokenization_custom.py", "--trust-remote-code"):
            assert phrase in message, (phrase, message)
    assert not marker.exists(), "the model directory's code ran"
    assert not (tmp_path / "cache" / "hf-modules").exists() or not any((tmp_path / "cache" / "hf-modules").rglob(
        "*custom*.py")), "transformers copied the directory's code to import it"
    assert not (tmp_path / "out").exists()


def test_the_trust_flag_is_a_permission_kept_in_the_record_not_in_the_cell_id():
    trusted = CellSpec(task="generation", backend="eager", model="m", trust_remote_code=True)
    plain = CellSpec(task="generation", backend="eager", model="m")
    assert trusted.cell_id == plain.cell_id  # resuming with the flag does not rerun finished cells
    assert trusted.to_dict()["trust_remote_code"] is True and plain.to_dict()["trust_remote_code"] is False
    assert CellSpec.from_dict(trusted.to_dict()).trust_remote_code is True


def test_grid_key_and_flag_reach_the_cells(tmp_path):
    from ftbench.harness.contract.registry import Registry
    from ftbench.harness.grid.files import build_grid
    from ftbench.harness.grid.request import GridRequest

    grid_file = tmp_path / "g.yaml"
    grid_file.write_text("task: [generation]\nbackend: [eager]\nsettings: {trust_remote_code: true}\n")
    axes = {"task": ("generation",), "backend": ("eager",)}
    assert all(c.trust_remote_code for c in build_grid(GridRequest(str(grid_file))).cells(Registry.load()))
    assert not any(c.trust_remote_code for c in build_grid(GridRequest(axes=axes)).cells(Registry.load()))
    assert all(c.trust_remote_code for c in build_grid(GridRequest(axes=axes, settings={"trust_remote_code": True}))
               .cells(Registry.load()))


# ------------------------------------------------------------- listening sockets


def _listening(processes) -> set:
    found = set()
    for p in processes:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.Error:
            continue
        found |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return found


def test_a_multi_rank_cell_listens_on_loopback_only(tmp_path):
    """Every socket the ddp x2 cell's processes listen on, sampled while it runs, is on the loopback interface."""
    mark = f"listen-{os.getpid()}"
    env = {**os.environ, "FTBENCH_CACHE": str(ROOT / ".pytest-ftbench-cache"), "FTBENCH_TEST_MARK": mark}
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "ftbench.harness.cli", "run", "--task", "generation",
                             "--backend", "ddp", "--nproc", "2", "--steps", "12", "--warmup", "2", "--batch-size", "4",
                             "--seq-len", "32", "--eval-examples", "8", "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    seen: set = set()
    try:
        while proc.poll() is None:
            seen |= _listening(p for p in processes_with_env(FTBENCH_TEST_MARK=mark) if p.pid != proc.pid)
            time.sleep(0.05)
        output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    record = records(out)[0]
    assert record["status"] == "ok", record
    store = record["launch"]["store"]
    assert store["bind"] == "127.0.0.1" and (store["bind"], store["port"]) in seen, (store, seen)
    assert seen and all(ipaddress.ip_address(ip).is_loopback for ip, _ in seen), seen


def test_a_store_binds_only_the_address_it_serves():
    from ftbench.harness.running.listen import bound_store

    store, where = bound_store("127.0.0.1", 0, 1)
    try:
        mine = _listening([psutil.Process()])
        assert ("127.0.0.1", where["port"]) in mine
        assert not [a for a in mine if a[1] == where["port"] and a[0] != "127.0.0.1"], mine
        store.set("k", "v")
        assert store.get("k") == b"v"
    finally:
        del store


# ------------------------------------------------------------ waits and signals


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_node_0_waiting_for_the_others(tmp_path, signum):
    """Node 0 waiting for node 1 says what it waits for and until when, and a signal ends it at once."""
    from ftbench.harness.running.nodes import free_port

    port = free_port()
    env = {**os.environ, "FTBENCH_CACHE": str(ROOT / ".pytest-ftbench-cache")}
    node0 = subprocess.Popen([sys.executable, "-m", "ftbench.harness.cli", "run", "--task", "generation",
                              "--backend", "ddp", *TINY, "--nnodes", "2", "--node-rank", "0", "--master-addr",
                              "127.0.0.1", "--master-port", str(port), "--out", str(tmp_path / "out")],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = node0.stdout.readline()
            lines.append(line)
            if "waiting for node(s) 1" in line or not line:
                break
        assert "waiting for node(s) 1 of 2" in lines[-1] and "until" in lines[-1], "".join(lines)
        listening = _listening([psutil.Process(node0.pid)])
        assert listening == {("127.0.0.1", port)}, listening  # the interface of --master-addr only
        t0 = time.monotonic()
        node0.send_signal(signum)
        rest = node0.communicate(timeout=30)[0]
        took = time.monotonic() - t0
    finally:
        if node0.poll() is None:
            node0.kill()
    assert took < 5, took
    assert node0.returncode == 128 + signum, (node0.returncode, rest)
    assert "interrupted" in rest and "Traceback" not in rest, rest


# ------------------------------------------------------- bounded work before validation


def _refused_in_process(args, *phrases):
    result = CliRunner().invoke(main, list(map(str, args)))
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 2, (result.exit_code, text[:2000], result.exception)
    assert "Traceback" not in text, text[:2000]
    message = " ".join(text.split())
    for phrase in phrases:
        assert phrase in message, (phrase, message[:2000])
    return message


def _alias_bomb(levels: int = 9) -> str:
    defs = ["&a0 [1,1,1,1,1,1,1,1,1]"] + [f"&a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "task: [generation]\nbackend: [eager]\nrepeat: [" + ", ".join(defs) + "]\n"


def test_a_yaml_alias_bomb_is_refused_in_bounded_time_and_memory(tmp_path):
    import tracemalloc

    grid = tmp_path / "bomb.yaml"
    grid.write_text(_alias_bomb())
    assert grid.stat().st_size < 500
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        message = _refused_in_process(["run", "--grid", grid, "--out", tmp_path / "out"], "expands to", "aliases")
        took = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert took < 2 and peak < 100 * 2**20, (took, peak)
    assert len(message) < 1000  # no repr of the expanded value
    assert not (tmp_path / "out").exists()


def test_a_huge_value_is_shortened_in_the_message(tmp_path):
    grid = tmp_path / "long.yaml"
    grid.write_text("task: [generation]\nbackend: [eager]\nrepeat: [" + ", ".join(["12345"] * 20000) + "]\n")
    message = _refused_in_process(["run", "--grid", grid, "--out", tmp_path / "out"], "repeat must be an integer")
    assert len(message) < 1000, len(message)


def test_a_grid_file_too_large_or_not_utf8_is_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("task: [generation]\n# " + "x" * (2 << 20) + "\n")
    _refused_in_process(["run", "--grid", big, "--out", tmp_path / "out"], "bytes, over the", "a grid file")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("task: [generation]\nbackend: [eager]\n# caf\xe9\n".encode("latin-1"))
    _refused_in_process(["run", "--grid", latin, "--out", tmp_path / "out"], "is not UTF-8", "line 3",
                        "save it as UTF-8")


def test_columns_that_are_not_a_mapping_are_refused(tmp_path):
    grid = tmp_path / "cols.yaml"
    grid.write_text("task: [generation]\nbackend: [eager]\nsettings: {columns: [text, review]}\n")
    _refused_in_process(["run", "--grid", grid, "--out", tmp_path / "out"], "columns must be a mapping")


@pytest.mark.parametrize("args,phrases", [
    (["--steps", "100000000000000000000000000"], ["invalid steps=", "at most 10,000,000"]),
    (["--batch-size", "10000000"], ["invalid batch_size=", "at most"]),
    (["--batch-size", "1000000"], ["batch size 1000000 is larger than the"]),
    (["--repeat", "1000000000"], ["--repeat", "at most 1000"]),
    (["--nproc", "100000", "--backend", "ddp"], ["invalid nproc=", "from 1 to 1024"]),
])
def test_numbers_past_sane_bounds_are_refused_at_once(tmp_path, args, phrases):
    import ftbench.harness.cell.modeling  # noqa: F401 - torch's import is not the work being timed

    t0 = time.perf_counter()
    _refused_in_process(["run", "--task", "generation", *(["--backend", "eager"] if "--backend" not in args else []),
                         *args, "--out", tmp_path / "out"], *phrases)
    assert time.perf_counter() - t0 < 5


def test_a_grid_of_a_million_cells_asks_before_expanding(tmp_path):
    grid = tmp_path / "sweep.yaml"
    grid.write_text("task: [generation]\nbackend: [eager]\nsweep: {seed: [" + ", ".join(map(str, range(1000)))
                    + "]}\nrepeat: 1000\n")
    t0 = time.perf_counter()
    _refused_in_process(["run", "--grid", grid, "--out", tmp_path / "out"], "expands to up to 1,000,000 cells",
                        "--yes", "max_cells: 1000000")
    assert time.perf_counter() - t0 < 2


def test_a_confirmed_large_grid_says_how_far_its_expansion_got(tmp_path):
    from ftbench.harness.contract.registry import Registry
    from ftbench.harness.grid.files import build_grid
    from ftbench.harness.grid.request import GridRequest

    grid_file = tmp_path / "sweep.yaml"
    grid_file.write_text("task: [generation]\nbackend: [eager]\nsweep: {seed: [" + ", ".join(map(str, range(100)))
                         + "]}\nrepeat: 120\nmax_cells: 12000\n")
    grid, reg = build_grid(GridRequest(str(grid_file))), Registry.load()
    assert grid.check_size(reg, confirmed=False) == 12000  # declared in the file: no --yes needed
    heard = []
    cells = grid.cells(reg, progress=lambda done, total: heard.append((done, total)))
    assert len(cells) == 12000
    assert heard and heard[0][1] == 12000 and heard == sorted(heard) and heard[-1][0] <= 12000, heard


def test_the_batch_plan_costs_the_same_for_two_million_steps_as_for_twenty():
    """The plan's setup (rows to read, first step) is flat in --steps; steps are computed when read."""
    import tracemalloc

    from ftbench.harness.cell.batches import batch_plan
    from ftbench.harness.cell.rowsource import plan_indices
    from ftbench.harness.contract.config import Recipe

    def setup(steps):
        recipe = Recipe(steps=steps, warmup=1, batch_size=8)
        tracemalloc.start()
        t0 = time.perf_counter()
        rows = plan_indices(5000, recipe, 2)
        plan = batch_plan(5000, recipe, 2, 1, recipe.seed)
        first, last = plan[0], plan[len(plan) - 1]
        took, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return rows, first, last, took, peak

    rows_short, first_short, _, _, peak_short = setup(1000)  # 8,000 draws: every row once already
    rows_long, first_long, last_long, took_long, peak_long = setup(2_000_000)
    assert first_short == first_long and rows_long == rows_short and sorted(rows_long) == list(range(5000))
    assert len(last_long[0]) == 8 and len(last_long[1]) == 1 and len(last_long[1][0]) == 4
    assert peak_long < 1.1 * peak_short, (peak_short, peak_long)
    assert setup(20)[0] == rows_short[:160]  # a short run reads only the rows it draws
    assert took_long < 5, took_long  # the last step replays 3,200 permutations of 5,000 rows, nothing more


# ------------------------------------------------------------------- broken plugins

BROKEN = ROOT / "tests" / "broken_plugins_pkg"


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    """A package of plugins broken every way a plugin can break (and one that works), pip-installed offline."""
    return pip_install_copy(BROKEN, tmp_path_factory)


def test_broken_plugins_are_listed_and_the_others_keep_working(broken_site, tmp_path, monkeypatch):
    from conftest import TINY as CELL, ftbench

    env = {"PYTHONPATH": str(broken_site)}
    listing = ftbench("list", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    data = json.loads(listing.stdout)
    broken = {b["plugin"]: b["error"] for b in data["broken_plugins"]}
    assert set(broken) == {"unimportable", "misspelled", "raising"}, broken
    assert "ftbench_dependency_that_is_not_installed" in broken["unimportable"]
    assert "register_task" in broken["misspelled"]
    assert "the plugin's own bug while registering" in broken["raising"]
    backends = {b["name"] for b in data["backends"]}
    assert {"eager", "ddp", "sturdy"} <= backends and "half-registered" not in backends
    assert {"generation", "classification"} <= {t["name"] for t in data["tasks"]}

    out = tmp_path / "out"
    run = ftbench("run", "--task", "generation", "--backend", "sturdy", *CELL, "--out", out, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "plugin raising is broken" in run.stderr
    assert [r["status"] for r in records(out)] == ["ok"]

    monkeypatch.syspath_prepend(str(broken_site))  # the same installation, seen in this process
    plan = CliRunner().invoke(main, ["plan", "--task", "generation", "--backend", "sturdy", *CELL])
    assert plan.exit_code == 0, plan.output
    _refused_in_process(["run", "--backend", "half-registered", "--out", tmp_path / "never"],
                        "unknown backend 'half-registered'", "raising: register_backends raised")


def test_a_misspelled_hook_leaves_out_that_plugin_only():
    from ftbench import hookimpl
    from ftbench.harness.contract.plugins import get_plugin_manager
    from ftbench.harness.contract.registry import Registry

    class Misspelled:
        @hookimpl
        def register_task(self, register):
            pass

    reg = Registry.load(get_plugin_manager(extra=(Misspelled(),)))
    assert "register_task" in reg.broken["Misspelled"] and "generation" in reg.tasks and "eager" in reg.backends


def test_device_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    _refused_in_process(["run", "--task", "generation", "--backend", "eager", "--device", "cuda", *TINY,
                         "--out", tmp_path / "out"], "invalid device='cuda'", "--device auto or cpu")


# --------------------------------------------------------- outputs over a result set


@pytest.mark.parametrize("command", [
    ["compare", "{a}", "{b}", "--markdown", "{b}/results.jsonl"],
    ["compare", "{a}", "{b}", "--markdown", "{link}"],
    ["compare", "--calibrate", "{a}", "{b}", "-o", "{a}/results.jsonl"],
    ["compare", "--calibrate", "{a}", "{b}", "-o", "{a}/environment.json"],
    ["report", "{a}", "--out", "{a}/results.jsonl"],
    ["history", "{a}", "{b}", "--out", "{b}/environment.json"],
])
def test_an_output_over_a_result_sets_records_is_refused(tmp_path, command):
    from results_factory import grid_records, write_set

    a = write_set(tmp_path / "a", grid_records(repeats=2))
    b = write_set(tmp_path / "b", grid_records(repeats=2))
    for d in (a, b):
        (d / "environment.json").write_text("{}")
    link = tmp_path / "comparison.md"
    link.symlink_to(b / "results.jsonl")
    before = {p: p.read_bytes() for d in (a, b) for p in d.iterdir()}
    args = [c.format(a=a, b=b, link=link) for c in command]
    _refused_in_process(args, "would overwrite a result set's", "write the")
    assert {p: p.read_bytes() for d in (a, b) for p in d.iterdir()} == before


# ------------------------------------------------------ environment identity and shards


def _env(cpu="Test CPU", threads=2):
    from results_factory import ENV

    return {**ENV, "cpu": cpu, "device": {"type": "cpu", "torch_threads": threads, "cpu": cpu, "name": cpu}}


def test_one_machines_single_and_multi_rank_cells_are_one_environment(tmp_path):
    from ftbench.harness.analysis.compare import compare_sets
    from ftbench.harness.analysis.resultset import merge_result_sets
    from results_factory import make_record, write_set

    shard1 = write_set(tmp_path / "s1", [make_record(backend="eager", env=_env(threads=2))])
    shard2 = write_set(tmp_path / "s2", [make_record(backend="ddp", env=_env(threads=1))])
    merged = merge_result_sets(tmp_path / "all", [shard1, shard2])
    assert merged.written == 2 and not merged.warnings, merged.warnings
    cmp = compare_sets(tmp_path / "all", tmp_path / "all")
    assert not [w for w in cmp.warnings if "environment" in w], cmp.warnings

    other = write_set(tmp_path / "s3", [make_record(backend="fsdp", env=_env(cpu="Another CPU", threads=1))])
    with pytest.raises(Exception, match="different environments"):
        merge_result_sets(tmp_path / "mixed", [shard1, other])


@pytest.mark.slow
def test_the_readme_shard_workflow_merges_on_one_machine(tmp_path):
    """--shard 1/2 and 2/2 of a grid with a one-process and a two-rank cell, then ftbench merge."""
    from conftest import TINY as CELL, ftbench

    grid = ["--task", "generation", "--backend", "eager", "--backend", "ddp", "--nproc", "2", *CELL]
    for i in (1, 2):
        ftbench("run", *grid, "--shard", f"{i}/2", "--out", tmp_path / f"shard{i}", check=True)
    kinds = {r["nproc"] for i in (1, 2) for r in records(tmp_path / f"shard{i}")}
    assert kinds == {1, 2}, kinds
    merge = ftbench("merge", tmp_path / "all", tmp_path / "shard1", tmp_path / "shard2")
    assert merge.returncode == 0, merge.stderr
    assert len(records(tmp_path / "all")) == 2
    compare = ftbench("compare", tmp_path / "all", tmp_path / "all")
    assert "environment" not in compare.stdout + compare.stderr, compare.stdout


# ----------------------------------------------------------------- labels and names


def test_a_huge_class_label_is_a_data_error_naming_it(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": f"row {i}", "label": i % 2} for i in range(40)]
    rows[7]["label"] = 10**12
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8] if r["label"] < 2))
    t0 = time.perf_counter()
    message = _refused_in_process(["run", "--task", "classification", "--backend", "eager", "--data", data, *TINY,
                                   "--out", tmp_path / "out"], "train.jsonl line 8", "1000000000000",
                                  "not a usable class id")
    assert "oom" not in message and "memory" not in message
    assert time.perf_counter() - t0 < 30


def test_html_in_names_is_shown_as_text_in_summary_md(tmp_path):
    from results_factory import make_record, write_set

    from ftbench.harness.analysis.report import write_report

    evil = "<img src=x onerror=alert(1)>|x"
    rec = make_record(backend="eager", model=evil)
    write_set(tmp_path / "set", [rec])
    rep, _ = write_report(tmp_path / "set", tmp_path / "report")
    text = rep.markdown.read_text()
    assert "<img" not in text and "&lt;img src=x onerror=alert(1)&gt;\\|x" in text, text
    assert "<img src=x" not in rep.html.read_text().split("data:image/png")[0]


def test_a_multi_node_cell_records_where_its_stores_listened():
    from torch.distributed import HashStore

    from ftbench.harness.contract.config import CellSpec
    from ftbench.harness.running.nodes import NodeGroup

    group = NodeGroup(2, 0, "127.0.0.1", 29500, store=HashStore(), bind={"bind": "127.0.0.1", "port": 29500})
    spec = group.announce(0, CellSpec(task="generation", backend="ddp", model="tiny-gpt2", nproc=1), run=True)
    details = group.launch_details(0)
    assert details["grid_store"] == {"bind": "127.0.0.1", "port": 29500}
    assert details["store"]["port"] == spec.launcher.master_port and details["store"]["by"] == "torchrun"
