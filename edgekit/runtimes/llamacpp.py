"""llama.cpp (through llama-cpp-python): runs GGUF files.

Workaround, on purpose: with llama-cpp-python 0.3.36 on CPUs with AMX (recent Xeons), llama.cpp
repacks weights into its AMX "extra" buffer type at load time and then crashes with a segfault in
the first ``llama_decode`` (seen with the embedded teacher's Q4_1 GGUF, 1 or 2 threads). Turning
the extra buffer types off (``use_extra_bufts=False``) avoids it at no cost to correctness; other
CPUs keep llama.cpp's defaults, including the ARM repacking that makes Q4_0 fast.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from edgekit import registry
from edgekit.errors import ModelError
from edgekit.integrity import check_gguf
from edgekit.arch import DEFAULT_CONTEXT
from edgekit.runtimes import LOADERS, NO_GPU, Loader, Runtime, greedy

log = logging.getLogger(__name__)


def host_has_amx() -> bool:
    """True on a CPU with AMX tiles (``amx_tile`` in /proc/cpuinfo's flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return any(line.split(":", 1)[0].strip() == "flags" and "amx_tile" in line.split(":", 1)[1].split()
               for line in text.splitlines() if ":" in line)


@contextlib.contextmanager
def _model_params_without_extra_buffers():
    import llama_cpp
    import llama_cpp.llama as high_level

    original = llama_cpp.llama_model_default_params

    def patched():
        params = original()
        params.use_extra_bufts = False
        return params

    high_level.llama_cpp.llama_model_default_params = patched
    try:
        yield
    finally:
        high_level.llama_cpp.llama_model_default_params = original


def open_llama(path: Path, n_ctx: int = DEFAULT_CONTEXT, n_threads: int | None = None, logits_all: bool = False,
               verbose: bool = False):
    """A ``llama_cpp.Llama`` for ``path``; a bad file raises ModelError naming it.

    The GGUF's header is checked first (:func:`edgekit.integrity.check_gguf`): llama.cpp sizes its
    buffers from the header, so a truncated or hostile file must be refused before it opens it.
    """
    check_gguf(path)
    try:
        import llama_cpp
    except ImportError as e:
        raise ModelError("llama.cpp is not installed: pip install llama-cpp-python (it compiles llama.cpp)") from e
    amx = host_has_amx()
    guard = _model_params_without_extra_buffers() if amx else contextlib.nullcontext()
    if amx:
        log.debug("AMX CPU: loading %s without llama.cpp's extra buffer types (see edgekit.runtimes.llamacpp)", path)
    try:
        with guard:
            # swa_full=False: sliding-window layers (Gemma 3) cache their window + one micro-batch, not the
            # whole context -- what the planner counts; greedy output is unchanged (checked on Gemma 3 270M).
            return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, logits_all=logits_all,
                                   verbose=verbose, swa_full=False)
    except ValueError as e:  # llama-cpp-python raises ValueError("Failed to load model from file: ...")
        raise ModelError(f"llama.cpp cannot load {path}: the file is corrupt, truncated or not a GGUF ({e})") from e


def last_logits(llm):
    """Logits of the last evaluated token (llama-cpp-python only fills ``scores`` when logits_all=True)."""
    import llama_cpp
    import numpy as np

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


