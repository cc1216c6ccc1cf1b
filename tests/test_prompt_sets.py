"""Tests for core/prompt_sets.py: the three formats, auto-detection, filters, every error, the cycler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import PromptSourceConfig
from core.prompt_sets import (
    PromptCycler,
    PromptRecord,
    PromptSourceError,
    detect_format,
    load_prompt_source,
    load_prompts,
    resolve_prompt_path,
)
from tests import shared_data

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


def _err(*args, **kwargs) -> str:
    with pytest.raises(PromptSourceError) as exc:
        load_prompts(*args, **kwargs)
    return str(exc.value)


T2I = [
    {"Question": "a red cube left of a blue ball", "Category": "spatial", "Question_id": 7},
    {"Question": "  two cats  ", "Category": "numeracy", "Question_id": 8},
    {"Question": "a green hat", "Category": "color", "Question_id": 9},
    {"Question": "three dogs", "Category": "numeracy", "Question_id": 10},
]
GENEVAL = [
    {"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"},
    {"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "a photo of two cats"},
    {"tag": "counting", "include": [{"class": "dog", "count": 3}], "prompt": "a photo of three dogs"},
]


# ---------------------------------------------------------------------------------------- formats


def test_text_file_skips_blank_and_comment_lines(tmp_path):
    p = _write(tmp_path, "p.txt", "# header\n\na red cube\n   \n  a blue sphere  \r\n  # indented comment\nx#y\n")
    recs = load_prompts(p)
    assert recs == [
        PromptRecord(id="3", text="a red cube"),
        PromptRecord(id="5", text="a blue sphere"),
        PromptRecord(id="7", text="x#y"),
    ]


def test_t2i_compbench_json(tmp_path):
    recs = load_prompts(_write(tmp_path, "t.json", json.dumps(T2I, indent=2)))
    assert [r.id for r in recs] == ["7", "8", "9", "10"]
    assert recs[1] == PromptRecord(id="8", text="two cats", category="numeracy")


def test_t2i_compbench_without_question_id_uses_index(tmp_path):
    data = [{"Question": "a", "Category": "x"}, {"Question": "b"}]
    recs = load_prompts(_write(tmp_path, "t.json", json.dumps(data)))
    assert recs == [PromptRecord(id="0", text="a", category="x"), PromptRecord(id="1", text="b")]


def test_geneval_jsonl(tmp_path):
    text = json.dumps(GENEVAL[0]) + "\n\n" + "\n".join(json.dumps(g) for g in GENEVAL[1:]) + "\n"
    recs = load_prompts(_write(tmp_path, "g.jsonl", text))
    assert [(r.id, r.text, r.category) for r in recs] == [
        ("1", "a photo of a cow", "single_object"),
        ("3", "a photo of two cats", "counting"),
        ("4", "a photo of three dogs", "counting"),
    ]


def test_utf8_bom_and_unicode_text(tmp_path):
    p = _write(tmp_path, "u.txt", "\ufeffun café rouge\n猫と犬\n".encode())
    assert [r.text for r in load_prompts(p)] == ["un café rouge", "猫と犬"]


# --------------------------------------------------------------------------------- detection


def test_auto_detection_by_extension_and_content(tmp_path):
    assert detect_format(_write(tmp_path, "a.txt", "[not json]\n")) == "txt"
    assert detect_format(_write(tmp_path, "b.json", json.dumps(T2I))) == "t2i_compbench"
    assert detect_format(_write(tmp_path, "c.jsonl", json.dumps(GENEVAL[0]))) == "geneval"
    # content wins between the two JSON shapes, and sniffs unknown extensions
    assert detect_format(_write(tmp_path, "d.json", json.dumps(GENEVAL[0]) + "\n")) == "geneval"
    assert detect_format(_write(tmp_path, "e.data", "  " + json.dumps(T2I))) == "t2i_compbench"


def test_explicit_format_overrides_extension(tmp_path):
    p = _write(tmp_path, "prompts.list", "a cat\na dog\n")
    assert [r.text for r in load_prompts(p, format="txt")] == ["a cat", "a dog"]


def test_unknown_extension_and_unknown_format(tmp_path):
    p = _write(tmp_path, "prompts.csv", "a cat,a dog\n")
    text = _err(p)
    assert "unknown extension '.csv'" in text and str(p) in text and "format=" in text
    text = _err(p, format="csv")
    assert "unknown format 'csv'" in text and "t2i_compbench" in text


def test_json_extension_with_text_content(tmp_path):
    assert "must start with '['" in _err(_write(tmp_path, "x.json", "a cat\n"))


# ------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    p = tmp_path / "none.txt"
    text = _err(p)
    assert str(p) in text and "file not found" in text
    assert "not a regular file" in _err(tmp_path)


@pytest.mark.parametrize("name", ["e.txt", "e.json", "e.jsonl"])
def test_empty_file(tmp_path, name):
    assert "file is empty" in _err(_write(tmp_path, name, ""))
    assert "file is empty" in _err(_write(tmp_path, "w" + name, " \n\t\n"))


def test_comments_only_gives_no_prompts(tmp_path):
    assert "no prompts found" in _err(_write(tmp_path, "c.txt", "# a\n# b\n\n"))
    assert "no prompts found" in _err(_write(tmp_path, "l.json", "[]"))


def test_bad_encoding_names_byte_offset_and_line(tmp_path):
    p = _write(tmp_path, "bad.txt", b"a red cube\nbad \xff byte\n")
    text = _err(p)
    assert str(p) in text and "byte offset 15" in text and "0xff" in text and "line 2" in text


def test_invalid_json_names_line(tmp_path):
    text = _err(_write(tmp_path, "bad.json", '[\n  {"Question": "a"},\n  {"Question": }\n]'))
    assert "invalid JSON at line 3" in text


def test_invalid_jsonl_names_line(tmp_path):
    text = _err(_write(tmp_path, "bad.jsonl", json.dumps(GENEVAL[0]) + "\n{prompt: x}\n"))
    assert "invalid JSON at line 2" in text


def test_empty_prompt_in_json_names_entry(tmp_path):
    data = [T2I[0], {"Question": "   ", "Category": "color", "Question_id": 3}]
    text = _err(_write(tmp_path, "e.json", json.dumps(data)))
    assert "entry 1" in text and "empty prompt" in text


def test_empty_prompt_in_jsonl_names_line(tmp_path):
    text = _err(_write(tmp_path, "e.jsonl", json.dumps(GENEVAL[0]) + "\n" + json.dumps({"prompt": ""}) + "\n"))
    assert "line 2" in text and "empty prompt" in text


def test_missing_field(tmp_path):
    text = _err(_write(tmp_path, "m.json", json.dumps([T2I[0], {"question": "a"}])))
    assert "entry 1" in text and "missing field 'Question'" in text and "question" in text
    text = _err(_write(tmp_path, "m.jsonl", json.dumps({"text": "a"}) + "\n"))
    assert "line 1" in text and "missing field 'prompt'" in text


def test_wrong_shapes_and_types(tmp_path):
    assert "expected a JSON list" in _err(_write(tmp_path, "o.json", '{"Question": "a"}'), format="t2i_compbench")
    assert "entry 0: expected an object" in _err(_write(tmp_path, "s.json", '["a cat"]'))
    assert "must be a string" in _err(_write(tmp_path, "n.json", '[{"Question": 5}]'))
    assert "line 1: expected a JSON object" in _err(_write(tmp_path, "a.jsonl", "[1, 2]\n"), format="geneval")


def test_duplicate_question_ids(tmp_path):
    data = [T2I[0], {**T2I[1], "Question_id": 7}]
    assert "duplicate Question_id '7' (first at entry 0)" in _err(_write(tmp_path, "d.json", json.dumps(data)))


# ------------------------------------------------------------------------------ filter, limit


def test_categories_and_limit(tmp_path):
    p = _write(tmp_path, "t.json", json.dumps(T2I))
    recs = load_prompts(p, categories=["numeracy", "color"])
    assert [r.id for r in recs] == ["8", "9", "10"]  # file order, not filter order
    assert [r.id for r in load_prompts(p, categories="numeracy", limit=1)] == ["8"]
    assert [r.id for r in load_prompts(p, limit=2)] == ["7", "8"]
    assert len(load_prompts(p, limit=100)) == 4


def test_unknown_category_lists_available(tmp_path):
    p = _write(tmp_path, "t.json", json.dumps(T2I))
    text = _err(p, categories=["colour"])
    assert "unknown categories ['colour']" in text and "available: color, numeracy, spatial" in text
    assert "no categories" in _err(_write(tmp_path, "p.txt", "a cat\n"), categories=["color"])
    assert "categories filter is empty" in _err(p, categories=[])


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_bad_limit(tmp_path, limit):
    assert "limit must be a positive integer" in _err(_write(tmp_path, "p.txt", "a\n"), limit=limit)


# --------------------------------------------------------------------------- config-driven loading


def test_default_prompt_file():
    recs = load_prompts(REPO / "configs" / "prompts" / "default.txt")
    assert 35 <= len(recs) <= 45
    assert len({r.text for r in recs}) == len(recs)
    assert any("to the left of" in r.text for r in recs)


def test_resolve_prompt_path_falls_back_to_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_prompt_path("configs/prompts/default.txt") == REPO / "configs" / "prompts" / "default.txt"
    _write(tmp_path, "mine.txt", "x\n")
    assert resolve_prompt_path("mine.txt") == tmp_path / "mine.txt"
    assert resolve_prompt_path("absent.txt") == tmp_path / "absent.txt"
    assert resolve_prompt_path(tmp_path / "abs.txt") == tmp_path / "abs.txt"


def test_load_prompt_source_keeps_file_order_and_the_cycler_shuffles_once(tmp_path):
    p = _write(tmp_path, "p.txt", "\n".join(f"prompt {i}" for i in range(20)))
    plain = load_prompt_source(PromptSourceConfig(path=str(p)))
    assert [r.id for r in plain] == [str(i) for i in range(1, 21)]  # shuffling is the cycler's job alone
    limited = load_prompt_source(PromptSourceConfig(path=str(p), limit=5))
    assert [int(r.id) for r in limited] == [1, 2, 3, 4, 5]  # the first 5 of the file, in order

    def epochs(seed: int, shuffle: bool = True) -> list[str]:
        recs, _ = PromptCycler(plain, seed, shuffle).take(40)
        return [r.id for r in recs]

    a, b, c = epochs(3), epochs(3), epochs(4)
    assert a == b and a != c and sorted(a[:20], key=int) == [r.id for r in plain]
    assert a[:20] != a[20:]  # a fresh order every epoch
    assert epochs(3, shuffle=False) == [r.id for r in plain] * 2
    with pytest.raises(ValueError, match="at least one prompt"):
        PromptCycler([], 0)


# ---------------------------------------------------------------------------------- real data


def test_real_t2i_compbench_val():
    path = shared_data.COMPBENCH
    shared_data.require(path)
    recs = load_prompts(path)
    assert len(recs) == 2670 and len({r.id for r in recs}) == 2670
    assert recs[0] == PromptRecord(id="701", text="a dog in front of a desk", category="3d_spatial")
    assert len(load_prompts(path, categories=["color"])) == 300
    assert len({r.category for r in recs}) == 10


def test_real_geneval_metadata():
    path = shared_data.GENEVAL
    shared_data.require(path)
    recs = load_prompts(path)
    assert len(recs) == 553
    assert recs[0] == PromptRecord(id="1", text="a photo of a bench", category="single_object")
    assert len(load_prompts(path, categories=["position"])) == 100
