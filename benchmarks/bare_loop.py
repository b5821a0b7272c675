"""The minimal hand-written reference that ftbench's cells are measured against.

The same model config (the tiny GPT-2 preset), the very same token batches
(prepared with ftbench's data code before any clock starts), AdamW with the
same hyper-parameters, clipping and cosine schedule, the same steps and
warmup; in the timed loop nothing else: no harness, no per-step loss
bookkeeping.  Prints one JSON line with its padded tokens/s, measured the way
ftbench measures (tokens of the measured steps over their summed time).

    python benchmarks/bare_loop.py --mode eager --vocab 1200 --steps 60 --warmup 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time


def same_batches(args) -> list:
    """The very token batches an ftbench generation cell trains on (built-in
    data, its tokenizer, its data order and padding), prepared before any
    clock starts: the comparison is about the loop, not the data."""
    from ftbench.harness.contract.config import Recipe
    from ftbench.harness.cell.rowsource import open_sources, read_rows
    from ftbench.harness.cell.modeling import collate, encode_example
    from ftbench.harness.contract.registry import Registry
    from ftbench.harness.cell.tokenization import train_tokenizer
    from ftbench.harness.cell.batches import batch_plan

    task = Registry.load().task("generation")
    recipe = Recipe(steps=args.steps, warmup=args.warmup, batch_size=args.batch, seq_len=args.seq)
    splits = {name: read_rows(src, range(len(src)), task, {}, {})
              for name, src in open_sources(task, "builtin", {}, recipe.seed).items()}
    tok = train_tokenizer((t for ex in splits["train"] for t in task.texts(ex, {})), 2000)
    assert len(tok) == args.vocab, "pass the vocab size of the ftbench cell"
    enc = [encode_example(task, ex, tok, "decoder", args.seq, {}) for ex in splits["train"]]
    out = []
    for _, (micro,) in batch_plan(len(enc), recipe, 1, 0, recipe.seed):
        b = collate([enc[i] for i in micro], "decoder", "lm", tok.pad_token_id, args.seq, recipe.padding)
        out.append((b["input_ids"], b["attention_mask"], b["labels"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["eager", "compile", "zero2"], default="eager")
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    t_start = time.perf_counter()
    if args.mode == "zero2":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=512, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = GPT2LMHeadModel(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    sched = lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))  # noqa: E731
    batches = same_batches(args)

    if args.mode == "zero2":
        import deepspeed

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
        deepspeed.init_distributed(dist_backend="gloo")
        opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        ds_config = {"train_batch_size": args.batch, "train_micro_batch_size_per_gpu": args.batch,
                     "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                     "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config,
                                                 lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, sched))
        net = engine
    else:
        opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, sched)
        net = torch.compile(model) if args.mode == "compile" else model

    setup_s = time.perf_counter() - t_start
    times = []
    for ids, mask, labels in batches:
        t0 = time.perf_counter()
        logits = net(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        if args.mode == "zero2":
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
            lr_sched.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    measured = times[args.warmup:]
    med = sorted(measured)[len(measured) // 2]
    print(json.dumps({
        "mode": args.mode,
        "padded_tokens_per_s": args.batch * args.seq * len(measured) / sum(measured),
        "step_time_s": med,
        "compile_s": sum(times[: args.warmup]) - args.warmup * med if args.mode == "compile" else None,
        "setup_s": setup_s,
    }))


if __name__ == "__main__":
    main()
