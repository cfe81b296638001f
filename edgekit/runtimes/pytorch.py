"""PyTorch: the float HF model in fp32, the reference every export is compared with.

The session uses transformers' KV cache (``DynamicCache``) and no ``generate()`` logic, so its
greedy tokens come from the same prefill / one-token-decode loop as every other runtime.
:func:`load_model` is the one way edgekit loads an HF folder to run it (safetensors only: a
pickle-only folder is refused, never unpickled).
"""

from __future__ import annotations

from pathlib import Path

from edgekit import registry
from edgekit.integrity import check_weights_folder
from edgekit.runtimes import NO_GPU, Runtime, greedy, hf_tokenizer


def load_model(folder: Path, device: str = "cpu"):
    """The HF causal LM in ``folder``, fp32, in eval mode on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    check_weights_folder(folder)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True
                                                ).to(device).eval()


class TorchSession:
    def __init__(self, folder: Path, threads: int | None = None, *, gpu: bool = False, context: int | None = None,
                 all_logits: bool = False):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.folder = Path(folder)
        self.device = "cuda" if gpu else "cpu"
        self.model = load_model(self.folder, self.device)
        self.context = getattr(self.model.config, "max_position_embeddings", None)
        self._tokenize = None
        self._past, self._token = None, None

    def tokenize(self, text: str) -> list[int]:
        if self._tokenize is None:
            self._tokenize = hf_tokenizer(self.folder)
        return self._tokenize(text)

    def logits(self, ids: list[int]):
        """[len(ids), vocab] float32 logits of a fresh sequence, as a numpy array."""
        with self.torch.inference_mode():
            return self.model(self.torch.tensor([list(ids)], device=self.device)).logits[0].float().cpu().numpy()

    def _step(self, ids: list[int]) -> int:
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([ids], device=self.device), past_key_values=self._past, use_cache=True)
        self._past = out.past_key_values
        self._token = int(out.logits[0, -1].argmax())
        return self._token

    def prefill(self, ids: list[int]) -> int:
        from transformers import DynamicCache

        self._past = DynamicCache()
        return self._step(list(ids))

    def decode(self, n: int) -> list[int]:
        return [self._step([self._token]) for _ in range(n)]

    def generate(self, ids: list[int], n: int, eos_ids=()) -> list[int]:
        return greedy(self, ids, n, eos_ids)

    def close(self) -> None:
        self._past = None
        self.model = None


def _gpu() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    why = "this torch build has no CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
    return f"{NO_GPU}: {why}"


RUNTIME = Runtime("pytorch", ("pytorch",), "torch", "torch", TorchSession, _gpu,
                  description="the float HF model in PyTorch (fp32 reference)", min_version="2.6")


def register(reg: registry.Registry) -> None:
    """Entry point (group ``edgekit``)."""
    reg.add(registry.RUNTIME, RUNTIME.name, RUNTIME)
