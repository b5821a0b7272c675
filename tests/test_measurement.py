"""Measurement building blocks: throughput, step statistics, FLOPs, caches."""

from __future__ import annotations

import pytest
import torch

from ftbench.harness.contract.api import Encoded
from ftbench.harness.cell.measure import step_stats, throughput
from ftbench.harness.cell.mfu import device_peak, flop_model
from ftbench.harness.cell.prepcache import cached_encode


def test_throughput_is_total_tokens_over_total_time_not_over_mean_step():
    counts = [{"nonpad": 100}, {"nonpad": 300}, {"nonpad": 200}]
    times = [0.1, 0.5, 0.4]
    # By hand: 600 tokens in 1.0 s.
    assert throughput(counts, times, "nonpad") == pytest.approx(600.0)
    # The peer's mistake (volume / mean step time) would give 1800.
    assert throughput(counts, times, "nonpad") != pytest.approx(600 / (sum(times) / 3))


def test_step_stats_median_and_spread():
    s = step_stats([0.1, 0.2, 0.3, 0.4, 10.0])
    assert s["median"] == 0.3 and s["min"] == 0.1 and s["max"] == 10.0 and s["n"] == 5
    assert s["iqr"] == pytest.approx(0.4 - 0.2)


def test_flop_model_matches_hand_count_for_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    v, d, layers, b, t = 500, 32, 2, 4, 16
    model = GPT2LMHeadModel(GPT2Config(vocab_size=v, n_embd=d, n_layer=layers, n_head=2, n_positions=64,
                                       bos_token_id=1, eos_token_id=2))
    # Per block: qkv (d x 3d) + proj (d x d) + mlp (d x 4d) + (4d x d) = 12 d^2; plus the tied LM head v x d.
    n_matmul = layers * 12 * d * d + v * d
    expected = b * (6 * n_matmul * t + 12 * d * layers * t * t)
    assert flop_model(model, "decoder")((b, t, 0)) == expected


def test_no_peak_means_no_mfu_guess():
    # TF32 is a CUDA tensor-core mode: a CPU has no such peak, and MFU stays None rather than a guess.
    peak, why = device_peak(torch.device("cpu"), "tf32")
    assert peak is None and "no peak" in why


def test_encoded_cache_round_trip_and_keying(tmp_path, monkeypatch):
    monkeypatch.setenv("FTBENCH_CACHE", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"train": [Encoded([1, 2, 3], [-100, 2, 3], 0), Encoded([4], [4], 2)], "validation": []}

    a = cached_encode({"seq_len": 8}, compute)
    b = cached_encode({"seq_len": 8}, compute)
    assert len(calls) == 1 and a == b
    cached_encode({"seq_len": 16}, compute)
    assert len(calls) == 2
    # Stored without pickle: a numpy archive of integer arrays.
    (entry,) = [p for p in (tmp_path / "encoded").iterdir() if p.suffix == ".npz"][:1]
    import numpy as np

    with np.load(entry, allow_pickle=False) as z:
        assert all(z[k].dtype == np.int64 for k in z.files)


def test_block_stacks_are_the_outermost_stacks_of_every_kind():
    from transformers import T5Config, T5ForConditionalGeneration

    from ftbench.harness.cell.modeling import apply_tuning, block_stacks

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                             num_decoder_layers=3, num_heads=2))
    stacks = block_stacks(t5)
    # encoder.block and decoder.block, not each T5Block's inner 'layer' list.
    assert [len(s) for s in stacks] == [2, 3]
    apply_tuning(t5, "freeze-lower", 1)
    frozen = {n.split(".")[0] + "." + n.split(".")[2] for n, p in t5.named_parameters()
              if not p.requires_grad and ".block." in n}
    assert frozen == {"encoder.0", "decoder.0"}
