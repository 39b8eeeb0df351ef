"""Prompt datasets: reading, chat template, filtering, errors, DP sharding and the resumable cursor.

The tokenizer is a word-level one built here, so every expected id list is written by hand.
"""

import json
import logging

import pytest
import torch

from nemo_opdlm.data import (DataError, PromptDataConfig, PromptLoader, ShardedSampler, left_pad,
                             load_prompts, right_pad)

WORDS = ["<pad>", "<unk>", "<eos>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system",
         "what", "is", "two", "plus", "three", "four", "five", "be", "brief", "a", "long", "question",
         "indeed", "very"]
ID = {w: i for i, w in enumerate(WORDS)}
TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|> assistant{% endif %}")


def make_tokenizer(chat: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=ID, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<eos>", "<pad>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    if chat:
        fast.chat_template = TEMPLATE
    return fast


def ids(text):
    return [ID[w] for w in text.split()]


RECORDS = [
    {"question": "what is two plus two", "answer": "four"},
    {"question": "what is two plus three", "answer": "five"},
    {"question": "a very long question indeed is a very long question", "answer": "be brief"},
    {"question": "what is four", "answer": "four"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_jsonl_with_and_without_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    cfg = PromptDataConfig(path=path, prompt_field="question", max_prompt_tokens=64)
    raw = load_prompts(cfg, make_tokenizer(chat=False))
    assert [e.prompt_ids for e in raw.examples] == [ids(r["question"]) for r in RECORDS]
    assert raw.examples[0].response_ids is None
    chat = load_prompts(cfg, make_tokenizer(chat=True))
    assert chat.examples[0].prompt_ids == ids("<|im_start|> user what is two plus two <|im_end|> <|im_start|> assistant")
    sys_cfg = PromptDataConfig(path=path, prompt_field="question", system_prompt="be brief")
    with_sys = load_prompts(sys_cfg, make_tokenizer(chat=True))
    assert with_sys.examples[3].prompt_ids == ids(
        "<|im_start|> system be brief <|im_end|> <|im_start|> user what is four <|im_end|> <|im_start|> assistant")
    never = PromptDataConfig(path=path, prompt_field="question", chat_template="never")
    assert load_prompts(never, make_tokenizer(chat=True)).examples[1].prompt_ids == ids(RECORDS[1]["question"])
    with pytest.raises(DataError, match="no chat template"):
        load_prompts(PromptDataConfig(path=path, prompt_field="question", chat_template="always"),
                     make_tokenizer(chat=False))


def test_message_prompts_and_responses(tmp_path):
    recs = [{"messages": [{"role": "user", "content": "what is two"}], "response": "four"}]
    path = write_jsonl(tmp_path / "m.jsonl", recs)
    cfg = PromptDataConfig(path=path, prompt_field="messages", response_field="response")
    got = load_prompts(cfg, make_tokenizer(chat=True))
    assert got.examples[0].prompt_ids == ids("<|im_start|> user what is two <|im_end|> <|im_start|> assistant")
    assert got.examples[0].response_ids == [ID["four"], ID["<eos>"]]
    assert load_prompts(cfg, make_tokenizer(chat=True), eos_id=ID["<|im_end|>"]).examples[0].response_ids == \
        [ID["four"], ID["<|im_end|>"]]
    with pytest.raises(DataError, match="chat template"):
        load_prompts(cfg, make_tokenizer(chat=False))


def test_chat_prompts_end_before_the_first_assistant_turn(tmp_path):
    """A chat record's prompt is the turns before its first assistant turn; that turn is the response
    when ``response_field`` is the messages field itself (sft / off_policy on a chat dataset)."""
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two"},
            {"role": "assistant", "content": "four"}, {"role": "user", "content": "what is three"},
            {"role": "assistant", "content": "five"}]
    recs = [{"messages": conv}, {"messages": [{"role": "user", "content": "what is four"},
                                              {"role": "assistant", "content": "four"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", recs)
    tok = make_tokenizer(chat=True)
    prompt_only = load_prompts(PromptDataConfig(path=path, prompt_field="messages"), tok)
    want = "<|im_start|> system be brief <|im_end|> <|im_start|> user what is two <|im_end|> <|im_start|> assistant"
    assert prompt_only.examples[0].prompt_ids == ids(want)  # 'four', 'what is three', 'five' are not in it
    assert prompt_only.examples[0].response_ids is None
    both = load_prompts(PromptDataConfig(path=path, prompt_field="messages", response_field="messages"), tok)
    assert [e.response_ids for e in both.examples] == [[ID["four"], ID["<eos>"]], [ID["four"], ID["<eos>"]]]
    # a template on chat prompts writes the last user turn
    templ = PromptDataConfig(path=path, prompt_field="messages", prompt_template="{prompt} be brief")
    assert load_prompts(templ, tok).examples[1].prompt_ids == ids(
        "<|im_start|> user what is four be brief <|im_end|> <|im_start|> assistant")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": conv[2:3]}, {"messages": conv[:2]}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: the conversation starts with an assistant turn"):
        load_prompts(PromptDataConfig(path=bad, prompt_field="messages"), tok)
    unanswered = write_jsonl(tmp_path / "open.jsonl", [{"messages": conv[:3]}, {"messages": conv[:2]}])
    with pytest.raises(DataError, match=r"open.jsonl:2: the conversation in 'messages' has no assistant turn"):
        load_prompts(PromptDataConfig(path=unanswered, prompt_field="messages", response_field="messages"), tok)


def test_prompt_template_matches_the_eval_prompt():
    """Training prompts written as ``opdlm eval --task gsm8k`` writes them (its instruction under the
    chat template, its raw template without), or by a text with {prompt}."""
    from nemo_opdlm.data.prompts import apply_prompt_template
    from nemo_opdlm.eval import tasks as T

    fmt = T.FORMATS["gsm8k"]
    assert apply_prompt_template("what is two", "gsm8k", chat=True) == "what is two" + fmt.instruction
    assert apply_prompt_template("what is two", "gsm8k", chat=False) == "Question: what is two\nAnswer:"
    task = T.Task(fmt, [T.Example("what is two", "2")])
    assert T.build_prompt(task, task.examples[0], make_tokenizer(chat=False), chat=False) == \
        apply_prompt_template("what is two", "gsm8k", chat=False)
    assert apply_prompt_template("x {y}", "{prompt}\nbox it in \\boxed{}", chat=True) == "x {y}\nbox it in \\boxed{}"
    with pytest.raises(DataError, match=r"data.prompt_template must hold '\{prompt\}' or name an eval task format"):
        PromptDataConfig(path="p.jsonl", prompt_template="gsm9k")


def test_files_through_datasets(tmp_path):
    """Compressed JSON lines, globs of shards and CSV are read by datasets.load_dataset; records match
    the plain file's."""
    import gzip

    plain = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    base = dict(prompt_field="question", response_field="answer", max_prompt_tokens=64, chat_template="never")
    tok = make_tokenizer(chat=False)
    want = [(e.prompt_ids, e.response_ids) for e in load_prompts(PromptDataConfig(path=plain, **base), tok).examples]
    (tmp_path / "shards").mkdir()
    for i, rec in enumerate(RECORDS):
        with gzip.open(tmp_path / "shards" / f"train-{i:02d}.jsonl.gz", "wt") as f:
            f.write(json.dumps(rec) + "\n")
    (tmp_path / "p.csv").write_text("question,answer\n" + "".join(f"{r['question']},{r['answer']}\n" for r in RECORDS))
    for path in (str(tmp_path / "shards" / "*.jsonl.gz"), str(tmp_path / "p.csv")):
        got = load_prompts(PromptDataConfig(path=path, **base), tok).examples
        assert [(e.prompt_ids, e.response_ids) for e in got] == want, path
    with pytest.raises(DataError, match="matches no files"):
        load_prompts(PromptDataConfig(path=str(tmp_path / "nope-*.jsonl"), **base), tok)


def test_parquet_and_saved_dataset_match_jsonl(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenizer = make_tokenizer(chat=True)
    base = dict(prompt_field="question", response_field="answer", max_prompt_tokens=64)
    want = load_prompts(PromptDataConfig(path=write_jsonl(tmp_path / "p.jsonl", RECORDS), **base), tokenizer)
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "p.parquet")
    got = load_prompts(PromptDataConfig(path=str(tmp_path / "p.parquet"), **base), tokenizer)
    assert got == want
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.Table.from_pylist(RECORDS[:2]), tmp_path / "shards" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(RECORDS[2:]), tmp_path / "shards" / "b.parquet")
    got = load_prompts(PromptDataConfig(path=str(tmp_path / "shards"), **base), tokenizer)
    assert got == want
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "ds"))
    got = load_prompts(PromptDataConfig(path=str(tmp_path / "ds"), **base), tokenizer)
    assert got == want
    with pytest.raises(DataError, match="no split 'test'"):
        load_prompts(PromptDataConfig(path=str(tmp_path / "ds"), split="test", **base), tokenizer)
    with pytest.raises(DataError, match="no field 'prompt'"):
        load_prompts(PromptDataConfig(path=str(tmp_path / "p.parquet")), tokenizer)


def test_length_filter_is_reported(tmp_path, caplog):
    path = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    cfg = PromptDataConfig(path=path, prompt_field="question", max_prompt_tokens=5)
    with caplog.at_level(logging.WARNING):
        got = load_prompts(cfg, make_tokenizer(chat=False))
    assert [e.index for e in got.examples] == [0, 1, 3]
    assert (got.num_records, got.num_prompt_too_long) == (4, 1)
    assert "dropped 1 of 4 prompts longer than 5" in caplog.text
    cfg = PromptDataConfig(path=path, prompt_field="question", response_field="answer", max_response_tokens=2)
    got = load_prompts(cfg, make_tokenizer(chat=False))
    assert [e.index for e in got.examples] == [0, 1, 3] and got.num_response_too_long == 1
    with pytest.raises(DataError, match="all 4 records were dropped"):
        load_prompts(PromptDataConfig(path=path, prompt_field="question", max_prompt_tokens=2),
                     make_tokenizer(chat=False))


def test_clear_errors(tmp_path):
    tok = make_tokenizer(chat=False)
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(PromptDataConfig(path=str(tmp_path / "missing.jsonl")), tok)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no records"):
        load_prompts(PromptDataConfig(path=str(tmp_path / "empty.jsonl")), tok)
    path = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    with pytest.raises(DataError, match=r"no field 'prompt'; fields are \['answer', 'question'\]"):
        load_prompts(PromptDataConfig(path=path), tok)
    with pytest.raises(DataError, match="no field 'solution'"):
        load_prompts(PromptDataConfig(path=path, prompt_field="question", response_field="solution"), tok)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "what"}\n{"prompt": \n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        load_prompts(PromptDataConfig(path=str(tmp_path / "bad.jsonl")), tok)
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(DataError, match="data.format"):
        load_prompts(PromptDataConfig(path=str(tmp_path / "p.txt")), tok)
    with pytest.raises(DataError, match="data.max_prompt_tokens"):
        PromptDataConfig(path=path, max_prompt_tokens=0)
    with pytest.raises(DataError, match="data.chat_template"):
        PromptDataConfig(path=path, chat_template="sometimes")


def _steps(sampler, n):
    return [sampler.next_indices() for _ in range(n)]


def test_sampler_shuffles_deterministically_and_covers_each_epoch():
    a = _steps(ShardedSampler(10, global_batch_size=4, seed=3), 6)
    assert a == _steps(ShardedSampler(10, global_batch_size=4, seed=3), 6)
    assert a != _steps(ShardedSampler(10, global_batch_size=4, seed=4), 6)
    for epoch in range(3):  # 2 steps per epoch, the tail of 2 is skipped; no repeats in an epoch
        seen = a[2 * epoch] + a[2 * epoch + 1]
        assert len(set(seen)) == 8 and set(seen) <= set(range(10))
    assert a[0:2] != a[2:4]  # a new order every epoch
    assert _steps(ShardedSampler(6, global_batch_size=3, shuffle=False), 3) == [[0, 1, 2], [3, 4, 5], [0, 1, 2]]


def test_sampler_shards_disjointly_across_dp_ranks():
    single = _steps(ShardedSampler(50, global_batch_size=8, seed=1), 9)
    ranks = [_steps(ShardedSampler(50, global_batch_size=8, seed=1, dp_rank=r, dp_size=4), 9) for r in range(4)]
    for step in range(9):
        parts = [ranks[r][step] for r in range(4)]
        assert all(len(p) == 2 for p in parts)
        assert sum(parts, []) == single[step]  # disjoint, and the same global batch as DP=1
    with pytest.raises(DataError, match="multiple of the data-parallel size"):
        ShardedSampler(50, global_batch_size=6, dp_size=4)
    with pytest.raises(DataError, match="fewer than one global batch"):
        ShardedSampler(5, global_batch_size=8)


def test_sampler_resumes_exactly():
    full = _steps(ShardedSampler(10, global_batch_size=4, seed=7, dp_rank=1, dp_size=2), 9)
    first = ShardedSampler(10, global_batch_size=4, seed=7, dp_rank=1, dp_size=2)
    head = _steps(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # survives a round trip through a checkpoint
    resumed = ShardedSampler(10, global_batch_size=4, seed=7, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    assert head + _steps(resumed, 4) == full
    # the cursor is global: resuming at DP=1 serves the same global batches
    single = ShardedSampler(10, global_batch_size=4, seed=7)
    single.load_state_dict(state)
    reference = ShardedSampler(10, global_batch_size=4, seed=7)
    _steps(reference, 5)
    assert _steps(single, 4) == _steps(reference, 4)
    with pytest.raises(DataError, match="the usable prompts of data.path: 10 when saved, 11 now"):
        ShardedSampler(11, global_batch_size=4, seed=7).load_state_dict(state)


def test_loader_pads_prompts_left_and_responses_right(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    prompts = load_prompts(PromptDataConfig(path=path, prompt_field="question", response_field="answer"),
                           make_tokenizer(chat=False))
    loader = PromptLoader(prompts, ShardedSampler(len(prompts), global_batch_size=2, shuffle=False), pad_id=0)
    batch = loader.next_batch()
    assert batch.indices == [0, 1]
    assert batch.prompt_ids.tolist() == [ids("what is two plus two"), ids("what is two plus three")]
    batch = loader.next_batch()
    assert batch.indices == [2, 3]
    assert batch.prompt_lens.tolist() == [10, 3]
    assert batch.prompt_ids[1].tolist() == [0] * 7 + ids("what is four")
    assert batch.response_ids.tolist() == [ids("be brief <eos>"), ids("four <eos>") + [0]]
    assert batch.response_lens.tolist() == [3, 2]
    assert loader.state_dict()["position"] == 4
    assert batch.domains is None


def test_domain_field_travels_with_each_prompt(tmp_path):
    rows = [dict(r, domain=d) for r, d in zip(RECORDS, ["math", "code", "math", "chat"])]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = PromptDataConfig(path=path, prompt_field="question", domain_field="domain")
    prompts = load_prompts(cfg, make_tokenizer(chat=False))
    assert [e.domain for e in prompts.examples] == ["math", "code", "math", "chat"]
    loader = PromptLoader(prompts, ShardedSampler(len(prompts), global_batch_size=4, shuffle=False), pad_id=0)
    assert loader.next_batch().domains == ["math", "code", "math", "chat"]
    with pytest.raises(DataError, match=r"record 0 has no field 'area' \(data.domain_field\)"):
        load_prompts(PromptDataConfig(path=path, prompt_field="question", domain_field="area"),
                     make_tokenizer(chat=False))


def test_padding_helpers():
    x, n = left_pad([[1, 2], [3]], pad_id=9, width=3)
    assert x.tolist() == [[9, 1, 2], [9, 9, 3]] and n.tolist() == [2, 1]
    y, m = right_pad([[1, 2, 3], [4]], pad_id=0, width=2)
    assert y.tolist() == [[1, 2], [4, 0]] and m.tolist() == [2, 1]
    with pytest.raises(ValueError):
        left_pad([[1, 2, 3]], pad_id=0, width=2)
    assert torch.is_tensor(x)


def test_unknown_tokens_are_dropped_and_located(tmp_path, caplog):
    """Text outside the tokenizer's alphabet encodes to <unk>: such records used to train silently
    on the placeholder; they are now dropped, counted, and their lines named (blank lines counted)."""
    rows = [RECORDS[0], {"question": "what is ζ", "answer": "four"}, RECORDS[1],
            {"question": "what is two", "answer": "vier"}]
    path = tmp_path / "u.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]))
    cfg = PromptDataConfig(path=str(path), prompt_field="question", response_field="answer")
    with caplog.at_level(logging.WARNING):
        got = load_prompts(cfg, make_tokenizer(chat=False))
    assert [e.index for e in got.examples] == [0, 2] and got.num_unknown_tokens == 2
    assert "dropped 2 of 4 records with text the tokenizer cannot represent" in caplog.text
    assert "'<unk>'; at line 2, line 5" in caplog.text
    only_unknown = tmp_path / "x.jsonl"
    only_unknown.write_text(json.dumps({"question": "ζ"}) + "\n")
    with pytest.raises(DataError, match="all 1 records were dropped.*1 with text the tokenizer encodes as its unknown"):
        load_prompts(PromptDataConfig(path=str(only_unknown), prompt_field="question"), make_tokenizer(chat=False))


def test_a_huge_prompt_is_dropped_without_tokenizing_it(tmp_path, caplog):
    """A 5 MB one-line prompt took 38 s and 2.45 GB to tokenize before it was dropped: a text over
    MAX_CHARS_PER_TOKEN characters per allowed token is now counted too long untokenized."""
    from nemo_opdlm.data import prompts as P

    tok = make_tokenizer(chat=False)
    seen: list[int] = []
    real = type(tok).__call__

    def spy(self, texts, **kw):
        seen.extend(len(t) for t in texts)
        return real(self, texts, **kw)

    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"question": "two " * 1_250_000}) + "\n")
    cfg = PromptDataConfig(path=str(path), prompt_field="question", max_prompt_tokens=16)
    import unittest.mock

    with unittest.mock.patch.object(type(tok), "__call__", spy), caplog.at_level(logging.WARNING):
        got = load_prompts(cfg, tok)
    assert [e.index for e in got.examples] == [0] and got.num_prompt_too_long == 1
    assert max(seen) <= 16 * P.MAX_CHARS_PER_TOKEN, seen  # the 5 MB text never reached the tokenizer
    assert "dropped 1 of 2 prompts longer than 16 tokens (data.max_prompt_tokens; at line 2)" in caplog.text
