"""Prompt files and the k-repeat / evaluation index samplers (SPEC section 2)."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from advantage_weighted_matching.prompts import (
    GENEVAL_TAGS,
    PromptFileError,
    eval_indices,
    k_repeat_batch,
    k_repeat_indices,
    load_geneval_metadata,
    load_prompts,
    load_text_prompts,
    prompt_file,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _lines(path):
    """Number of lines the way a reader sees them (`wc -l`, plus a last line without newline)."""
    data = Path(path).read_bytes()
    return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)


# ---------------------------------------------------------------------------
# The real prompt sets in ../shared/datasets.
# counts: ocr/test.txt has 1017 newlines and a last line without one -> 1018 prompts;
# geneval/test_metadata.jsonl has 2211 newlines and a last line without one -> 2212
# rows (553 GenEval prompts x 4); pickscore test 2048, train 25432; 80 object names.
EXPECTED_COUNTS = {
    "ocr/test.txt": 1018,
    "pickscore/test.txt": 2048,
    "pickscore/train.txt": 25432,
    "geneval/object_names.txt": 80,
    "geneval/test_metadata.jsonl": 2212,
}


def test_every_shared_file_is_covered(shared_datasets):
    files = sorted(str(p.relative_to(shared_datasets)) for p in shared_datasets.rglob("*") if p.is_file())
    assert files == sorted(EXPECTED_COUNTS)


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED_COUNTS if n.endswith(".txt")))
def test_shared_text_files(shared_datasets, name):
    path = shared_datasets / name
    prompts, metadata = load_text_prompts(str(path))
    assert len(prompts) == EXPECTED_COUNTS[name] == _lines(path)
    assert metadata == [{}] * len(prompts)
    assert all(p and p == p.strip() for p in prompts)
    raw = path.read_text(encoding="utf-8").splitlines()
    assert prompts[0] == raw[0].strip() and prompts[-1] == raw[-1].strip()


def test_shared_ocr_last_line_has_no_newline(shared_datasets):
    path = shared_datasets / "ocr" / "test.txt"
    assert not path.read_bytes().endswith(b"\n")
    prompts, _ = load_text_prompts(str(path))
    assert prompts[-1].endswith("dark vastness of space.")


def test_shared_ocr_prompts_have_quoted_text(shared_datasets):
    prompts, _ = load_text_prompts(str(shared_datasets / "ocr" / "test.txt"), require_quoted_text=True)
    assert len(prompts) == 1018
    assert '"Spring Collection 2024"' in prompts[0]


def test_shared_pickscore_prompts_are_not_all_quoted(shared_datasets):
    with pytest.raises(PromptFileError, match="test.txt:1:"):
        load_text_prompts(str(shared_datasets / "pickscore" / "test.txt"), require_quoted_text=True)


def test_shared_geneval(shared_datasets):
    path = shared_datasets / "geneval" / "test_metadata.jsonl"
    prompts, metadata = load_geneval_metadata(str(path))
    assert len(prompts) == len(metadata) == 2212 == _lines(path)
    assert set(row["tag"] for row in metadata) == set(GENEVAL_TAGS)
    assert len(GENEVAL_TAGS) == 6
    assert prompts[0] == "a photo of two wine glasses"
    assert metadata[0]["include"] == [{"class": "wine glass", "count": 2}]
    assert metadata[0]["exclude"] == [{"class": "wine glass", "count": 3}]
    assert all(p == m["prompt"] for p, m in zip(prompts, metadata))
    # every class is one of the 80 object names
    names = set(load_text_prompts(str(shared_datasets / "geneval" / "object_names.txt"))[0])
    classes = {c["class"] for m in metadata for c in m["include"] + m.get("exclude", [])}
    assert classes <= names
    positions = [c["position"] for m in metadata for c in m["include"] if "position" in c]
    assert positions and all(rel in ("left of", "right of", "above", "below") for rel, _ in positions)


def test_load_prompts_dispatch(shared_datasets):
    prompts, _ = load_prompts(str(shared_datasets / "pickscore"), "general_ocr", "test")
    assert len(prompts) == 2048
    prompts, metadata = load_prompts(str(shared_datasets / "geneval"), "geneval", "test")
    assert len(prompts) == 2212 and "tag" in metadata[0]
    with pytest.raises(ValueError, match="prompt_fn"):
        load_prompts(str(shared_datasets / "pickscore"), "pickapic", "test")


def test_prompt_file_names():
    assert prompt_file("/d", "general_ocr", "train") == "/d/train.txt"
    assert prompt_file("/d", "geneval", "test") == "/d/test_metadata.jsonl"


# ---------------------------------------------------------------------------
# The repo's own tiny sets.
def test_repo_tiny_text():
    for split in ("train", "test"):
        path = REPO_ROOT / "dataset" / "tiny_text" / f"{split}.txt"
        prompts, metadata = load_prompts(str(path.parent), "general_ocr", split)
        assert len(prompts) == _lines(path) > 0
        assert metadata == [{}] * len(prompts)
    assert len(load_prompts(str(REPO_ROOT / "dataset" / "tiny_text"), "general_ocr", "test")[0]) == 8


def test_repo_tiny_geneval():
    for split in ("train", "test"):
        path = REPO_ROOT / "dataset" / "tiny_geneval" / f"{split}_metadata.jsonl"
        prompts, metadata = load_prompts(str(path.parent), "geneval", split)
        assert len(prompts) == _lines(path) > 0
        assert set(m["tag"] for m in metadata) == set(GENEVAL_TAGS)


# ---------------------------------------------------------------------------
# Malformed input: errors name the file and the line.
GOOD = {"prompt": "a photo of a cat", "tag": "single_object", "include": [{"class": "cat", "count": 1}]}


def _jsonl(tmp_path, rows, name="test_metadata.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def _bad_geneval_cases():
    position_ok = {"prompt": "p", "tag": "position",
                   "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["above", 0]}]}
    cases = {
        "bad_json": ("{not json", "invalid JSON"),
        "not_object": ("[1, 2]", "expected a JSON object"),
        "missing_tag": ({"prompt": "p", "include": GOOD["include"]}, "missing key 'tag'"),
        "missing_include": ({"prompt": "p", "tag": "single_object"}, "missing key 'include'"),
        "missing_prompt": ({"tag": "single_object", "include": GOOD["include"]}, "missing key 'prompt'"),
        "empty_prompt": (dict(GOOD, prompt="  "), "'prompt' must be a non-empty string"),
        "unknown_tag": (dict(GOOD, tag="texture"), "unknown tag 'texture'"),
        "empty_include": (dict(GOOD, include=[]), "'include' must be a non-empty list"),
        "clause_no_class": (dict(GOOD, include=[{"count": 1}]), "'class'"),
        "clause_zero_count": (dict(GOOD, include=[{"class": "cat", "count": 0}]), "'count' >= 1"),
        "clause_bool_count": (dict(GOOD, include=[{"class": "cat", "count": True}]), "'count' >= 1"),
        "color_not_string": (dict(GOOD, include=[{"class": "cat", "count": 1, "color": 3}]), "'color'"),
        "unknown_color": (dict(GOOD, include=[{"class": "cat", "count": 1, "color": "teal"}]), "'teal'"),
        "unknown_class": (dict(GOOD, include=[{"class": "unicorn", "count": 1}]), "unknown class 'unicorn'"),
        "unknown_exclude_class": (dict(GOOD, exclude=[{"class": "cats", "count": 2}]), "unknown class 'cats'"),
        "bad_relation": (dict(position_ok, include=[position_ok["include"][0],
                                                    dict(position_ok["include"][1], position=["near", 0])]),
                         "'position' must be [relation, group_index]"),
        "position_forward_ref": (dict(position_ok, include=[position_ok["include"][0],
                                                            dict(position_ok["include"][1], position=["above", 1])]),
                                 "position refers to group 1"),
        "position_in_first_clause": (dict(position_ok, include=[{"class": "cat", "count": 1,
                                                                 "position": ["above", 0]}]),
                                     "position refers to group 0"),
        "position_in_exclude": (dict(GOOD, exclude=[{"class": "cat", "count": 2, "position": ["above", 0]}]),
                                "only allowed in include"),
        "exclude_not_list": (dict(GOOD, exclude={"class": "cat", "count": 2}), "'exclude' must be a list"),
    }
    return cases


@pytest.mark.parametrize("case", sorted(_bad_geneval_cases()))
def test_geneval_malformed_line_3(tmp_path, case):
    bad, needle = _bad_geneval_cases()[case]
    path = _jsonl(tmp_path, [GOOD, GOOD, bad, GOOD])
    with pytest.raises(PromptFileError) as info:
        load_geneval_metadata(path)
    message = str(info.value)
    assert f"{path}:3:" in message, message
    assert needle in message, message


def test_geneval_valid_position_and_exclude(tmp_path):
    row = {"prompt": "a dog above a cat", "tag": "position",
           "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["above", 0]}],
           "exclude": [{"class": "cat", "count": 2}]}
    prompts, metadata = load_geneval_metadata(_jsonl(tmp_path, [GOOD, row]))
    assert prompts == ["a photo of a cat", "a dog above a cat"]
    assert metadata[1] == row


def test_geneval_classes_from_an_object_names_file(tmp_path):
    names = tmp_path / "object_names.txt"
    names.write_text("unicorn\ncat\n", encoding="utf-8")
    row = dict(GOOD, include=[{"class": "unicorn", "count": 1}])
    path = _jsonl(tmp_path, [GOOD, row])
    with pytest.raises(PromptFileError, match=":2: unknown class 'unicorn'"):
        load_prompts(str(tmp_path), "geneval", "test")
    assert load_prompts(str(tmp_path), "geneval", "test", object_names_file=str(names))[0] == [
        GOOD["prompt"], row["prompt"]]
    assert path.endswith("test_metadata.jsonl")


@pytest.mark.parametrize("name", ["train.txt", "train_metadata.jsonl"])
def test_non_utf8_file_names_file_line_and_byte(tmp_path, name):
    path = tmp_path / name
    good = json.dumps(GOOD).encode() if name.endswith(".jsonl") else b"a photo of a cat"
    path.write_bytes(good + b"\n" + good + b"\n" + good.replace(b"photo", b"ph\xe9to") + b"\n")  # Latin-1 e-acute
    fmt = "geneval" if name.endswith(".jsonl") else "general_ocr"
    with pytest.raises(PromptFileError) as info:
        load_prompts(str(tmp_path), fmt, "train")
    message = str(info.value)
    assert f"{path}:3: not UTF-8 (byte 0xe9 at column" in message, message


def test_empty_file(tmp_path):
    path = tmp_path / "test.txt"
    path.write_text("", encoding="utf-8")
    with pytest.raises(PromptFileError, match="empty") as info:
        load_text_prompts(str(path))
    assert str(path) in str(info.value)
    path.write_text("\n\n  \n", encoding="utf-8")  # only blank lines: empty too
    with pytest.raises(PromptFileError, match="empty"):
        load_text_prompts(str(path))
    jsonl = tmp_path / "test_metadata.jsonl"
    jsonl.write_text("", encoding="utf-8")
    with pytest.raises(PromptFileError, match="empty"):
        load_geneval_metadata(str(jsonl))


def test_missing_file(tmp_path):
    missing = tmp_path / "nope" / "train.txt"
    with pytest.raises(PromptFileError, match="not found") as info:
        load_text_prompts(str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts(str(tmp_path), "geneval", "train")


def test_blank_line_in_the_middle(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("one\ntwo\n\nfour\n", encoding="utf-8")
    with pytest.raises(PromptFileError) as info:
        load_text_prompts(str(path))
    assert f"{path}:3: empty prompt line" in str(info.value)


def test_trailing_blank_lines_tolerated_and_whitespace_stripped(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("  one  \ntwo\n\n\n", encoding="utf-8")
    assert load_text_prompts(str(path)) == (["one", "two"], [{}, {}])


def test_ocr_prompt_without_quotes(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text('a sign saying "OPEN"\na sign with no text\na banner "Hi"\nempty quotes ""\n', encoding="utf-8")
    with pytest.raises(PromptFileError) as info:
        load_text_prompts(str(path), require_quoted_text=True)
    message = str(info.value)
    assert f"{path}:2:" in message and "a sign with no text" in message
    assert f"{path}:4:" in message  # "" holds no text either
    assert f"{path}:1:" not in message and f"{path}:3:" not in message
    # without the requirement the same file loads
    assert len(load_text_prompts(str(path))[0]) == 4


# ---------------------------------------------------------------------------
# k-repeat sampler.
def _all_ranks(num_prompts, seed, counter, processes, batch, k):
    slices = [k_repeat_indices(num_prompts, seed, counter, processes, batch, k, rank) for rank in range(processes)]
    for s in slices:
        assert s.dtype == torch.long and s.shape == (batch,)
    # the trainer reads every rank's share from one k_repeat_batch call
    assert torch.equal(torch.cat(slices), k_repeat_batch(num_prompts, seed, counter, processes, batch, k))
    return torch.cat(slices).tolist()


@pytest.mark.parametrize(
    "num_prompts, processes, batch, k",
    [(1018, 8, 6, 24), (2212, 32, 6, 24), (48, 2, 4, 4), (5, 1, 4, 4), (10, 3, 4, 6)],
)
def test_k_repeat_groups(num_prompts, processes, batch, k):
    m = processes * batch // k
    for counter in (0, 1, 7):
        everything = _all_ranks(num_prompts, 42, counter, processes, batch, k)
        counts = Counter(everything)
        assert len(everything) == processes * batch
        assert len(counts) == m
        assert set(counts.values()) == {k}
        assert all(0 <= i < num_prompts for i in counts)


def test_k_repeat_matches_spec_recipe():
    # SPEC: generator seeded seed + counter; randperm(n)[:m]; repeat each k times;
    # shuffle with randperm(m*k) of the same generator; rank r takes [r*B, (r+1)*B).
    n, seed, counter, processes, batch, k = 100, 42, 5, 4, 6, 8
    m = processes * batch // k  # 3
    g = torch.Generator().manual_seed(seed + counter)
    chosen = torch.randperm(n, generator=g)[:m]
    full = chosen.repeat_interleave(k)[torch.randperm(m * k, generator=g)]
    for rank in range(processes):
        got = k_repeat_indices(n, seed, counter, processes, batch, k, rank)
        assert torch.equal(got, full[rank * batch : (rank + 1) * batch])


def test_k_repeat_is_pure():
    a = _all_ranks(1018, 42, 3, 8, 6, 24)
    torch.manual_seed(123)  # global RNG state must not matter
    torch.rand(10)
    b = _all_ranks(1018, 42, 3, 8, 6, 24)
    assert a == b
    # depends on seed and counter only through seed + counter (SPEC)
    assert _all_ranks(1018, 40, 5, 8, 6, 24) == a


def test_k_repeat_varies_with_counter_and_seed():
    base = _all_ranks(1018, 42, 0, 8, 6, 24)
    by_counter = [_all_ranks(1018, 42, c, 8, 6, 24) for c in range(1, 6)]
    assert all(other != base for other in by_counter)
    assert _all_ranks(1018, 7, 0, 8, 6, 24) != base
    # different groups (not only a different order) across counters, over a few draws
    groups = {frozenset(x) for x in [base] + by_counter}
    assert len(groups) == 6


def test_k_repeat_counter_zero_is_first_epoch():
    # No skipped epochs: counter 0 uses torch.Generator seeded exactly `seed`.
    g = torch.Generator().manual_seed(42)
    chosen = set(torch.randperm(1018, generator=g)[:2].tolist())
    assert set(_all_ranks(1018, 42, 0, 8, 6, 24)) == chosen


def test_k_repeat_errors():
    with pytest.raises(ValueError, match="dataset has 1"):
        k_repeat_indices(1, 42, 0, 8, 6, 24, 0)  # m = 2 > 1 prompt
    with pytest.raises(ValueError, match="not divisible by k = 24"):
        k_repeat_indices(100, 42, 0, 3, 6, 24, 0)  # 18 images
    assert k_repeat_indices(2, 42, 0, 8, 6, 24, 7).tolist() != []  # m == n is fine


# ---------------------------------------------------------------------------
# Evaluation indices.
@pytest.mark.parametrize(
    "num_prompts, processes, batch",
    [(1018, 8, 6), (2212, 32, 6), (8, 1, 4), (8, 3, 4), (5, 8, 2), (2048, 8, 6)],
)
def test_eval_indices_cover_once(num_prompts, processes, batch):
    per_rank = [eval_indices(num_prompts, processes, batch, rank) for rank in range(processes)]
    num_batches = len(per_rank[0])
    expected_batches = -(-(-(-num_prompts // processes)) // batch)  # ceil(ceil(n / P) / B)
    assert num_batches == expected_batches
    seen = []
    for rank, batches in enumerate(per_rank):
        assert len(batches) == num_batches
        assert all(len(b) == batch for b in batches)
        flat = [i for b in batches for i in b]
        real = [i for i in flat if i != -1]
        assert real == sorted(real) and all(i % processes == rank for i in real)  # in order
        assert all(i == -1 for i in flat[len(real):])  # padding only at the end
        seen += real
    assert sorted(seen) == list(range(num_prompts))


def test_eval_indices_hand_example():
    # 10 prompts, 3 ranks, batch 2: ceil(10/3) = 4 per rank -> 2 batches each.
    assert eval_indices(10, 3, 2, 0) == [[0, 3], [6, 9]]
    assert eval_indices(10, 3, 2, 1) == [[1, 4], [7, -1]]
    assert eval_indices(10, 3, 2, 2) == [[2, 5], [8, -1]]
    # ocr test split on 8 GPUs, test_batch_size 6: 128 slots per rank -> 22 batches
    assert len(eval_indices(1018, 8, 6, 0)) == 22
    # rank 0 holds 0, 8, ..., 1016 (128 prompts), rank 7 holds 7, ..., 1015 (127 prompts)
    assert eval_indices(1018, 8, 6, 0)[-1] == [1008, 1016, -1, -1, -1, -1]
    assert eval_indices(1018, 8, 6, 7)[-1] == [1015, -1, -1, -1, -1, -1]


def test_eval_indices_limit():
    batches = [eval_indices(1018, 2, 3, rank, limit=8) for rank in range(2)]
    assert batches[0] == [[0, 2, 4], [6, -1, -1]]
    assert batches[1] == [[1, 3, 5], [7, -1, -1]]
    assert eval_indices(5, 2, 4, 0, limit=100) == [[0, 2, 4, -1]]
