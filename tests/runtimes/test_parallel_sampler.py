"""llama.cpp with many sequences in flight (the data stage's teacher): the same tokens as one sequence at a time."""

import numpy as np
import pytest

from edgekit.distill import data
from edgekit.distill.config import DataConfig
from edgekit.errors import ConfigError
from edgekit.runtimes import llamacpp
from edgekit.runtimes.llamacpp import LlamaSession, ParallelSampler, SampleRequest, _pick

pytest.importorskip("llama_cpp")

PROMPTS = [[1, 5, 9, 13], [2, 7], [3, 11, 4, 8, 20, 6], [4], [10, 12, 14], [30, 31, 32, 33, 34], [40, 41]]


@pytest.fixture(scope="module")
def tiny_gguf(exporter_output, tiny_bpe_llama_dir):
    return exporter_output(tiny_bpe_llama_dir, "gguf", "f32")[0]


def _requests(temperature=0.0, top_p=1.0, stop=frozenset(), n=12):
    return [SampleRequest(p, n, temperature, top_p, stop, seed=100 + i) for i, p in enumerate(PROMPTS)]


def _run(path, requests, slots, flash_attention=True):
    sampler = ParallelSampler(path, slots=slots, threads=1, flash_attention=flash_attention)
    try:
        return dict(sampler.run(requests))
    finally:
        sampler.close()


@pytest.mark.parametrize("flash_attention", [True, False])
def test_greedy_with_slots_reused_equals_one_sequence_at_a_time(tiny_gguf, flash_attention):
    session = LlamaSession(tiny_gguf, threads=1, context=64)
    try:
        alone = [session.generate(p, 12) for p in PROMPTS]
        stop = frozenset({alone[0][5]})  # a token the first answer meets: that one must stop there
        alone_stopping = [session.generate(p, 12, eos_ids=stop) for p in PROMPTS]
    finally:
        session.close()
    # 7 prompts through 3 slots: slots are freed and taken again
    got = _run(tiny_gguf, _requests(), slots=3, flash_attention=flash_attention)
    assert [got[i].tokens for i in range(len(PROMPTS))] == alone
    assert all(got[i].stop is None for i in got)
    got = _run(tiny_gguf, _requests(stop=stop), slots=3, flash_attention=flash_attention)
    for i, want in enumerate(alone_stopping):
        result = got[i]
        assert result.tokens + ([result.stop] if result.stop is not None else []) == want
    assert got[0].stop in stop and len(got[0].tokens) <= 5


def test_a_shared_prompt_prefix_is_prefilled_once_and_changes_no_token(tiny_gguf, monkeypatch):
    """Prompts that open alike (a chat template's system turn) start from one prefilled copy of that opening:
    the greedy tokens are still those of one sequence at a time, and only the differing tails are prefilled."""
    prefix = [7, 3, 9, 21, 5, 17, 2, 30, 11, 6]
    prompts = [prefix + tail for tail in ([1, 5, 9], [2], [3, 11, 4, 8], [40, 41], [13, 12])]
    session = LlamaSession(tiny_gguf, threads=1, context=64)
    try:
        alone = [session.generate(p, 10) for p in prompts]
    finally:
        session.close()
    prefilled = []
    real = ParallelSampler._decode
    monkeypatch.setattr(ParallelSampler, "_decode", lambda self, entries: (prefilled.extend(
        e for e in entries if e[2] < len(prefix)), real(self, entries))[1])
    requests = [SampleRequest(p, 10, 0.0, 1.0, frozenset(), seed=i) for i, p in enumerate(prompts)]
    got = _run(tiny_gguf, requests, slots=2)  # 5 prompts through 2 slots: copies into reused slots too
    assert [got[i].tokens for i in range(len(prompts))] == alone
    assert sorted(e[2] for e in prefilled) == list(range(len(prefix)))  # the opening, once, in its own sequence
    # a prompt that is all prefix still prefills its last token itself (its first logits come from there)
    got = _run(tiny_gguf, [SampleRequest(prefix, 6, 0.0, 1.0, frozenset(), seed=i) for i in range(3)], slots=2)
    session = LlamaSession(tiny_gguf, threads=1, context=64)
    try:
        assert [got[i].tokens for i in range(3)] == [session.generate(prefix, 6)] * 3
    finally:
        session.close()


def test_a_sample_does_not_depend_on_its_batch_mates(tiny_gguf):
    together = _run(tiny_gguf, _requests(temperature=0.9, top_p=0.95), slots=4)
    alone = _run(tiny_gguf, _requests(temperature=0.9, top_p=0.95)[2:3], slots=1)
    assert together[2].tokens == alone[0].tokens
    assert together[2].logprob_sum == pytest.approx(alone[0].logprob_sum, rel=1e-5)
    # and the seeds matter: another seed gives another sample for at least one prompt
    reseeded = [SampleRequest(r.prompt, r.max_new_tokens, r.temperature, r.top_p, r.stop_ids, r.seed + 7)
                for r in _requests(temperature=0.9, top_p=0.95)]
    other = _run(tiny_gguf, reseeded, slots=4)
    assert any(other[i].tokens != together[i].tokens for i in together)


