"""Is the eager peak memory what theory predicts, and how much is the harness's own?

1. The runner's own footprint: ``rss_before_model_bytes`` of a cell (torch,
   transformers, the harness, the data and tokenizer, before the model
   exists) against a bare process that only imports torch and transformers.
2. The training state: GPT-2 models of growing width (random init, saved
   as local model directories, so the real ``--model DIR`` path is used)
   trained by the eager backend; ``peak - rss_before_model`` against
   weights + gradients + two AdamW moments (16 bytes per fp32 parameter).
   Activations come on top, so the ratio should approach 1 from above as
   the model grows.

    python benchmarks/memory_check.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIDTHS = ((256, 4), (512, 6), (768, 8))


def bare_import_rss() -> int:
    code = ("import torch, transformers\nfrom transformers import GPT2LMHeadModel\n"
            "print(int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) * 1024)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def save_model(path: Path, width: int, layers: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from ftbench.harness.contract.registry import Registry
    from ftbench.harness.cell.tokenization import train_tokenizer

    task = Registry.load().task("generation")
    rows = task.builtin_data(0, {})["train"]
    tok = train_tokenizer((t for ex in rows for t in task.texts(ex, {})), 2000)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=width, n_layer=layers, n_head=8, n_positions=128,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for width, layers in WIDTHS:
            model_dir = Path(tmp) / f"gpt2-{width}x{layers}"
            save_model(model_dir, width, layers)
            out = Path(tmp) / f"out-{width}"
            subprocess.run([sys.executable, "-m", "ftbench.harness.cli", "run", "--task", "generation", "--backend", "eager",
                            "--model", str(model_dir), "--steps", "8", "--warmup", "2", "--seq-len", "64",
                            "--batch-size", "8", "--eval-examples", "8", "--out", str(out)],
                           check=True, cwd=ROOT, capture_output=True)
            r = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
            grown = r["peak_memory_bytes"] - r["rss_before_model_bytes"]
            rows.append((f"{width} x {layers}", r["total_params"], r["rss_before_model_bytes"], r["peak_memory_bytes"],
                         r["state_bytes_theory"], grown / r["state_bytes_theory"]))
    bare = bare_import_rss()
    mib = 2**20
    print(f"bare 'import torch, transformers' RSS: {bare / mib:.0f} MiB")
    print("| model (width x layers) | params | RSS before model | peak RSS | theory: weights+grads+AdamW "
          "| (peak - before) / theory |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, params, before, peak, theory, ratio in rows:
        print(f"| {name} | {params / 1e6:.1f} M | {before / mib:.0f} MiB | {peak / mib:.0f} MiB | "
              f"{theory / mib:.0f} MiB | {ratio:.2f} |")
    print(f"harness + data + tokenizer beyond the bare imports: "
          f"{(min(r[2] for r in rows) - bare) / mib:.0f} MiB")


if __name__ == "__main__":
    main()