class LlamaSession:
    """A GGUF in llama.cpp; ``all_logits`` keeps every position's logits (for :meth:`logits`)."""

    def __init__(self, path: Path, threads: int | None = None, *, gpu: bool = False, context: int | None = None,
                 all_logits: bool = False):
        import llama_cpp

        if gpu:
            raise ModelError("llama.cpp GPU offload is not wired yet: edgekit.runtimes.llamacpp.open_llama takes no "
                             "n_gpu_layers; benchmark llama.cpp on the CPU")
        self.all_logits = all_logits
        self.llm = open_llama(path, n_ctx=context or DEFAULT_CONTEXT, n_threads=threads, logits_all=all_logits)
        if threads:  # open_llama sets n_threads only; llama-cpp-python defaults the batch threads to every CPU
            llama_cpp.llama_set_n_threads(self.llm.ctx, threads, threads)
        self.context = llama_cpp.llama_model_n_ctx_train(self.llm.model)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def logits(self, ids: list[int]):
        """[len(ids), vocab] float32 logits of a fresh sequence (needs ``all_logits=True``)."""
        import numpy as np

        if not self.all_logits:
            raise ModelError("llama.cpp keeps the last position's logits only: open the session with all_logits=True")
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def prefill(self, ids: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(list(ids))
        return int(last_logits(self.llm).argmax())

    def decode(self, n: int) -> list[int]:
        out = []
        token = int(last_logits(self.llm).argmax())
        for _ in range(n):
            self.llm.eval([token])
            token = int(last_logits(self.llm).argmax())
            out.append(token)
        return out

    def generate(self, ids: list[int], n: int, eos_ids=()) -> list[int]:
        return greedy(self, ids, n, eos_ids)

    def close(self) -> None:
        self.llm.close()


@dataclass(frozen=True)
class SampleRequest:
    """One sequence to sample: its prompt, how it stops, and its own seed (results do not depend on batch-mates)."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    stop_ids: frozenset[int]
    seed: int


@dataclass
class SampleResult:
    tokens: list[int]  # before the stop token
    stop: int | None  # the stop token, or None when max_new_tokens ran out first
    logprob_sum: float  # sum over tokens (+ stop) of the untempered log-probability: the teacher's own score


# A common prompt prefix shorter than this is prefilled by every slot: sharing it saves less than the copy costs.
MIN_SHARED_PREFIX = 8


class ParallelSampler:
    """Many sequences in flight in one llama.cpp context, as llama-server's slots do (continuous batching).

    Every step decodes one token for each running sequence in a single ``llama_decode`` batch, and a
    slot that finishes takes the next waiting request at once (its prompt joins the same batch), so
    the matrix products see ``slots`` columns instead of one. llama-cpp-python's ``Llama`` runs one
    sequence only, so the batch is assembled here with its low-level API. Sampling (temperature,
    top-p) is done here per sequence with that sequence's own seeded generator, so what a request
    gets does not depend on which requests shared its batches (up to llama.cpp's float rounding,
    which can differ with batch size). The prompts' common opening is prefilled once and copied into
    each slot (:meth:`_share_prefix`).
    """

    def __init__(self, path: Path, *, slots: int, threads: int | None = None, flash_attention: bool = True):
        """``flash_attention``: llama.cpp's fused attention kernel. With 32 sequences of the embedded teacher in
        flight on a 2-core CPU it cut a decode step from 109 to 95 ms (benchmarks/RESULTS.md, teacher data);
        off, the attention is computed as llama-cpp-python's ``Llama`` does (:class:`LlamaSession`), which
        gives the same greedy tokens as one sequence at a time there, bit for bit."""
        self.path, self.slots, self.threads = Path(path), slots, threads or max(1, os.cpu_count() or 1)
        self.flash_attention = flash_attention
        self.llm = open_llama(path, n_ctx=64, n_threads=self.threads)  # the model (header checked, AMX guard)
        self.vocab = self.llm.n_vocab()
        self.ctx, self.batch, self.per_slot, self.batch_tokens = None, None, 0, 0
        self.generation_config = None  # the HF folder's, when the caller has one (its eos ids stop turns too)

    def _context(self, per_slot: int, batch_tokens: int) -> None:
        """A context whose every slot holds ``per_slot`` tokens (kept when the current one is big enough), plus
        one more sequence of the same size, number ``self.slots``: the shared prompt prefix (:meth:`_share_prefix`)."""
        import llama_cpp

        if self.ctx and per_slot <= self.per_slot and batch_tokens <= self.batch_tokens:
            return
        self._free()
        per_slot, batch_tokens = -(-per_slot // 256) * 256, max(batch_tokens, self.batch_tokens)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = (self.slots + 1) * per_slot
        params.n_batch = params.n_ubatch = batch_tokens
        params.n_seq_max = self.slots + 1
        params.kv_unified = False  # each slot owns per_slot cells: one long answer cannot starve the others
        params.swa_full = False
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attention
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.no_perf = True
        params.n_threads = params.n_threads_batch = self.threads
        self.ctx = llama_cpp.llama_init_from_model(self.llm.model, params)
        if not self.ctx:
            raise ModelError(f"llama.cpp could not make a {self.slots} x {per_slot}-token context for {self.path}; "
                             "lower data.batch_size or data.max_new_tokens")
        self.batch = llama_cpp.llama_batch_init(batch_tokens, 0, 1)
        self.per_slot, self.batch_tokens = per_slot, batch_tokens

    def run(self, requests: list[SampleRequest]):
        """Sample every request; yields ``(index, SampleResult)`` as each finishes (not in request order)."""
        import llama_cpp
        import numpy as np

        if not requests:
            return
        if any(not r.prompt for r in requests):
            raise ModelError("an empty prompt cannot be sampled from")
        longest = max(len(r.prompt) for r in requests)
        self._context(max(len(r.prompt) + r.max_new_tokens for r in requests), max(512, longest + self.slots))
        memory = llama_cpp.llama_get_memory(self.ctx)
        shared = self._share_prefix(requests, memory)
        waiting = list(range(len(requests)))[::-1]
        running: dict[int, dict] = {}  # slot -> state
        free = list(range(self.slots))[::-1]
        while waiting or running:
            entries = []  # (slot, token, position, wants logits)
            for slot, st in running.items():  # the token each running sequence sampled last step
                entries.append((slot, st["last"], st["pos"], True))
                st["pos"] += 1
            budget = self.batch_tokens - len(entries)
            while waiting and free and len(requests[waiting[-1]].prompt) - shared <= budget:
                i, slot = waiting.pop(), free.pop()
                llama_cpp.llama_memory_seq_rm(memory, slot, -1, -1)
                if shared:  # the slot starts as a copy of the prefilled prefix: only the rest is prefilled
                    llama_cpp.llama_memory_seq_cp(memory, self.slots, slot, -1, -1)
                prompt = requests[i].prompt
                running[slot] = {"req": i, "pos": len(prompt), "tokens": [], "logprob": 0.0,
                                 "rng": np.random.default_rng(requests[i].seed), "last": None}
                entries.extend((slot, prompt[p], p, p == len(prompt) - 1) for p in range(shared, len(prompt)))
                budget -= len(prompt) - shared
            if not entries:  # cannot happen: the batch holds the longest prompt plus one token per slot
                raise ModelError(f"a prompt of {len(requests[waiting[-1]].prompt)} tokens does not fit a "
                                 f"{self.batch_tokens}-token batch")
            # grouped by sequence, in slot order: once slots are reused out of order, an unsorted batch took
            # about twice as long per step in llama.cpp (measured: 173 vs 82 ms for 32 sequences, bf16 teacher)
            entries.sort(key=lambda e: (e[0], e[2]))
            self._decode(entries)
            outputs = [e[0] for e in entries if e[3]]
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx), shape=(len(outputs), self.vocab))
            for row, slot in enumerate(outputs):
                st = running[slot]
                r = requests[st["req"]]
                token, logprob = _pick(logits[row], r.temperature, r.top_p, st["rng"])
                st["logprob"] += logprob
                stopped = token in r.stop_ids
                if not stopped:
                    st["tokens"].append(token)
                if stopped or len(st["tokens"]) >= r.max_new_tokens:
                    del running[slot]
                    free.append(slot)
                    yield st["req"], SampleResult(st["tokens"], token if stopped else None, st["logprob"])
                else:
                    st["last"] = token

    def _share_prefix(self, requests: list[SampleRequest], memory) -> int:
        """Prefill the prompts' common prefix once, into the extra sequence ``self.slots``; its length, or 0.

        The requests of one call usually share their chat template's opening (a system prompt, the role
        header; for Magpie the whole pre-query prompt), which every slot would otherwise prefill again.
        A slot then starts as a copy of that sequence (``llama_memory_seq_cp``; with a KV stream per
        sequence llama.cpp copies the whole stream, which holds just the prefix). The last prompt token is
        always prefilled by its own slot: that is where its first logits come from."""
        import llama_cpp

        first = requests[0].prompt
        n = min(len(r.prompt) for r in requests) - 1
        for r in requests[1:]:
            n = next((j for j in range(n) if r.prompt[j] != first[j]), n)
        llama_cpp.llama_memory_seq_rm(memory, self.slots, -1, -1)
        if len(requests) < 2 or n < MIN_SHARED_PREFIX:
            return 0
        self._decode([(self.slots, first[p], p, p == n - 1) for p in range(n)])
        return n

    def _decode(self, entries: list[tuple]) -> None:
        import llama_cpp

        b = self.batch
        b.n_tokens = len(entries)
        for j, (slot, token, pos, out) in enumerate(entries):
            b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = token, pos, 1, out
            b.seq_id[j][0] = slot
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            raise ModelError(f"llama.cpp could not decode a batch of {len(entries)} tokens (llama_decode returned "
                             f"{rc}); lower data.batch_size")

    def _free(self) -> None:
        import llama_cpp

        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    def close(self) -> None:
        self._free()
        self.llm.close()


# Probability floors tried in turn when looking for the nucleus: the tokens at or above a floor are sorted,
# and that is enough once they hold the nucleus's mass (or the draw's); the last floor, 0, is the whole vocabulary.
NUCLEUS_FLOORS = (1e-3, 1e-5, 1e-7, 0.0)


def _pick(logits, temperature: float, top_p: float, rng) -> tuple[int, float]:
    """One token from a row of logits (greedy at temperature 0, else temperature + nucleus), and its
    untempered log-probability. Nucleus: the fewest most-likely tokens whose mass reaches ``top_p``.

    Exact, without sorting the vocabulary: every token at or above a probability floor ranks above every
    token below it, so when the tokens above the floor hold ``top_p`` of the mass (for ``top_p`` 1: when
    the draw lands among them), sorting just those finds the same token a full sort does. Sampling runs
    in Python once per sequence per decode step: on random 49k-vocabulary logits a 256-way ``argpartition``
    of the vocabulary and float64 exponentials took 1-2 ms per token, this 0.15-0.25 ms. The
    exponentials run in float32, their sums in float64."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float32)
    m = float(x.max())
    shifted = x - np.float32(m)
    log_z = m + float(np.log(np.exp(shifted).sum(dtype=np.float64)))
    if temperature <= 0:
        t = int(x.argmax())
        return t, float(x[t]) - log_z
    p = np.exp(shifted / np.float32(temperature))
    p /= np.float32(p.sum(dtype=np.float64))
    u = rng.random()  # the one draw of this token, whichever floor finds it
    for floor in NUCLEUS_FLOORS:
        near = np.flatnonzero(p >= floor) if floor else np.arange(p.size)
        if not near.size:
            continue
        order = near[np.argsort(-p[near], kind="stable")]
        mass = np.cumsum(p[order], dtype=np.float64)
        if top_p >= 1:
            i = int(np.searchsorted(mass, u, side="right"))
            if i < order.size or not floor:
                t = int(order[min(i, order.size - 1)])
                return t, float(x[t]) - log_z
        elif mass[-1] >= top_p or not floor:
            keep = min(int(np.searchsorted(mass, top_p * (1 - 1e-12))) + 1, order.size)
            t = int(order[min(int(np.searchsorted(mass[:keep], u * mass[keep - 1], side="right")), keep - 1)])
            return t, float(x[t]) - log_z
    raise AssertionError("unreachable: the last floor holds the whole vocabulary")


def _gpu() -> str | None:
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        return None
    return f"{NO_GPU}: this llama-cpp-python build has no GPU offload (rebuild with CMAKE_ARGS=-DGGML_CUDA=on)"


# An app bundle's example loader: it asks only for what the bundled script uses (older than edgekit's own minimum).
LOADER = Loader(LOADERS / "run_llamacpp.py", min_version="0.3.0",
                note="On Intel AMX CPUs, llama-cpp-python 0.3.36 can crash unless llama.cpp's extra buffer types "
                     "are off; `{loader}` turns them off when it sees AMX (force with `--no-extra-buffers` or "
                     "`NO_EXTRA_BUFFERS=1`).")
RUNTIME = Runtime("llama.cpp", ("gguf",), "llama_cpp", "llama-cpp-python", LlamaSession, _gpu, gpu_variant=True,
                  description="llama.cpp through llama-cpp-python", min_version="0.3.16", loader=LOADER)


def register(reg: registry.Registry) -> None:
    """Entry point (group ``edgekit``)."""
    reg.add(registry.RUNTIME, RUNTIME.name, RUNTIME)
