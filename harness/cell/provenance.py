"""What a cell trained, as content digests: enough to tell whether two result sets trained the same thing.

The record's ``provenance``:

- ``model_digest``: SHA-256 over a model directory's files (names and
  contents; a digest per file is cached by path, size and modification
  time, so a large checkpoint is read once), or over a preset's config;
- ``data_digest``: SHA-256 of the rows the cell read (the training rows in
  first-use order, then the evaluation rows), as canonical JSON;
- ``tokenizer_digest``: SHA-256 of the tokenizer's serialised form;
- ``software``: on CUDA, the driver, CUDA, cuDNN and NCCL versions (the
  package versions and the commit are in ``environment``).

Two cells with equal digests read the same rows, through the same
tokenizer, into the same starting weights.

Example::

    digest_rows(rows)      # 'sha256:3f2c...'
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from ftbench.harness.cell.tokenization import cache_dir

#: Files of a model directory left out of its digest (caches and lock files, not the model).
SKIP = (".git", "__pycache__", ".cache", ".lock")


def _sha(parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


def file_digest(path: Path, memo: dict) -> str:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key not in memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        memo[key] = h.hexdigest()
    return memo[key]


def _memo_path() -> Path:
    return cache_dir() / "file-digests.json"


def digest_directory(root: str | os.PathLike) -> str:
    """Digest of every file under ``root`` (relative names and contents), per-file digests cached."""
    root = Path(root)
    try:
        memo = json.loads(_memo_path().read_text())
    except (OSError, ValueError):
        memo = {}
    size = len(memo)
    parts = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if any(part in SKIP or part.endswith(".lock") for part in rel.parts):
            continue
        parts += [rel.as_posix(), file_digest(path, memo)]
    if len(memo) != size:
        tmp = _memo_path().with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, _memo_path())  # atomic: ranks and cells may write it at once
    return _sha(parts)


def digest_model(source, model) -> str:
    """A directory's files, or (a preset, a hub id) the model's config, which fixes its initialisation."""
    if source.path and os.path.isdir(source.path):
        return digest_directory(source.path)
    return _sha([source.name, model.config.to_json_string(use_diff=False)])


def digest_rows(*splits) -> str:
    """The rows read, in order, as canonical JSON."""
    return _sha(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str) for rows in splits for row in rows)


def digest_tokenizer(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return _sha([backend.to_str()])
    return _sha(sorted(tokenizer.get_vocab().items()))


def cuda_stack(torch) -> dict:
    """Driver, CUDA, cuDNN and NCCL versions on a CUDA machine ({} elsewhere)."""
    if not torch.cuda.is_available():
        return {}
    out = {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    try:
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except (AttributeError, RuntimeError):
        out["nccl"] = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        out["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        out["driver"] = None
    return out