def test_the_score_is_the_untempered_log_probability_of_each_sampled_token(tiny_gguf):
    got = _run(tiny_gguf, _requests(temperature=1.3, top_p=0.8, n=8), slots=4)
    session = LlamaSession(tiny_gguf, threads=1, context=64, all_logits=True)
    try:
        for i, prompt in enumerate(PROMPTS):
            ids = prompt + got[i].tokens
            logits = session.logits(ids).astype(np.float64)
            logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
            want = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(got[i].tokens))
            assert got[i].logprob_sum == pytest.approx(want, abs=1e-3)
    finally:
        session.close()


def test_pick_keeps_the_nucleus_and_reports_the_untempered_log_probability():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1000).astype(np.float32) * 3
    logp = logits.astype(np.float64) - np.logaddexp.reduce(logits.astype(np.float64))
    token, lp = _pick(logits, 0.0, 1.0, rng)
    assert token == int(logits.argmax()) and lp == pytest.approx(logp[token])
    assert {_pick(logits, 1.0, 1e-9, rng)[0] for _ in range(20)} == {int(logits.argmax())}
    # nucleus 0.5 at T=1: only the fewest top tokens holding half the mass are ever drawn (checked by a full sort)
    p = np.exp(logp)
    order = np.argsort(-p)
    nucleus = set(order[:int(np.searchsorted(np.cumsum(p[order]), 0.5)) + 1].tolist())
    drawn = {_pick(logits, 1.0, 0.5, rng)[0] for _ in range(300)}
    assert drawn <= nucleus and len(drawn) > 1
    # a nucleus wider than the top 256 falls back to a full sort (flat logits: every token is in it)
    flat = np.zeros(1000, dtype=np.float32)
    assert len({_pick(flat, 1.0, 0.99, rng)[0] for _ in range(400)} - set(range(256))) > 0


@pytest.mark.parametrize("top_p", [1.0, 0.95, 0.5])
def test_pick_draws_the_token_a_full_sort_of_the_vocabulary_draws(top_p):
    """_pick sorts only the tokens above a probability floor (lowered until they hold the nucleus, or for
    top_p 1 the draw): the token is the one a float64 sort of the whole vocabulary gives for the same draw."""
    def full_sort(logits, temperature, u):
        p = np.exp((logits.astype(np.float64) - logits.max()) / temperature)
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        mass = np.cumsum(p[order])
        keep = int(np.searchsorted(mass, min(top_p, 1 - 1e-12))) + 1
        return int(order[min(int(np.searchsorted(mass[:keep], u * mass[keep - 1], side="right")), keep - 1)])

    g = np.random.default_rng(3)
    below_first_floor = 0
    for scale in (0.3, 1.5, 4.0):  # flat (draws far down the order) to peaked (draws among a few tokens)
        logits = (g.normal(size=4096) * scale).astype(np.float32)
        p = np.exp((logits.astype(np.float64) - logits.max()) / 0.8)
        p /= p.sum()
        for seed in range(60):
            token, _ = _pick(logits, 0.8, top_p, np.random.default_rng(seed))
            assert token == full_sort(logits, 0.8, np.random.default_rng(seed).random()), (scale, seed)
            below_first_floor += int(p[token] < llamacpp.NUCLEUS_FLOORS[0])
    assert 0 < below_first_floor < 180  # the first floor was enough for some draws, not for others


def test_backend_choice_and_its_refusals(tiny_gguf):
    assert data.choose_backend(DataConfig(), None) == "pytorch"
    assert data.choose_backend(DataConfig(), tiny_gguf) == "llama.cpp"  # no GPU here
    assert data.choose_backend(DataConfig(backend="pytorch"), tiny_gguf) == "pytorch"
    with pytest.raises(ConfigError, match="came from a GGUF"):
        data.choose_backend(DataConfig(backend="llama.cpp"), None)


def test_magpie_rounds_sampled_together_equal_rounds_sampled_alone(tiny_gguf, tiny_bpe_llama_dir):
    """The data stage samples several prompt rounds in one continuous batch: each round is what it is alone."""
    from transformers import AutoTokenizer

    from edgekit.chat import ChatFormat
    from edgekit.distill import synth

    tok = AutoTokenizer.from_pretrained(str(tiny_bpe_llama_dir))
    chat = ChatFormat(eot_text="", stop_ids=frozenset({2}), pad_id=2)
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5)
    sampler = ParallelSampler(tiny_gguf, slots=3, threads=1)
    try:
        together = list(synth._sample_prompt_rounds(sampler, tok, [1, 5, 9], chat, 4, range(3), **kw))
        alone = [next(synth._sample_prompt_rounds(sampler, tok, [1, 5, 9], chat, 4, [r], **kw)) for r in range(3)]
    finally:
        sampler.close()
    assert [r for r, _ in together] == [0, 1, 2] and together == alone
    together = [samples for _, samples in together]
    assert [len(r) for r in together] == [4, 4, 4] and together[0] != together[1]  # each round has its own seeds
