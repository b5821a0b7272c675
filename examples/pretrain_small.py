"""Pre-train a small GPT-2 or Llama-shaped model and save it as a local checkpoint.

No download is possible (or needed) here: this trains a byte-level BPE
tokenizer and a small causal LM on a text corpus and writes a Hugging Face
model directory (config, safetensors weights, tokenizer) that ``ftbench run
--model DIR`` fine-tunes like any real pretrained checkpoint.

    python examples/pretrain_small.py --data ../shared/data/tiny_shakespeare --out ckpt/shakespeare-gpt2 \
        --arch gpt2 --steps 400

``--data`` is a directory with ``train.jsonl`` rows ``{"text": ...}`` (the
``generation`` task's layout), or ``builtin`` for that task's synthetic text.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def corpus(data: str) -> list[str]:
    if data == "builtin":
        from ftbench.tasks.generation import synthetic_sentences

        return synthetic_sentences(2000, seed=1)
    path = Path(data) / "train.jsonl"
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def pretrain(texts: list[str], out: str, arch: str = "gpt2", steps: int = 200, width: int = 128, layers: int = 4,
             seq_len: int = 128, batch: int = 16, lr: float = 1e-3, vocab: int = 2000, seed: int = 0) -> str:
    """Train a tokenizer and a ``arch`` model on ``texts`` for ``steps`` steps; save both to ``out``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from ftbench.harness.cell.tokenization import train_tokenizer

    torch.manual_seed(seed)
    tok = train_tokenizer(texts, vocab)
    specials = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=width, n_layer=layers,
                                           n_head=4, **specials))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=width * 3,
                                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=512, tie_word_embeddings=True, **specials))
    # One token stream, EOS between texts, cut into seq_len rows (the usual LM pre-training layout).
    ids: list[int] = []
    for t in texts:
        ids += [tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rows = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        chunk = rows[[rng.randrange(len(rows)) for _ in range(batch)]]
        loss = model(input_ids=chunk, labels=chunk).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    pretrain(corpus(args.data), args.out, args.arch, args.steps, args.width, args.layers, args.seq_len, lr=args.lr)


if __name__ == "__main__":
    main()
