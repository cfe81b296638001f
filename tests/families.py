"""Tiny random models of every family edgekit supports, built from transformers' own config classes.

``build_tiny(family, folder)`` writes a safetensors HF folder with a real tokenizer of the family's kind:

- byte-level BPE (GPT-2 style, as Llama 3, Qwen2/3, SmolLM and Phi-4 use) with a ChatML template;
- SentencePiece-style BPE with byte fallback (``▁`` for spaces, ``<0xNN>`` byte tokens), as Gemma 3,
  Phi-3 and Mistral ship it (Gemma without the leading-space prefix, the others with it), with the
  family's own chat template.

Each family's config turns on what makes it different (llama3 rope scaling; q/k/v biases; q/k norms;
Gemma 3's sliding/global layers with a window smaller than the tests' sequences, four norms per layer,
GeGLU and embedding scale; Phi-3's fused projections), so an exporter that ignores one of them fails
its parity test. Conftest builds each family once per session (``family_dir``).
"""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3", "phi3", "mistral")

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
                  "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + "
                  "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}"
                  "{% endif %}")
PHI3_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + "
                 "'<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
                    "{% endif %}{% endfor %}")

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, how are you today?",
          "Quantization trades bits for accuracy; distillation trades size for speed.",
          "def add(a, b):\n    return a + b\n", "1234567890 apples and 42 oranges", "  spaces   and\ttabs\n\nend"] * 20


def byte_level_bpe(folder: Path, vocab_size: int, template: str, corpus: list[str] = CORPUS) -> dict:
    """A byte-level BPE trained on ``corpus`` with ChatML specials and ``template``; returns its special ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token=None, pad_token="<|endoftext|>")
    fast.chat_template = template
    fast.save_pretrained(folder)
    return {"bos_token_id": fast.bos_token_id, "eos_token_id": fast.eos_token_id, "pad_token_id": fast.pad_token_id}


def _sentencepiece_bpe(folder: Path, vocab_size: int, template: str, specials: list[str], *, prefix: bool,
                       bos: str, eos: str, pad: str, cls: str) -> dict:
    """A SentencePiece-style BPE: spaces are ``▁``, unknown bytes fall back to ``<0xNN>`` tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    steps = ([normalizers.Prepend("▁")] if prefix else []) + [normalizers.Replace(" ", "▁")]
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False)
    # Trained on ``▁``-led words, as SentencePiece's trainer splits on whitespace; encoding then runs
    # without a pre-tokenizer, as SentencePiece models do.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.pre_tokenizer = None
    # The 256 byte tokens are plain vocabulary (as in SentencePiece models), not added/special tokens.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(256):
        vocab[f"<0x{i:02X}>"] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="<unk>",
                                   pad_token=pad, add_bos_token=True)
    fast.chat_template = template
    fast.save_pretrained(folder)
    # the class the family's checkpoints name (runtimes such as onnxruntime-genai pick their tokenizer by it)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": cls}, indent=2))
    return {"bos_token_id": fast.convert_tokens_to_ids(bos), "eos_token_id": fast.convert_tokens_to_ids(eos),
            "pad_token_id": fast.convert_tokens_to_ids(pad)}


def build_tiny(family: str, folder: Path) -> Path:
    """Write a tiny random ``family`` model (safetensors, tokenizer, chat template) into ``folder``."""
    import torch
    import transformers as tf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
    if family in ("llama", "qwen2", "qwen3"):
        ids = byte_level_bpe(folder, 400, CHATML)
    elif family == "gemma3":
        ids = _sentencepiece_bpe(folder, 600, GEMMA_TEMPLATE, ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>",
                                 "<end_of_turn>"], prefix=False, bos="<bos>", eos="<eos>", pad="<pad>",
                                 cls="GemmaTokenizer")
    elif family == "phi3":
        ids = _sentencepiece_bpe(folder, 600, PHI3_TEMPLATE, ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|user|>",
                                 "<|assistant|>", "<|system|>", "<|end|>"], prefix=True, bos="<s>", eos="<|end|>",
                                 pad="<|endoftext|>", cls="LlamaTokenizer")
    elif family == "mistral":
        ids = _sentencepiece_bpe(folder, 600, MISTRAL_TEMPLATE, ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                                 prefix=True, bos="<s>", eos="</s>", pad="</s>",
                                 cls="LlamaTokenizer")
    else:
        raise ValueError(f"no tiny model for family {family!r}; one of {FAMILIES}")
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(folder))
    torch.manual_seed(0)
    if family == "llama":  # Llama 3.x: llama3 rope scaling, tied head
        cfg = tf.LlamaConfig(vocab_size=vocab, **common, tie_word_embeddings=True, rope_theta=500000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, **ids)
        model = tf.LlamaForCausalLM(cfg)
    elif family == "qwen2":  # q/k/v biases
        cfg = tf.Qwen2Config(vocab_size=vocab, **common, tie_word_embeddings=True, rope_theta=1000000.0, **ids)
        model = tf.Qwen2ForCausalLM(cfg)
    elif family == "qwen3":  # q/k RMSNorm, head_dim not hidden/heads
        cfg = tf.Qwen3Config(vocab_size=vocab, **common, head_dim=32, tie_word_embeddings=True,
                             rope_theta=1000000.0, **ids)
        model = tf.Qwen3ForCausalLM(cfg)
    elif family == "gemma3":  # 6 layers: 5 sliding (window 8) + 1 global, as Gemma 3 alternates them
        cfg = tf.Gemma3TextConfig(vocab_size=vocab, **{**common, "num_hidden_layers": 6, "num_key_value_heads": 1},
                                  head_dim=16, query_pre_attn_scalar=16, sliding_window=8, rope_theta=1000000.0,
                                  rope_local_base_freq=10000.0, tie_word_embeddings=True, **ids)
        model = tf.Gemma3ForCausalLM(cfg)
    elif family == "phi3":  # fused qkv_proj and gate_up_proj, untied head
        cfg = tf.Phi3Config(vocab_size=vocab, **common, original_max_position_embeddings=512, tie_word_embeddings=False,
                            **ids)
        model = tf.Phi3ForCausalLM(cfg)
    else:  # mistral
        cfg = tf.MistralConfig(vocab_size=vocab, **common, sliding_window=None, tie_word_embeddings=False, **ids)
        model = tf.MistralForCausalLM(cfg)
    with torch.no_grad():  # random norms (transformers initialises them to 1 or 0) so a missing norm shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(p + 0.1 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return folder
