"""ZeRO in fp16 against eager fp16, in one process: does DeepSpeed clip loss-scaled gradients?

Both engines are ftbench's own (``StandardEngine`` with ``torch.amp.GradScaler``;
``DeepSpeedEngine`` with DeepSpeed's ``torch_autocast`` section), same recipe
(clip 1.0), same model and batches; the losses of 4 steps are printed side by
side with DeepSpeed's reported global gradient norm.  Runs on CPU
(``DS_ACCELERATOR=cpu``) or on a GPU (``--device cuda``)::

    python benchmarks/zero_fp16_probe.py --stage 2 [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import os

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from ftbench import EngineContext, StandardEngine
    from ftbench.harness.contract.config import Recipe
    from ftbench.plugins.deepspeed_zero import DeepSpeedEngine

    def loss_fn(model, batch):
        return ((model(batch["x"]) - batch["y"]).float() ** 2).sum()

    device = torch.device(args.device)
    recipe = Recipe(precision="fp16", steps=10, warmup=1, lr=1e-2, max_grad_norm=1.0, schedule="constant")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    batches = [{"x": torch.randn(8, 16), "y": torch.randn(8, 4), "loss_scale": 1 / 8} for _ in range(4)]
    losses = {}
    for name, cls, opts in (("eager", StandardEngine, {}), (f"zero{args.stage}", DeepSpeedEngine,
                                                            {"stage": args.stage})):
        engine = cls(opts, EngineContext(recipe, device, loss_fn))
        engine.setup(copy.deepcopy(base))
        losses[name] = []
        for b in batches:
            losses[name].append(float(engine.forward_backward(b, boundary=True)))
            engine.step()
        if name != "eager":
            print(f"{name}: DeepSpeed's global grad norm after the last step: {engine.ds.get_global_grad_norm()}")
    for step, pair in enumerate(zip(*losses.values())):
        print(f"step {step}: " + "  ".join(f"{n} {v:.6f}" for n, v in zip(losses, pair))
              + f"  rel dev {abs(pair[1] - pair[0]) / abs(pair[0]):.1e}")


if __name__ == "__main__":
    main()
