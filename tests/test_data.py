"""Datasets to chat prompts: formats, references, malformed rows, truncation, resumable order."""

from __future__ import annotations

import json
import logging

import pytest

from protege.data import Example, PromptStream, PromptTokenizer, load_rows, to_examples
from tiny import make_tokenizer


def test_rows_formats_and_bad_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"prompt": "plain"}),
             json.dumps({"prompt": [{"role": "user", "content": "chat"}], "completion": "ref"}),
             json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
             "{not json", json.dumps([1, 2]), json.dumps({"prompt": "  "}), json.dumps({"prompt": 7}),
             json.dumps({"messages": [{"role": "user"}]}), ""]
    path.write_text("\n".join(lines))
    ps = to_examples(load_rows(str(path)))
    assert len(ps) == 3 and ps.skipped == 5
    assert ps.examples[1].reference == "ref" and ps.examples[2].reference == "a"
    assert ps.examples[2].messages == [{"role": "user", "content": "q"}]
    assert any("invalid JSON" in k for k in ps.reasons)


def test_missing_column_lists_columns(tmp_path):
    with pytest.raises(ValueError, match=r"columns found: \['question'\]"):
        to_examples([{"question": "x"}])


def test_other_file_types(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"prompt": ["a", "b"], "completion": ["1", "2"]})
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        assert [e.reference for e in to_examples(load_rows(str(tmp_path / name))).examples] == ["1", "2"]
    with pytest.raises(ValueError, match="unsupported file type"):
        (tmp_path / "d.txt").write_text("x")
        load_rows(str(tmp_path / "d.txt"))
    with pytest.raises(FileNotFoundError):
        load_rows(str(tmp_path / "missing.jsonl"))


def test_long_prompts_keep_their_end_and_are_counted():
    pt = PromptTokenizer(make_tokenizer(), max_prompt_tokens=10)
    ids = pt.prompt_ids(Example(messages=[{"role": "user", "content": "x" * 50 + "END"}]))
    assert len(ids) == 10 and pt.truncated == 1
    assert pt.tok.decode(ids).endswith("END<eos><|assistant|>")


def test_stream_resumes_in_the_same_order():
    a = PromptStream(7, seed=3)
    first = a.take(5)
    state = a.state_dict()
    rest = a.take(12)
    b = PromptStream(7, seed=3)
    b.load_state_dict(state)
    assert b.take(12) == rest
    assert sorted(first + rest[:2]) == list(range(7))  # one epoch is a permutation


# ---- hostile and unusual JSONL (issue 18, item 6) -------------------------------------------------
def test_jsonl_rows_with_unicode_line_separators_are_kept(tmp_path):
    texts = ["a\u2028b", "c\u0085d", "e\u2029f\x1cg\x1dh\x1ei\x0bj\x0ck\rl"]  # all legal inside a JSON string
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    ps = to_examples(load_rows(str(path)))
    assert ps.skipped == 0
    assert [e.messages[0]["content"] for e in ps.examples] == texts


def test_jsonl_bom_keeps_the_first_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "first"}\n{"prompt": "second"}\n')
    ps = to_examples(load_rows(str(path)))
    assert ps.skipped == 0 and [e.messages[0]["content"] for e in ps.examples] == ["first", "second"]


def test_deeply_nested_line_is_one_bad_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "ok"}\n' + "[" * 100000 + "\n" + '{"prompt": ' + "[" * 50000 + "\n"
                    + '{"prompt": "also ok"}\n')
    ps = to_examples(load_rows(str(path)))
    assert [e.messages[0]["content"] for e in ps.examples] == ["ok", "also ok"]
    assert ps.skipped == 2


def test_unknown_roles_are_counted_with_a_warning(tmp_path, caplog):
    rows = [{"messages": [{"role": "human", "content": "q"}, {"role": "gpt", "content": "a"}]},
            {"messages": [{"role": "human", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
            {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}]
    with caplog.at_level(logging.WARNING, logger="protege"):
        to_examples(rows)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert "'human': 2" in warned[0] and "'gpt': 1" in warned[0]


@pytest.mark.parametrize("name,content", [("bad.parquet", b"PAR1 this is not parquet"),
                                          ("bad.csv", b'prompt,completion\n"a,1\nb,2,3,4\n')])
def test_unreadable_csv_and_parquet_name_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        load_rows(str(path))
    assert str(path) in str(err.value)


def test_invalid_utf8_bytes_are_counted_and_warned_with_their_lines(tmp_path, caplog):
    """Latin-1 bytes in a UTF-8 JSONL file (and a genuine U+FFFD, which is not counted): the rows are
    kept with U+FFFD, and one warning names the file, the count and the lines. Before: silent."""
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9 ok"}\n{"prompt": "fine \xef\xbf\xbd real"}\n{"prompt": "na\xefve \xff\xfe"}\n')
    with caplog.at_level(logging.WARNING):
        rows = load_rows(str(path))
    assert [r["prompt"] for r in rows] == ["caf\ufffd ok", "fine \ufffd real", "na\ufffdve \ufffd\ufffd"]
    warned = [r.getMessage() for r in caplog.records if "UTF-8" in r.getMessage()]
    assert len(warned) == 1 and str(path) in warned[0], warned
    assert "4 invalid UTF-8 byte sequence(s) on 2 line(s) (lines 1, 3)" in warned[0], warned[0]
