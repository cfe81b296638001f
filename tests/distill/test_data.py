import json
import logging
import sys
import time
import types
from collections import Counter

import pytest
from pydantic import ValidationError

from edgekit import artifact
from edgekit.chat import render_text
from edgekit.distill import data, synth
from edgekit.distill.config import DataConfig
from edgekit.distill.data import split_heldout
from edgekit.distill.filters import choose_sample, prompt_problem, repeated_ngram_ratio, response_problem
from edgekit.distill.synth import COT_INSTRUCTION, generate_responses, pre_query_prefix, synthesize_prompts
from edgekit.distill.tokenize import tokenize_example, tokenize_examples
from edgekit.sources import load_examples, needs_response
from edgekit.errors import ConfigError, ModelError

# A ChatML-like template for the tiny WordLevel tokenizer (which has none of its own).
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat_teacher_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with <|im_start|>/<|im_end|> special tokens and a ChatML-like chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-chat")
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, use_safetensors=True)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def chat_tok(chat_teacher_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_teacher_dir)


@pytest.fixture(scope="module")
def chat_model(chat_teacher_dir):
    return data._load_teacher(chat_teacher_dir)


# --------------------------------------------------------------------------- config


def test_data_config_has_schema_defaults_and_refuses_unknown_keys():
    cfg = DataConfig()
    assert (cfg.sources, cfg.synthetic_prompts, cfg.samples_per_prompt, cfg.max_new_tokens) == ([], 256, 1, 128)
    assert (cfg.temperature, cfg.top_p, cfg.chain_of_thought, cfg.heldout_fraction) == (0.7, 0.9, False, 0.1)
    assert (cfg.max_seq_len, cfg.seed, cfg.batch_size, cfg.generate_responses) == (512, 0, 16, True)
    with pytest.raises(ValidationError, match="extra"):
        DataConfig(sourcez=["x.jsonl"])
    with pytest.raises(ValidationError):
        DataConfig(heldout_fraction=1.5)


# --------------------------------------------------------------------------- loaders


def test_jsonl_records_of_every_shape_are_normalised(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "What is rain?"},
        {"prompt": "Say hi", "response": "Hi!", "id": 7},
        {"messages": [{"role": "system", "content": "Be brief."}, user("Q"), assistant("A")]},
        {"text": "Plain text for language modelling."},
    ])
    examples = load_examples([f])
    assert examples == [
        {"messages": [user("What is rain?")]},
        {"messages": [user("Say hi"), assistant("Hi!")]},
        {"messages": [{"role": "system", "content": "Be brief."}, user("Q"), assistant("A")]},
        {"text": "Plain text for language modelling."},
    ]
    assert [needs_response(e) for e in examples] == [True, False, False, False]


