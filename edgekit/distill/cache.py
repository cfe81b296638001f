"""Teacher-logit cache: run the teacher once, train the student many times without it.

For every position of every training sequence the cache keeps a sparse view of the
teacher's next-token distribution, in safetensors shards:

- ``topk``:    the k largest logits (float16) and their token ids;
- ``sampled``: ``samples`` tokens drawn from the teacher's distribution at the cache
  temperature, stored as unique ids with weights count/samples -- an unbiased estimate
  of the distribution, where top-k is biased towards its head (Sparse Logit Sampling,
  Anshumann et al. 2025, arXiv 2503.16870).

Each shard also holds the sequences themselves (``input_ids``, ``labels``) and their
offsets, so training from the cache needs neither the teacher nor the tokenizer.
Shards are written one at a time (temp + rename), so a killed build resumes from the
last finished shard; the folder is published with its manifest when complete.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgekit import artifact
from edgekit.distill.batch import collate
from edgekit.distill.config import CacheConfig
from edgekit.errors import CacheError
from edgekit.progress import bar

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger(__name__)


def _sparse_targets(logits: torch.Tensor, cfg: CacheConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, vocab] logits -> ([n, k] indices, [n, k] float16 values) per the cache mode."""
    import torch

    if cfg.mode == "topk":
        values, indices = logits.float().topk(cfg.k, dim=-1)
        return indices, values.half()
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    draws = torch.multinomial(probs, cfg.k, replacement=True, generator=gen)  # [n, k]
    draws, _ = draws.sort(dim=-1)
    # unique ids per row with their counts, padded with (0, weight 0)
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    counts = torch.zeros_like(draws, dtype=torch.float32)
    group = first.cumsum(-1) - 1  # index of the unique slot each draw belongs to
    counts.scatter_add_(1, group, torch.ones_like(counts))
    indices = torch.zeros_like(draws)
    indices.scatter_(1, group, draws)
    return indices, (counts / cfg.k).half()


def _write_shard(path: Path, seqs: list[dict], indices: list[np.ndarray], values: list[np.ndarray], vocab: int) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    idx_dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max else np.int32
    offsets = np.cumsum([0] + [len(s["input_ids"]) for s in seqs]).astype(np.int64)
    tensors = {
        "input_ids": np.concatenate([np.asarray(s["input_ids"], np.int32) for s in seqs]),
        "labels": np.concatenate([np.asarray(s["labels"], np.int32) for s in seqs]),
        "offsets": offsets,
        "indices": np.concatenate(indices).astype(idx_dtype),
        "values": np.concatenate(values).astype(np.float16),
    }
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp))
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise artifact.disk_error(e, path) from e


def build(cfg: CacheConfig, teacher, sequences: list[dict], out_dir: Path) -> Path:
    """Run ``teacher`` (a causal LM) over ``sequences`` ({input_ids, labels}) and write the cache folder."""
    import torch

    out_dir = Path(out_dir)
    config = {"cache": cfg.model_dump(), "sequences": artifact.content_id([s["input_ids"] for s in sequences])}
    with artifact.stage("logit-cache", config, at=out_dir) as st:
        if st.reused:
            log.info("logit cache %s is complete; reusing it", out_dir)
            return out_dir
        work = st.work  # finished shards, kept across interruptions
        work.mkdir(parents=True, exist_ok=True)
        marker = work / "config.json"
        if marker.is_file() and json.loads(marker.read_text()) != config:
            shutil.rmtree(work)
            work.mkdir(parents=True)
        artifact.atomic_write_text(marker, json.dumps(config))

        vocab = teacher.config.vocab_size
        teacher.eval()
        n_shards = -(-len(sequences) // cfg.sequences_per_shard)
        tokens = sum(len(s["input_ids"]) for s in sequences)
        began = time.perf_counter()
        with bar(total=tokens, desc="teacher logits", unit="tok") as progress:
            for shard in range(n_shards):
                seqs = sequences[shard * cfg.sequences_per_shard:(shard + 1) * cfg.sequences_per_shard]
                path = work / f"shard-{shard:05d}.safetensors"
                if path.is_file():  # finished before an interruption
                    progress.update(sum(len(s["input_ids"]) for s in seqs))
                    continue
                gen = torch.Generator().manual_seed(cfg.seed * 100_003 + shard)
                all_idx, all_val = [], []
                for b in range(0, len(seqs), cfg.batch_size):
                    batch = seqs[b:b + cfg.batch_size]
                    padded = collate(batch, None)
                    ids, mask = padded["input_ids"], padded["attention_mask"]
                    with torch.no_grad():
                        logits = teacher(input_ids=ids, attention_mask=mask).logits
                    for i, s in enumerate(batch):
                        idx, val = _sparse_targets(logits[i, :len(s["input_ids"])], cfg, gen)
                        all_idx.append(idx.numpy())
                        all_val.append(val.numpy())
                    progress.update(int(mask.sum()))
                _write_shard(path, seqs, all_idx, all_val, vocab)
                artifact.fault_point("cache.shard")
        for p in sorted(work.glob("shard-*.safetensors")):
            shutil.copy2(p, st.tmp / p.name)
        size = sum(p.stat().st_size for p in st.tmp.glob("shard-*.safetensors"))
        st.metrics = {"sequences": len(sequences), "tokens": tokens, "bytes": size,
                      "bytes_per_token": size / max(tokens, 1), "mode": cfg.mode, "k": cfg.k, "vocab_size": vocab,
                      "seconds": round(time.perf_counter() - began, 1)}  # this run's (shards done before: not)
    return out_dir


@dataclass
class CachedSequence:
    input_ids: torch.Tensor  # [L] long
    labels: torch.Tensor  # [L] long
    indices: torch.Tensor  # [L, k] long
    values: torch.Tensor  # [L, k] float32


class LogitCache:
    """Read access to a built cache: each read slices one sequence out of a shard file, so the
    cache is never loaded whole and nothing of the teacher is needed."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        manifest = artifact.read_manifest(self.folder)
        if manifest.get("stage") != "logit-cache":
            raise CacheError(f"{self.folder} is not a logit cache (stage {manifest.get('stage')!r})")
        self.mode = manifest["config"]["cache"]["mode"]
        self.temperature = manifest["config"]["cache"]["temperature"]
        self.metrics = manifest["metrics"]
        self._shards = [safe_open(str(p), framework="np") for p in sorted(self.folder.glob("shard-*.safetensors"))]
        self._offsets = [f.get_tensor("offsets") for f in self._shards]
        self._where = [(s, i) for s, off in enumerate(self._offsets) for i in range(len(off) - 1)]

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, n: int) -> CachedSequence:
        import numpy as np
        import torch

        s, i = self._where[n]
        f, off = self._shards[s], self._offsets[s]
        a, b = int(off[i]), int(off[i + 1])

        def read(name, dtype):
            return torch.from_numpy(np.ascontiguousarray(f.get_slice(name)[a:b]).astype(dtype))

        return CachedSequence(read("input_ids", np.int64), read("labels", np.int64), read("indices", np.int64),
                              read("values", np.float32))
