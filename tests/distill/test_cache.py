import json

import pytest
import torch

from edgekit import artifact
from edgekit.distill import cache as cache_mod
from edgekit.distill.cache import CacheConfig, LogitCache, build


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def _sequences(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        ids = torch.randint(3, 256, (8 + i,), generator=g).tolist()
        seqs.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return seqs


def test_topk_cache_round_trips_sequences_and_matches_the_teacher(tiny, tmp_path):
    seqs = _sequences()
    out = build(CacheConfig(k=16, sequences_per_shard=4, batch_size=3), tiny, seqs, tmp_path / "cache")
    c = LogitCache(out)
    assert len(c) == len(seqs) and len(list(out.glob("shard-*.safetensors"))) == 3
    assert artifact.verify_manifest(out) == []
    m = artifact.read_manifest(out)["metrics"]
    assert m["tokens"] == sum(len(s["input_ids"]) for s in seqs)
    # uint16 ids + fp16 values per logit, int32 input id + label, plus each shard's small header
    assert 16 * (2 + 2) + 8 <= m["bytes_per_token"] < 16 * (2 + 2) + 8 + 40
    for n in (0, 7, 9):
        item = c[n]
        assert item.input_ids.tolist() == seqs[n]["input_ids"] and item.labels.tolist() == seqs[n]["labels"]
        with torch.no_grad():
            logits = tiny(item.input_ids[None]).logits[0]
        top_v, top_i = logits.topk(16, -1)
        assert torch.equal(item.indices, top_i)
        assert torch.allclose(item.values, top_v, atol=2e-2)  # float16 storage


def test_sampled_cache_weights_are_distributions_that_track_the_teacher(tiny, tmp_path):
    seqs = _sequences(3)
    out = build(CacheConfig(mode="sampled", k=4096, sequences_per_shard=8), tiny, seqs, tmp_path / "cache")
    item = LogitCache(out)[2]
    assert torch.allclose(item.values.sum(-1), torch.ones(len(item.input_ids)), atol=1e-2)
    assert (item.values >= 0).all()
    with torch.no_grad():
        p = torch.softmax(tiny(item.input_ids[None]).logits[0], -1)
    p_hat = torch.zeros_like(p).scatter_add_(1, item.indices, item.values)
    assert (p_hat - p).abs().max() < 0.03  # 4096 draws: the empirical distribution is close to the teacher's


def test_cache_build_resumes_from_finished_shards(tiny, tmp_path, monkeypatch):
    seqs = _sequences(9)
    cfg = CacheConfig(k=8, sequences_per_shard=3)
    out = tmp_path / "cache"
    real = cache_mod._write_shard
    calls = []

    def dying(path, *a, **k):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(path, *a, **k)

    monkeypatch.setattr(cache_mod, "_write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        build(cfg, tiny, seqs, out)
    assert not out.exists()  # nothing published half-done
    monkeypatch.setattr(cache_mod, "_write_shard", lambda path, *a, **k: (calls.append(path.name), real(path, *a, **k)))
    build(cfg, tiny, seqs, out)
    assert calls == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00001.safetensors",
                     "shard-00002.safetensors"]
    assert len(LogitCache(out)) == 9
    before = (out / "manifest.json").read_text()
    build(cfg, tiny, seqs, out)  # complete: reused, not rebuilt
    assert (out / "manifest.json").read_text() == before
    assert json.loads(before)["config"]["cache"]["k"] == 8