def test_text_and_markdown_files_become_one_example_per_paragraph(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph\nstill first.\n\n\n  Second one.  \n", encoding="utf-8")
    (tmp_path / "b.md").write_text("# Title\n\nBody text.\n", encoding="utf-8")
    assert load_examples([tmp_path / "a.txt", tmp_path / "b.md"]) == [
        {"text": "First paragraph\nstill first."}, {"text": "Second one."}, {"text": "# Title"}, {"text": "Body text."}]


def test_folder_of_files_loads_every_supported_file_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("from b", encoding="utf-8")
    write_jsonl(tmp_path / "a.jsonl", [{"text": "from a"}])
    (tmp_path / "notes.csv").write_text("ignored", encoding="utf-8")
    assert load_examples([tmp_path]) == [{"text": "from a"}, {"text": "from b"}]


def test_saved_hf_dataset_folder_loads_every_split(tmp_path, monkeypatch):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    splits = {"train": [{"prompt": "p1", "response": "r1"}], "test": [{"text": "t1"}]}
    fake = types.ModuleType("datasets")
    fake.load_from_disk = lambda path: dict(splits) if path == str(folder) else None
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_examples([folder]) == [{"text": "t1"}, {"messages": [user("p1"), assistant("r1")]}]


def test_saved_hf_dataset_without_datasets_package_says_pip_install(tmp_path, monkeypatch):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    (folder / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install datasets") as e:
        load_examples([folder])
    assert str(folder) in str(e.value)


def test_empty_file_is_refused_naming_it(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n  \n")
    with pytest.raises(ConfigError, match=f"{f} is empty"):
        load_examples([f])


def test_non_utf8_file_is_refused_naming_it(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"{f} is not UTF-8 text.*iconv"):
        load_examples([f])


def test_malformed_json_line_names_file_and_line_number(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok"}\n\n{"prompt": "broken"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{f}:3: not valid JSON"):
        load_examples([f])


@pytest.mark.parametrize("record", [
    {"instruction": "Do X", "output": "done"},
    {"response": "an answer without a prompt"},
    {"prompt": "p", "text": "t"},
    {"messages": [{"role": "tool", "content": "x"}]},
    {"messages": []},
    {"prompt": ""},
    ["a", "list"],
])
def test_unknown_record_shape_is_refused_with_the_accepted_shapes(tmp_path, record):
    f = write_jsonl(tmp_path / "odd.jsonl", [{"text": "fine"}, record])
    with pytest.raises(ConfigError, match=f"{f}:2: "):
        load_examples([f])


def test_missing_source_and_unsupported_type_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_examples([tmp_path / "nope.jsonl"])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ConfigError, match="unsupported type .csv"):
        load_examples([tmp_path / "x.csv"])


# --------------------------------------------------------------------------- filters


@pytest.mark.parametrize("text, problem", [
    ("Hi there", "too_short"),
    ("word " * 250, "too_long"),
    ("What does \x00 this control byte mean?", "non_printable"),
    ("Broken \ufffd decode in this prompt", "non_printable"),
    ("tell me more tell me more tell me more tell me more", "repetitive"),
    ("I'm sorry, but I cannot help with that.", "refusal"),
    ("As an AI language model I have no opinions.", "refusal"),
    ("You are a helpful AI assistant.", "echo"),
    ("Hello! How can I help you today?", "echo"),
])
def test_prompt_filter_names_the_problem(text, problem):
    assert prompt_problem(text) == problem


@pytest.mark.parametrize("text", [
    "What is the capital of France?",
    "Write a short poem about autumn leaves.",
    "Can you explain how photosynthesis works in simple terms?",
])
def test_prompt_filter_accepts_ordinary_requests(text):
    assert prompt_problem(text) is None


def test_repeated_ngram_ratio_is_zero_for_varied_text_and_high_for_loops():
    assert repeated_ngram_ratio("the quick brown fox jumps over the lazy dog") == 0
    assert repeated_ngram_ratio("a b c a b c a b c a b c") > 0.5
    assert repeated_ngram_ratio("too short") == 0


def test_response_problem_flags_empty_and_looping_answers():
    assert response_problem("  \n") == "empty"
    assert response_problem("yes yes yes yes yes yes yes") == "repetitive"
    assert response_problem("Paris is the capital of France.") is None


# --------------------------------------------------------------------------- synthetic prompts


def test_pre_query_prefix_stops_where_the_user_content_starts(chat_tok):
    assert pre_query_prefix(chat_tok, "Be nice.") == "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\n"


def test_synthesize_prompts_without_chat_template_raises_model_error(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    with pytest.raises(ModelError, match="no chat template"):
        synthesize_prompts(None, tok, 4, 0, 4)


def _scripted_rounds(monkeypatch, rounds):
    """Make each sampling round return the next scripted list of [text, ended_the_turn]; count calls."""
    calls = []

    def fake_rounds(model, tokenizer, prefix_ids, chat, n, which, **kw):
        for r in which:
            calls.append(n)
            yield r, [list(s) for s in rounds[len(calls) - 1]]

    monkeypatch.setattr(synth, "_sample_prompt_rounds", fake_rounds)
    return calls


def test_synthesize_prompts_filters_dedups_and_stops_at_n(chat_tok, monkeypatch):
    calls = _scripted_rounds(monkeypatch, [
        [("What is the tallest mountain on Earth?", True),
         ("what is the tallest mountain on earth", True),  # duplicate after normalisation
         ("Hi", True),  # too short
         ("Explain how a rainbow forms in the sky", False),  # never ended the turn
         ("I'm sorry, I can't do that for you.", True)],  # refusal
        [("Write a haiku about the sea.", True),
         ("You are a helpful AI assistant.", True),  # echo of the system prompt
         ("Give three tips for learning to cook.", True),
         ("Name two rivers in Africa please.", True)],  # beyond n: not needed
    ])
    stats = Counter()
    prompts = synthesize_prompts(None, chat_tok, 3, seed=1, batch_size=5, stats=stats)
    assert prompts == ["What is the tallest mountain on Earth?", "Write a haiku about the sea.",
                       "Give three tips for learning to cook."]
    assert calls == [5, 5]
    assert stats == Counter(accepted=3, duplicate=1, too_short=1, truncated=1, refusal=1, echo=1)


def test_synthesize_prompts_gives_up_after_bounded_rounds_with_a_warning(chat_tok, monkeypatch, caplog):
    calls = _scripted_rounds(monkeypatch, [[("no", True)]] * 100)
    with caplog.at_level(logging.WARNING, logger="edgekit.distill.synth"):
        assert synthesize_prompts(None, chat_tok, 2, seed=0, batch_size=1) == []
    assert len(calls) == 8 and "only 0 usable prompts" in caplog.text


def test_synthesize_prompts_journal_replays_rounds_instead_of_sampling_again(chat_tok, monkeypatch, tmp_path):
    journal = tmp_path / "prompts.jsonl"
    _scripted_rounds(monkeypatch, [[("What makes the sky blue?", True)], [("How do bees make honey?", True)]])
    first = synthesize_prompts(None, chat_tok, 2, seed=0, batch_size=1, journal=journal)

    def must_not_sample(*a, **kw):
        raise AssertionError("sampled again although the journal holds every round")

    monkeypatch.setattr(synth, "_sample_prompt_rounds", must_not_sample)
    assert synthesize_prompts(None, chat_tok, 2, seed=0, batch_size=1, journal=journal) == first


# --------------------------------------------------------------------------- sampling and scoring on the tiny model


def test_left_padded_batched_greedy_matches_one_prompt_at_a_time(chat_model):
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    kw = dict(max_new_tokens=6, temperature=0, top_p=1, stop_ids=frozenset({2}), pad_id=2)
    batched = synth._sample(chat_model, prompts, **kw)
    alone = [synth._sample(chat_model, [p], **kw)[0] for p in prompts]
    assert batched == alone


def test_sampling_cuts_at_the_first_stop_token_and_reports_it(chat_model):
    kw = dict(max_new_tokens=6, temperature=0, top_p=1, pad_id=2)
    [(free, stop)] = synth._sample(chat_model, [[5, 6, 7]], stop_ids=frozenset({2}), **kw)
    if stop is None:
        assert len(free) == 6
    token = free[-1]
    [(cut, stop)] = synth._sample(chat_model, [[5, 6, 7]], stop_ids=frozenset({2, token}), **kw)
    assert stop == token and cut == free[:free.index(token)]


def test_score_is_the_unpadded_mean_log_likelihood_of_the_response(chat_model):
    import torch

    prompts, responses = [[5, 6, 7, 8, 9], [10, 11], [12], [3, 4, 5, 6, 7, 8]], [[20, 21], [22, 23, 24, 25], [26], []]
    scores = synth._score(chat_model, prompts, responses)
    for p, r, s in zip(prompts, responses, scores):
        if not r:
            assert s == float("-inf")
            continue
        with torch.no_grad():
            logits = chat_model(input_ids=torch.tensor([p + r])).logits[0]
        lp = torch.log_softmax(logits.float(), -1)
        expected = sum(lp[len(p) - 1 + i, t].item() for i, t in enumerate(r)) / len(r)
        assert s == pytest.approx(expected, abs=1e-4)


# --------------------------------------------------------------------------- teacher responses


def test_rejection_sampling_keeps_the_highest_scoring_non_degenerate_sample(chat_tok, monkeypatch):
    loop = [10, 11, 12] * 3
    samples = [([], 257), (loop, 257), ([20, 21, 22], 257), ([30, 31, 32], 257),  # prompt "w5"
               ([40, 41, 42], None), ([50, 51, 52], 257), ([], None), ([60, 61, 62], 257)]  # prompt "w6"
    scores = [0.0, -0.1, -2.0, -1.0, -0.2, -3.0, 0.0, -0.5]
    monkeypatch.setattr(synth, "_sample", lambda model, prompt_ids, num_return_sequences, **kw: samples)
    monkeypatch.setattr(synth, "_score", lambda model, p, r: scores)
    stats = Counter()
    cfg = DataConfig(samples_per_prompt=4, batch_size=8)
    out = generate_responses(None, chat_tok, ["w5", "w6"], cfg, stats=stats)
    # w5: the empty and the looping samples score best but are dropped; w6: the complete answer
    # beats the higher-scoring truncated one.
    assert out == [
        {"messages": [user("w5"), assistant("w30 w31 w32")], "score": -1.0, "truncated": False},
        {"messages": [user("w6"), assistant("w60 w61 w62")], "score": -0.5, "truncated": False},
    ]
    assert stats["samples_rejected_empty"] == 2 and stats["samples_rejected_repetitive"] == 1
    assert stats["responses_kept"] == 2 and stats["prompts_rejected"] == 0


def test_choose_sample_prefers_complete_then_highest_score_and_flags_truncation():
    assert choose_sample([]) is None
    c = [{"score": -0.1, "truncated": True}, {"score": -2.0, "truncated": False}, {"score": -1.0, "truncated": False}]
    assert choose_sample(c) == c[2]
    assert choose_sample(c[:1]) == c[0]  # a truncated answer is kept when nothing better exists


def test_prompt_whose_samples_are_all_degenerate_is_dropped_and_counted(chat_tok, monkeypatch):
    monkeypatch.setattr(synth, "_sample", lambda model, prompt_ids, num_return_sequences, **kw:
                        [([], 257)] * len(prompt_ids) * num_return_sequences)
    monkeypatch.setattr(synth, "_score", lambda model, p, r: [0.0] * len(r))
    stats = Counter()
    assert generate_responses(None, chat_tok, ["w5"], DataConfig(samples_per_prompt=2), stats=stats) == []
    assert stats["prompts_rejected"] == 1 and stats["samples_rejected_empty"] == 2


def test_chain_of_thought_instruction_reaches_the_teacher_but_not_the_stored_example(chat_tok, monkeypatch):
    rendered = []
    real_render = synth.render

    def spy(tokenizer, messages, add_generation_prompt=False):
        rendered.append(messages)
        return real_render(tokenizer, messages, add_generation_prompt)

    monkeypatch.setattr(synth, "render", spy)
    monkeypatch.setattr(synth, "_sample", lambda model, prompt_ids, num_return_sequences, **kw: [([30, 31, 32], 257)])
    monkeypatch.setattr(synth, "_score", lambda model, p, r: [-1.0])
    out = generate_responses(None, chat_tok, ["w5"], DataConfig(chain_of_thought=True))
    assert [user(f"w5\n\n{COT_INSTRUCTION}")] in rendered
    assert out[0]["messages"] == [user("w5"), assistant("w30 w31 w32")]


def test_generate_responses_runs_on_the_tiny_model_and_flags_truncation(chat_model, chat_tok):
    cfg = DataConfig(max_new_tokens=5, samples_per_prompt=2, batch_size=4, seed=3)
    stats = Counter()
    out = generate_responses(chat_model, chat_tok, ["w5 w6", [user("w7")], "w5 w6"], cfg, stats=stats)
    assert len(out) + stats["prompts_rejected"] == 2  # the duplicate prompt is answered once
    for ex in out:
        assert ex["messages"][-1]["role"] == "assistant" and ex["score"] <= 0
        assert isinstance(ex["truncated"], bool)
    assert stats["generated_tokens"] > 0


# --------------------------------------------------------------------------- held-out split


def _examples(n, start=0):
    return [{"messages": [user(f"question {i}"), assistant(f"answer {i}")]} for i in range(start, start + n)]


def test_split_is_deterministic_and_existing_examples_keep_their_side_when_data_is_added():
    train, held = split_heldout(_examples(200), 0.1, seed=0)
    assert (train, held) == split_heldout(_examples(200), 0.1, seed=0)
    assert 5 <= len(held) <= 40 and len(train) + len(held) == 200
    train2, held2 = split_heldout(_examples(200) + _examples(300, start=200), 0.1, seed=0)
    assert [e for e in held2 if e in _examples(200)] == held
    assert split_heldout(_examples(200), 0.1, seed=1)[1] != held  # the seed reshuffles


def test_split_is_never_empty_with_two_or_more_examples():
    for n in (2, 3, 5):
        train, held = split_heldout(_examples(n), 0.01, seed=0)
        assert train and held
        train, held = split_heldout(_examples(n), 0.99, seed=0)
        assert train and held
    assert split_heldout(_examples(1), 0.5, seed=0)[0] == _examples(1)
    assert split_heldout(_examples(5), 0.0, seed=0) == (_examples(5), [])


def test_split_keeps_answers_to_one_prompt_on_the_same_side():
    examples = [{"messages": [user(f"q{i}"), assistant(a)]} for i in range(50) for a in ("x", "y")]
    train, held = split_heldout(examples, 0.3, seed=0)
    held_prompts = {e["messages"][0]["content"] for e in held}
    assert not held_prompts & {e["messages"][0]["content"] for e in train}


# --------------------------------------------------------------------------- tokenization


def test_labels_cover_only_assistant_turns_and_their_end_of_turn(chat_tok):
    S, E = chat_tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ex = {"messages": [{"role": "system", "content": "w3"}, user("w5"), assistant("w10 w11"), user("w6"),
                       assistant("w12")]}
    t = tokenize_example(ex, chat_tok, max_seq_len=512)
    # "system", "user", "assistant" are not in the WordLevel vocabulary: they are <unk> (0)
    assert t["input_ids"] == [S, 0, 3, E, S, 0, 5, E, S, 0, 10, 11, E, S, 0, 6, E, S, 0, 12, E]
    masked = [-100] * 10
    assert t["labels"] == masked + [10, 11, E] + [-100] * 6 + [12, E]


def test_truncated_answer_gets_no_end_of_turn_label(chat_tok):
    E = chat_tok.convert_tokens_to_ids("<|im_end|>")
    t = tokenize_example({"messages": [user("w5"), assistant("w10 w11")], "truncated": True}, chat_tok, 512)
    assert t["input_ids"][-1] == E and t["labels"][-3:] == [10, 11, -100]


def test_text_example_labels_equal_input_ids(chat_tok):
    t = tokenize_example({"text": "w7 w8 w9"}, chat_tok, 512)
    assert t == {"input_ids": [7, 8, 9], "labels": [7, 8, 9]}


def test_render_text_is_the_chat_rendering_or_the_text_itself(chat_tok):
    assert render_text({"text": "w7 w8"}, chat_tok) == "w7 w8"
    rendered = render_text({"messages": [user("w5"), assistant("w6")]}, chat_tok)
    assert rendered == "<|im_start|>user\nw5<|im_end|>\n<|im_start|>assistant\nw6<|im_end|>\n"


def test_long_examples_are_cut_to_max_seq_len_with_one_warning(chat_tok, caplog):
    examples = [{"text": " ".join(f"w{i}" for i in range(3, 40))}, {"text": "w3 w4"},
                {"messages": [user("w5 w6 w7"), assistant("w8 w9 w10 w11")]}]
    with caplog.at_level(logging.WARNING, logger="edgekit.distill.tokenize"):
        out = tokenize_examples(examples, chat_tok, max_seq_len=8)
    assert [len(t["input_ids"]) for t in out] == [8, 2, 8]
    assert all(len(t["labels"]) == len(t["input_ids"]) for t in out)
    assert "2 of 3 examples are longer than max_seq_len=8" in caplog.text


def test_chat_example_with_a_tokenizer_without_template_raises_model_error(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    with pytest.raises(ModelError, match="no chat template"):
        tokenize_example({"messages": [user("w5"), assistant("w6")]}, tok, 16)
    assert tokenize_example({"text": "w5 w6"}, tok, 16)["labels"] == [5, 6]


# --------------------------------------------------------------------------- the stage


def _user_data(tmp_path, n_prompts=10):
    return write_jsonl(tmp_path / "user.jsonl", [{"prompt": f"w{10 + i} w{50 + i}"} for i in range(n_prompts)] + [
        {"prompt": "w5", "response": "w6 w7"}, {"text": "w8 w9"}])


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_run_writes_a_verified_artifact_and_reuses_it(chat_teacher_dir, tmp_path, monkeypatch):
    cfg = DataConfig(sources=[_user_data(tmp_path)], max_new_tokens=4, batch_size=4, heldout_fraction=0.25)
    out = data.run(cfg, chat_teacher_dir, tmp_path / "data")
    assert artifact.verify_manifest(out) == []
    manifest = artifact.read_manifest(out)
    assert manifest["stage"] == "data" and manifest["config"] == cfg.model_dump(mode="json")
    m = manifest["metrics"]
    examples = _read_jsonl(out / "train.jsonl") + _read_jsonl(out / "heldout.jsonl")
    assert (m["train_examples"], m["heldout_examples"]) == (len(_read_jsonl(out / "train.jsonl")),
                                                          len(_read_jsonl(out / "heldout.jsonl")))
    assert m["heldout_examples"] >= 1 and m["train_tokens"] > 0 and m["generated_tokens"] > 0
    assert len(examples) == 12 - m.get("prompts_rejected", 0)
    assert {"text": "w8 w9"} in examples and {"messages": [user("w5"), assistant("w6 w7")]} in examples
    assert not (tmp_path / "data.inprogress").exists()

    class Reloaded(Exception):
        pass

    def no_teacher(folder, *_):
        raise Reloaded(folder)

    monkeypatch.setattr(data, "_load_teacher", no_teacher)
    assert data.run(cfg, chat_teacher_dir, tmp_path / "data") == out
    # edited user data is not silently reused
    with open(cfg.sources[0], "a") as f:
        f.write(json.dumps({"text": "w20"}) + "\n")
    with pytest.raises(Reloaded):
        data.run(cfg, chat_teacher_dir, tmp_path / "data")


def test_run_resumes_an_interrupted_generation_without_redoing_finished_prompts(chat_teacher_dir, tmp_path,
                                                                                monkeypatch):
    cfg = DataConfig(sources=[_user_data(tmp_path)], max_new_tokens=4, batch_size=3)
    real_group = synth._respond_group
    asked = Counter()

    def crash_after_two_batches(model, tokenizer, group, *args):
        if sum(asked.values()) >= 6:
            raise KeyboardInterrupt("killed")
        asked.update(m[0]["content"] for m in group)
        return real_group(model, tokenizer, group, *args)

    monkeypatch.setattr(synth, "_respond_group", crash_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        data.run(cfg, chat_teacher_dir, tmp_path / "data")
    journal = tmp_path / "data.inprogress" / "generated.jsonl"
    assert len(_read_jsonl(journal)) == 6 and not (tmp_path / "data").exists()
    with open(journal, "a") as f:
        f.write('{"key": "w19 w59", "exam')  # killed in the middle of writing a record

    done = set(asked)

    def refuse_done_prompts(model, tokenizer, group, *args):
        again = [m[0]["content"] for m in group if m[0]["content"] in done]
        assert not again, f"asked again for {again}"
        asked.update(m[0]["content"] for m in group)
        return real_group(model, tokenizer, group, *args)

    monkeypatch.setattr(synth, "_respond_group", refuse_done_prompts)
    out = data.run(cfg, chat_teacher_dir, tmp_path / "data")
    assert artifact.verify_manifest(out) == []
    assert asked == Counter({f"w{10 + i} w{50 + i}": 1 for i in range(10)})
    examples = _read_jsonl(out / "train.jsonl") + _read_jsonl(out / "heldout.jsonl")
    prompts = [e["messages"][0]["content"] for e in examples if "messages" in e]
    assert len(prompts) == len(set(prompts))
    metrics = artifact.read_manifest(out)["metrics"]
    assert metrics["responses_kept"] + metrics.get("prompts_rejected", 0) == 10
    assert len(examples) == metrics["responses_kept"] + 2
    assert not (tmp_path / "data.inprogress").exists()


def test_llama_cpp_generation_resumes_a_killed_run_and_matches_an_uninterrupted_one(
        tiny_bpe_llama_dir, exporter_output, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    from edgekit.runtimes import llamacpp

    gguf = exporter_output(tiny_bpe_llama_dir, "gguf", "f32")[0]
    cfg = DataConfig(sources=[_user_data(tmp_path)], max_new_tokens=6, batch_size=3, temperature=0.9)
    whole = data.run(cfg, tiny_bpe_llama_dir, tmp_path / "whole", teacher_gguf=gguf)
    assert artifact.read_manifest(whole)["metrics"]["generation_backend"] == f"llama.cpp ({gguf.name})"  # f32: as is

    real_append, appended = artifact.append_journal, []

    def killed_on_the_fifth_record(path, records, **kw):
        if len(appended) == 4:
            raise KeyboardInterrupt("killed")
        appended.extend(r["key"] for r in records)
        return real_append(path, records, **kw)

    monkeypatch.setattr(artifact, "append_journal", killed_on_the_fifth_record)
    with pytest.raises(KeyboardInterrupt):
        data.run(cfg, tiny_bpe_llama_dir, tmp_path / "data", teacher_gguf=gguf)
    monkeypatch.setattr(artifact, "append_journal", real_append)
    real_run, asked = llamacpp.ParallelSampler.run, []

    def record_prompts(self, requests):
        asked.extend(tuple(r.prompt) for r in requests)
        return real_run(self, requests)

    monkeypatch.setattr(llamacpp.ParallelSampler, "run", record_prompts)
    out = data.run(cfg, tiny_bpe_llama_dir, tmp_path / "data", teacher_gguf=gguf)
    assert len(asked) == 10 - 4  # the journaled answers were not asked for again
    assert _read_jsonl(out / "train.jsonl") == _read_jsonl(whole / "train.jsonl")
    assert _read_jsonl(out / "heldout.jsonl") == _read_jsonl(whole / "heldout.jsonl")


def test_run_discards_in_progress_work_from_another_config(chat_teacher_dir, tmp_path, caplog):
    work = tmp_path / "data.inprogress"
    work.mkdir()
    (work / "state.json").write_text(json.dumps({"config": {"seed": 99}, "inputs": {}}))
    write_jsonl(work / "generated.jsonl", [{"key": "w10 w50", "example": {"messages": [user("w10 w50"),
                                                                                       assistant("stale")]}}])
    cfg = DataConfig(sources=[_user_data(tmp_path, n_prompts=2)], max_new_tokens=3)
    with caplog.at_level(logging.WARNING, logger="edgekit.distill.data"):
        out = data.run(cfg, chat_teacher_dir, tmp_path / "data")
    assert "different config" in caplog.text
    examples = _read_jsonl(out / "train.jsonl") + _read_jsonl(out / "heldout.jsonl")
    assert all(e.get("messages", [{}])[-1].get("content") != "stale" for e in examples)


def test_run_without_generation_keeps_prompt_only_examples(chat_teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_load_teacher", lambda d: pytest.fail("loaded the teacher with nothing to generate"))
    cfg = DataConfig(sources=[_user_data(tmp_path, n_prompts=3)], generate_responses=False)
    out = data.run(cfg, chat_teacher_dir, tmp_path / "data")
    examples = _read_jsonl(out / "train.jsonl") + _read_jsonl(out / "heldout.jsonl")
    assert sum(needs_response(e) for e in examples) == 3 and len(examples) == 5


# --------------------------------------------------------------------------- the real teacher


@pytest.mark.slow
def test_run_on_the_real_teacher_synthesises_english_prompts_and_verifies(teacher, tmp_path):
    cfg = DataConfig(synthetic_prompts=16, max_new_tokens=32, batch_size=16, heldout_fraction=0.2)
    began = time.perf_counter()
    out = data.run(cfg, teacher.path, tmp_path / "data", teacher_gguf=teacher.gguf)
    elapsed = time.perf_counter() - began
    assert artifact.verify_manifest(out) == []
    examples = _read_jsonl(out / "train.jsonl") + _read_jsonl(out / "heldout.jsonl")
    metrics = artifact.read_manifest(out)["metrics"]
    # the teacher's Q4_1 GGUF requantized to q8_0 (llama.cpp's batched kernels), several sequences in flight
    assert metrics["generation_backend"] == "llama.cpp (teacher-q8_0.gguf)"
    assert len(examples) >= 12 and metrics["heldout_examples"] >= 1
    prompts = [e["messages"][0]["content"] for e in examples]
    question_words = ("what", "how", "why", "can", "could", "write", "explain", "describe", "give", "list",
                      "tell", "i", "create", "suggest", "provide", "help", "plan", "is", "which", "who")
    for p in prompts:
        assert prompt_problem(p) is None
        assert sum(c.isascii() for c in p) / len(p) > 0.95, p
    looks_like_request = [p for p in prompts
                          if "?" in p or p.split()[0].lower().strip(",.!'") in question_words]
    # Measured over 4 seeds x 16 prompts (2-core EPYC, 2026-12-03): 84 % look like requests from llama.cpp, 78 % from
    # PyTorch; 16 prompts at 2/3 leaves room for a seed's luck, not for a sampler that writes noise
    assert len(looks_like_request) >= len(prompts) * 2 // 3, prompts
    for e in examples:
        assert e["messages"][1]["role"] == "assistant" and e["messages"][1]["content"]
    logging.getLogger(__name__).warning(
        "real teacher: %.1f s for the data stage, generation %.1f tokens/s, prompts: %s",
        elapsed, metrics.get("generation_tokens_per_s", 0), prompts)
    assert elapsed < 90
