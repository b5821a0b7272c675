"""Pictures that tell the truth (issue 28, item 10): the report's and the history's plots read from
the figures' own artists, and the terminal table at 100 columns.

The figures are kept open (``pyplot.close`` stubbed out) so that each test reads what was drawn:
colours and markers of the artists (each drawn cell's ``gid`` is its cell id), texts and their
boxes, axis limits and offsets."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from ftbench.harness.analysis.historyreport import write_history  # noqa: E402
from ftbench.harness.analysis.plotstyle import palette  # noqa: E402
from ftbench.harness.analysis.report import write_report  # noqa: E402
from ftbench.harness.cli import main  # noqa: E402
from results_factory import ENV, make_record, write_set  # noqa: E402

#: tasks, each with its own model and a panel that lacks some backends, as in the default grid
PANELS = {("generation", "tiny-gpt2"): ("eager", "ddp", "zero2", "zero3"),
          ("translation", "tiny-t5"): ("compile", "eager", "zero3"),
          ("classification", "tiny-bert"): ("ddp", "eager", "fsdp")}


def _records(curve=lambda task, backend, i: 5.0 * 0.93 ** i, failed=(("generation", "zero3", "oom"),),
             quality=lambda task, backend: 125.778 + 1e-6 * len(backend)):
    recs = []
    for (task, model), backends in PANELS.items():
        for k, backend in enumerate(backends):
            status = next((s for t, b, s in failed if (t, b) == (task, backend)), "ok")
            for rep in range(2):
                r = make_record(task=task, backend=backend, model=model, repeat=rep, status=status,
                                step_s=0.02 * (1 + 0.3 * k), metric_value=quality(task, backend))
                if status == "ok":
                    r["train_loss"] = [curve(task, backend, i) for i in range(12)]
                recs.append(r)
    return recs


@pytest.fixture
def figures(monkeypatch):
    """A function returning every figure drawn so far in the test, by its title; all left open."""
    plt.close("all")
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)

    def collect():
        figs = [plt.figure(n) for n in plt.get_fignums()]
        return {(f._suptitle.get_text() if f._suptitle else ""): f for f in figs}

    yield collect
    monkeypatch.undo()
    plt.close("all")


def _report(tmp_path, records, figures):
    path = write_set(tmp_path / "set", records)
    rep, _ = write_report(path)
    return rep, figures()


def _fig(figs, start: str):
    return next(f for t, f in figs.items() if t.startswith(start))


def _drawn(fig) -> list[tuple[str, tuple, str | None]]:
    """(cell id, colour, marker) of every artist a cell drew in the figure."""
    out = []
    for ax in fig.axes:
        for line in ax.lines:
            if line.get_gid() and not str(line.get_gid()).startswith("failed:"):
                marker = line.get_marker()  # an error bar's caps are lines of "_" or "|" markers
                out.append((line.get_gid(), to_rgba(line.get_color()), None if marker in ("_", "|") else marker))
        for patch in ax.patches:
            if patch.get_gid():
                out.append((patch.get_gid(), to_rgba(patch.get_facecolor()), None))
    return out


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text) if t.get_visible() and t.get_text()]


# ------------------------------------------------------------------------------------------- 1


def test_one_colour_per_backend_and_one_marker_per_model_in_every_panel_and_plot(tmp_path, figures):
    recs = _records()
    _, figs = _report(tmp_path, recs, figures)
    backend_of = {r["cell_id"]: r["backend"] for r in recs}
    model_of = {r["cell_id"]: r["model"] for r in recs}
    # from the whole set, failed cells included, sorted: not from what one panel holds
    backends = sorted({r["backend"] for r in recs})
    want = dict(zip(backends, map(to_rgba, palette(len(backends)))))
    colours: dict[str, set] = {}
    markers: dict[str, set] = {}
    panels: dict[str, set] = {}
    for title, fig in figs.items():
        for ax_i, ax in enumerate(fig.axes):
            for cid, colour, marker in _drawn(type("F", (), {"axes": [ax]})):
                colours.setdefault(backend_of[cid], set()).add(colour)
                panels.setdefault(backend_of[cid], set()).add((title, ax_i))
                if marker not in (None, "None", ""):
                    markers.setdefault(model_of[cid], set()).add(marker)
    assert {b for b in colours} == set(backends) - set(), colours.keys()
    for backend, seen in colours.items():
        assert seen == {want[backend]}, (backend, seen)
        assert len(panels[backend]) > 1  # the check spans panels and plots
    # eager sits in every panel, first in one and second or third in the others: same colour
    assert len({t for t, _ in panels["eager"]}) >= 3
    for model, seen in markers.items():
        assert len(seen) == 1, (model, seen)
    assert len(set().union(*markers.values())) == len(markers)  # and each model its own


def test_the_history_and_ladder_use_the_report_colours(tmp_path, figures):
    from ftbench.harness.analysis.ladder_report import plot_ladder
    from ftbench.harness.analysis.plotstyle import styles_for
    from ftbench.harness.analysis.resultset import load_result_set, variant_labels

    roots = []
    for i in range(2):
        recs = [make_record(backend=b, repeat=r, seed=i, env=dict(ENV, git_commit=f"c{i}"))
                for b in ("eager", "zero2") for r in range(2)]
        for rec in recs:
            rec["started_at"] = f"2025-01-0{i + 1}T00:00:00+00:00"
        roots.append(write_set(tmp_path / f"s{i}", recs))
    write_history(roots, tmp_path / "h")
    want = dict(zip(["eager", "zero2"], map(to_rgba, palette(2))))
    backend_of = {r["cell_id"]: r["backend"] for r in recs}
    lines = [(cid, c) for f in figures().values() for cid, c, _ in _drawn(f)]
    assert lines and all(c == want[backend_of[cid]] for cid, c in lines)

    # the ladder's bars: the backend's colour
    rungs = [make_record(backend="zero2", repeat=r) for r in range(2)]
    for opt in ("attn", "attn+chunked-ce"):
        for r in make_record(backend="zero2", repeat=0), make_record(backend="zero2", repeat=1):
            r["config"]["opt"] = opt
            r["cell_id"] = r["cell_id"] + opt
            rungs.append(r)
    rs = load_result_set(write_set(tmp_path / "ladder", rungs + [make_record(backend="eager")]))
    styles = styles_for(rs.records, variant_labels(rs.records))
    assert plot_ladder(rs, tmp_path / "ladder.png", styles)
    fig = _fig(figures(), "Optimization ladder")
    bars = [p for ax in fig.axes for p in ax.patches if p.get_gid() == "backend:zero2"]
    assert bars and {to_rgba(p.get_facecolor())[:3] for p in bars} == {want["zero2"][:3]}


# ------------------------------------------------------------------------------------------- 2


def _shown_texts(fig) -> list[Text]:
    """The texts a reader sees: titles, axis labels, tick labels in view, notes, legends."""
    texts = [fig._suptitle] if fig._suptitle else []
    for lg in fig.legends:
        texts += [*lg.get_texts(), lg.get_title()]
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            texts += [t.label1 for t in axis.get_major_ticks() if lo <= t.get_loc() <= hi]
        if ax.get_legend():
            texts += ax.get_legend().get_texts()
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def _overlaps(fig) -> list[tuple[str, str]]:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in _shown_texts(fig)]
    return [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2) if ba.overlaps(bb)]


def test_quality_plot_has_a_legend_and_no_colliding_labels_when_quality_is_equal(tmp_path, figures):
    recs = _records(quality=lambda task, backend: 125.778)  # every backend reaches the same quality
    _, figs = _report(tmp_path, recs, figures)
    fig = _fig(figs, "Quality vs throughput")
    assert not _overlaps(fig), _overlaps(fig)
    assert not [t for ax in fig.axes for t in ax.texts if t.get_text() in {r["backend"] for r in recs}]
    legend = " ".join(t.get_text() for lg in fig.legends for t in lg.get_texts())
    for backend in {r["backend"] for r in recs}:
        assert backend in legend.split(), (backend, legend)
    for model in ("tiny-gpt2", "tiny-t5", "tiny-bert"):
        assert model in legend
    # no text of any plot of the report collides with another
    for title, f in figs.items():
        assert not _overlaps(f), (title, _overlaps(f))


# ------------------------------------------------------------------------------------------- 3


def test_nearly_equal_values_get_plain_axes_a_range_and_a_note(tmp_path, figures):
    _, figs = _report(tmp_path, _records(), figures)  # perplexities 125.778 + a few 1e-6
    for title, fig in figs.items():
        fig.canvas.draw()
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                assert axis.get_offset_text().get_text() == "", (title, ax.get_title())
    fig = _fig(figs, "Quality vs throughput")
    gen = next(ax for ax in fig.axes if ax.get_title() == "generation")
    lo, hi = gen.get_ylim()
    assert lo < 125.778 * 0.96 and hi > 125.778 * 1.04  # a readable range, not the noise's
    assert any("equal at 125.778" in t for t in _texts(fig))
    labels = [t.get_text() for t in gen.get_yticklabels() if t.get_text()]
    assert labels and all("e" not in t and "+" not in t for t in labels), labels


def test_different_values_get_no_equality_note(tmp_path, figures):
    _, figs = _report(tmp_path, _records(quality=lambda task, backend: 20.0 + len(backend)), figures)
    assert not any("equal at" in t for t in _texts(_fig(figs, "Quality vs throughput")))


# ------------------------------------------------------------------------------------------- 4


def test_coinciding_loss_curves_are_named_and_each_stays_visible(tmp_path, figures):
    _, figs = _report(tmp_path, _records(), figures)  # every backend the same curve
    fig = _fig(figs, "Training loss")
    notes = [t for t in _texts(fig) if "identical" in t or "coincide" in t]
    assert len(notes) == 3, _texts(fig)  # one per panel
    gen = " ".join(" ".join(t.split()) for t in notes if "tiny-gpt2" in t)
    for backend in ("eager", "ddp", "zero2"):
        assert backend in gen
    # each coinciding line is dashed in its turn, so none hides the others
    for ax in fig.axes:
        styles = {str(line.get_linestyle()) for line in ax.lines if line.get_gid()}
        dashes = [line._dash_pattern for line in ax.lines if line.get_gid()]
        assert len({d[0] for d in dashes}) == len(dashes), (styles, dashes)


def test_curves_that_differ_get_no_coincidence_note(tmp_path, figures):
    order = sorted({b for bs in PANELS.values() for b in bs})
    recs = _records(curve=lambda task, backend, i: (5.0 + order.index(backend) * 0.3) * 0.93 ** i)
    _, figs = _report(tmp_path, recs, figures)
    texts = _texts(_fig(figs, "Training loss"))
    assert not [t for t in texts if "identical" in t or "coincide" in t], texts


# ------------------------------------------------------------------------------------------- 5


def test_failed_cells_are_marked_in_every_plot(tmp_path, figures):
    recs = _records(failed=(("generation", "zero3", "oom"), ("classification", "fsdp", "timeout")))
    zero3 = next(r["cell_id"] for r in recs if r["backend"] == "zero3" and r["task"] == "generation")
    _, figs = _report(tmp_path, recs, figures)
    for start in ("Throughput", "Peak memory"):
        fig = _fig(figs, start)
        marks = [line for ax in fig.axes for line in ax.lines if line.get_gid() == f"failed:{zero3}"]
        assert len(marks) == 1 and marks[0].get_marker() == "x"
        gen = next(ax for ax in fig.axes if ax.get_title() == "generation")
        assert "oom" in [t.get_text() for t in gen.texts]
    for start in ("Throughput", "Training loss", "Quality vs throughput"):
        texts = " ".join(" ".join(t.split()) for t in _texts(_fig(figs, start)))
        assert "failed: zero3" in texts and "(oom)" in texts, (start, texts)
        assert "fsdp" in texts and "(timeout)" in texts


def test_a_failed_repeat_is_named_with_its_share():
    from ftbench.harness.analysis.plots import failed_cells

    ok = make_record(backend="ddp", repeat=0)
    bad = dict(make_record(backend="ddp", repeat=1, status="oom"), cell_id=ok["cell_id"])
    assert failed_cells([ok, bad], {ok["cell_id"]: "ddp"}, "generation") == ["ddp (oom in 1 of 2 runs)"]
    assert failed_cells([ok], {ok["cell_id"]: "ddp"}, "generation") == []


# ------------------------------------------------------------------------------------------- 6


def test_history_axes_start_at_zero(tmp_path, figures):
    roots = []
    for i in range(3):
        env = dict(ENV, git_commit=f"{i:02d}c0ffee")
        recs = [make_record(repeat=r, seed=i, env=env, mem=int((900 + i * 0.3) * 2**20)) for r in range(3)]
        for r in recs:
            r["started_at"] = f"2025-01-0{i + 1}T00:00:0{r['repeat']}+00:00"
        roots.append(write_set(tmp_path / f"s{i}", recs))
    _, files = write_history(roots, tmp_path / "h")
    figs = figures()
    assert len(figs) == len(files.plots) >= 2
    for title, fig in figs.items():
        for ax in fig.axes:
            if ax.get_visible() and ax.lines:
                assert ax.get_ylim()[0] == 0, (title, ax.get_ylim())
                fig.canvas.draw()
                assert ax.yaxis.get_offset_text().get_text() == ""


# ------------------------------------------------------------------------------------------- 7


def _default_grid_like():
    """Five tasks x twelve backends, data-parallel ones on two ranks, parity verdicts, a failure."""
    tasks = {"generation": "tiny-gpt2", "translation": "tiny-t5", "classification": "tiny-bert",
             "summarization": "tiny-t5", "dialogue": "tiny-gpt2"}
    backends = ("eager", "compile", "deepspeed", "zero0", "zero1", "zero2", "zero3", "zero2-offload",
                "zero3-offload", "ddp", "fsdp", "accelerate", "trainer")
    recs = []
    for task, model in tasks.items():
        for b in backends:
            status = "oom" if (task, b) == ("summarization", "zero3-offload") else "ok"
            for rep in range(3):
                r = make_record(task=task, backend=b, model=model, repeat=rep, status=status,
                                step_s=0.4 + 0.01 * len(b), mem=int(1.3 * 2**30) + 2**20 * len(b))
                if status != "ok":
                    r["error"] = "OutOfMemoryError: memory limit 1600 MB reached while building the model " * 3
                if b not in ("eager", "compile"):
                    r["nproc"] = r["config"]["nproc"] = 2
                r["parity"] = ({"status": "reference", "reason": "reference backend"} if b == "eager" else
                               {"status": "compared", "max_rel_dev": 1.2e-7, "window_max_rel_dev": 1.2e-7,
                                "passed": b != "trainer", "tolerance": 1e-3, "left_tolerance_at_step": 37}
                               if b != "deepspeed" else
                               {"status": "compared", "max_rel_dev": 3.1e-2, "window_max_rel_dev": 4e-4,
                                "passed": True, "tolerance": 1e-3, "left_tolerance_at_step": 37})
                recs.append(r)
    return recs


def test_the_terminal_table_fits_100_columns(tmp_path):
    path = write_set(tmp_path / "set", _default_grid_like())
    res = CliRunner(env={"COLUMNS": "100"}).invoke(main, ["report", str(path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    table = res.output[:res.output.index("Medians over repeats")]
    body = [line for line in table.splitlines() if line.startswith(" ") and line.strip()[:1] not in ("", "─")]
    # no cell cut to an ellipsis or folded: every backend and figure whole, one line per cell
    assert not [line for line in body if "…" in line], body
    for b in ("zero3-offload · ×2", "zero2-offload · ×2", "accelerate · ×2", "trainer · ×2", "eager"):
        assert any(line.split()[:len(b.split())] == b.split() for line in body), b
    for head in ("backend", "status", "tokens/s", "step ms", "peak memory", "perplexity ↓", "accuracy ↑",
                 "parity"):
        assert head in table, head
    assert "summarization · tiny-t5" in table and "oom" in table and "✓ 4.0e-04" in table
    assert len(body) == 5 * (1 + 13)  # a header and a line per cell: nothing wrapped
    # where the rest is
    tail = " ".join(res.output[res.output.index("Medians over repeats"):].split())
    assert "summary.md" in tail and "report.html" in tail
    # the full table is still in the Markdown
    md = (path / "report" / "summary.md").read_text()
    for col in ("setup peak", "train peak", "setup s", "compile s", "differs"):
        assert col in md
    assert "OutOfMemoryError" in md


def test_the_terminal_parity_is_the_verdict_without_its_details():
    from ftbench.harness.analysis.report_terminal import short_parity

    assert short_parity("✓ 1.2e-07, drift 3.1e-02 from step 37") == "✓ 1.2e-07"
    assert short_parity("recipe differs from eager: lr 0.003 -> 0.001") == "recipe differs from eager"
    assert short_parity(None) == "-"


def test_names_holding_dollars_are_drawn_as_written(tmp_path, figures):
    """A ``$`` in a name is not mathtext: two of them would fail to parse and lose the whole report."""
    names = ("a$^{{}$b", "c$d$")
    recs = [make_record(backend="eager", model=m, repeat=r) for m in names for r in range(2)]
    _, figs = _report(tmp_path, recs, figures)
    assert len(figs) == 4
    legend = [t.get_text() for f in figs.values() for lg in f.legends for t in lg.get_texts()]
    assert set(names) <= set(legend)
