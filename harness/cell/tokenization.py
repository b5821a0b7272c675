"""Offline tokenizers for preset models, trained on the task's own text.

A byte-level BPE is trained with the ``tokenizers`` library and cached on
disk keyed by a hash of its inputs, so a grid of many cells trains it once.
The cache write is atomic (temp file + rename), which keeps concurrent cells
safe: the last writer wins with an identical file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<sep>", "<cls>", "<mask>"]


def cache_root() -> Path:
    """``$FTBENCH_CACHE`` (default ``~/.cache/ftbench``), not created."""
    return Path(os.environ.get("FTBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ftbench"))


def cache_dir() -> Path:
    path = cache_root()
    path.mkdir(parents=True, exist_ok=True)
    return path


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A ``PreTrainedTokenizerFast`` trained on ``texts`` (cached by content).

    Example::

        tok = train_tokenizer(["hello world"] * 10, vocab_size=300)
        tok.pad_token_id   # 0
    """
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    h = hashlib.sha256(f"v1|{vocab_size}|".encode())
    for t in texts:
        h.update(t.encode("utf-8", "replace"))
        h.update(b"\x00")
    path = cache_dir() / "tokenizers" / f"bpe-{h.hexdigest()[:20]}.json"
    if not path.exists():
        _train_to(path, texts, vocab_size)
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(path), pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", sep_token="<sep>", cls_token="<cls>", mask_token="<mask>")
    # Identifies the trained vocabulary for caches of encoded data.
    tok.ftbench_identity = path.stem
    return tok


def _train_to(path: Path, texts: list[str], vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    tok.save(tmp)
    os.replace(tmp, path)
