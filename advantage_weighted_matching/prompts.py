"""Prompt files and the k-repeat distributed prompt sampler (SPEC section 2).

Formats:
* ``general_ocr``: ``{dataset}/{split}.txt``, one prompt a line, metadata ``{}``.
* ``geneval``: ``{dataset}/{split}_metadata.jsonl``, one JSON object a line with
  ``prompt``, ``tag``, ``include`` (list of ``{class, count, color?, position?}``)
  and optional ``exclude``; every class one of the object names (GenEval's 80, or
  the ``rewards.geneval_object_names`` file), every colour one of GenEval's 10.

Files are UTF-8. Every malformed line (bytes that are not UTF-8 included)
raises `PromptFileError` naming the file and line number, before any model is
loaded.
"""

import json
import os
import re

import torch

from advantage_weighted_matching.rewards.geneval_rules import COLORS, OBJECT_NAMES

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
POSITION_RELATIONS = ("left of", "right of", "above", "below")
QUOTED_TEXT = re.compile(r'"([^"]*)"')


class PromptFileError(ValueError):
    """A missing, empty or malformed prompt file; the message names file and line."""


def prompt_file(dataset, prompt_fn, split):
    name = f"{split}.txt" if prompt_fn == "general_ocr" else f"{split}_metadata.jsonl"
    return os.path.join(dataset, name)


def _read_lines(path):
    if not os.path.isfile(path):
        raise PromptFileError(f"prompt file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - raw.rfind(b"\n", 0, error.start)
        raise PromptFileError(f"{path}:{line}: not UTF-8 (byte 0x{raw[error.start]:02x} at column {column}); "
                              f"save the file as UTF-8") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # tolerate trailing blank lines only
        lines.pop()
    if not lines:
        raise PromptFileError(f"prompt file is empty: {path}")
    return lines


def load_text_prompts(path, require_quoted_text=False):
    """One prompt a line. `require_quoted_text`: every prompt must hold a
    non-empty "quoted" target (the OCR reward's ground truth)."""
    prompts, errors = [], []
    for line_number, line in enumerate(_read_lines(path), start=1):
        prompt = line.strip()
        if not prompt:
            errors.append(f"{path}:{line_number}: empty prompt line")
        elif require_quoted_text and not (QUOTED_TEXT.search(prompt) and QUOTED_TEXT.search(prompt).group(1).strip()):
            errors.append(f'{path}:{line_number}: no "quoted text" for the OCR reward: {prompt[:80]!r}')
        prompts.append(prompt)
    if errors:
        raise PromptFileError("\n".join(errors[:20]) + (f"\n... {len(errors) - 20} more" if len(errors) > 20 else ""))
    return prompts, [{} for _ in prompts]


def _check_clause(clause, where, allow_position, object_names):
    if not isinstance(clause, dict):
        raise PromptFileError(f"{where}: clause must be an object, got {clause!r}")
    if not isinstance(clause.get("class"), str) or not clause["class"]:
        raise PromptFileError(f"{where}: clause needs a non-empty string 'class': {clause!r}")
    if clause["class"] not in object_names:
        raise PromptFileError(f"{where}: unknown class {clause['class']!r}: the detector knows "
                              f"{len(object_names)} object names (e.g. {', '.join(sorted(object_names)[:4])}, ...)")
    count = clause.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise PromptFileError(f"{where}: clause needs an integer 'count' >= 1: {clause!r}")
    if "color" in clause and clause["color"] not in COLORS:
        raise PromptFileError(f"{where}: 'color' must be one of {list(COLORS)}, got {clause['color']!r}")
    if "position" in clause:
        position = clause["position"]
        if not allow_position:
            raise PromptFileError(f"{where}: 'position' is only allowed in include clauses: {clause!r}")
        if (
            not isinstance(position, (list, tuple))
            or len(position) != 2
            or position[0] not in POSITION_RELATIONS
            or isinstance(position[1], bool)
            or not isinstance(position[1], int)
        ):
            raise PromptFileError(
                f"{where}: 'position' must be [relation, group_index] with relation in {list(POSITION_RELATIONS)}: "
                f"{clause!r}"
            )


def object_names(names_file=""):
    """GenEval's object names, or those of a `rewards.geneval_object_names` file (one per line)."""
    if not names_file:
        return frozenset(OBJECT_NAMES)
    return frozenset(load_text_prompts(names_file)[0])


def load_geneval_metadata(path, names=frozenset(OBJECT_NAMES)):
    """JSON lines with prompt/tag/include[/exclude]; returns (prompts, metadata).
    Classes must be in `names`, colours in GenEval's COLORS."""
    prompts, metadata = [], []
    for line_number, line in enumerate(_read_lines(path), start=1):
        where = f"{path}:{line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptFileError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(row, dict):
            raise PromptFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for key in ("prompt", "tag", "include"):
            if key not in row:
                raise PromptFileError(f"{where}: missing key {key!r}")
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise PromptFileError(f"{where}: 'prompt' must be a non-empty string")
        if row["tag"] not in GENEVAL_TAGS:
            raise PromptFileError(f"{where}: unknown tag {row['tag']!r}; known: {list(GENEVAL_TAGS)}")
        if not isinstance(row["include"], list) or not row["include"]:
            raise PromptFileError(f"{where}: 'include' must be a non-empty list")
        for index, clause in enumerate(row["include"]):
            _check_clause(clause, where, allow_position=True, object_names=names)
            if "position" in clause and not 0 <= clause["position"][1] < index:
                raise PromptFileError(f"{where}: position refers to group {clause['position'][1]}, not an earlier clause")
        exclude = row.get("exclude", [])
        if not isinstance(exclude, list):
            raise PromptFileError(f"{where}: 'exclude' must be a list")
        for clause in exclude:
            _check_clause(clause, where, allow_position=False, object_names=names)
        prompts.append(row["prompt"])
        metadata.append(row)
    return prompts, metadata


def load_prompts(dataset, prompt_fn, split, require_quoted_text=False, object_names_file=""):
    """(prompts, metadata) of `split` in `dataset` for the `prompt_fn` format."""
    path = prompt_file(dataset, prompt_fn, split)
    if prompt_fn == "general_ocr":
        return load_text_prompts(path, require_quoted_text)
    if prompt_fn == "geneval":
        return load_geneval_metadata(path, object_names(object_names_file))
    raise ValueError(f"prompt_fn={prompt_fn!r} is not one of ['general_ocr', 'geneval']")


def k_repeat_batch(num_prompts, seed, counter, num_processes, batch_size, k):
    """Every rank's prompt indices in rollout batch `counter` (SPEC section 2).

    A generator seeded ``seed + counter`` draws ``m = num_processes * batch_size / k``
    distinct prompts, repeats each k times and shuffles the ``m * k`` list; rank
    r's share is ``[r * batch_size, (r + 1) * batch_size)``. A pure function of its
    arguments: every rank computes the same list, no communication needed.

    Returns a LongTensor [num_processes * batch_size].
    """
    total = num_processes * batch_size
    if total % k:
        raise ValueError(f"num_processes * batch_size = {total} is not divisible by k = {k}")
    num_groups = total // k
    if num_groups > num_prompts:
        raise ValueError(f"{num_groups} distinct prompts per batch requested but the dataset has {num_prompts}")
    generator = torch.Generator().manual_seed(seed + counter)
    chosen = torch.randperm(num_prompts, generator=generator)[:num_groups]
    repeated = chosen.repeat_interleave(k)
    return repeated[torch.randperm(total, generator=generator)]


def k_repeat_indices(num_prompts, seed, counter, num_processes, batch_size, k, rank):
    """`rank`'s share of `k_repeat_batch`: a LongTensor [batch_size]."""
    return k_repeat_batch(num_prompts, seed, counter, num_processes, batch_size, k)[
        rank * batch_size : (rank + 1) * batch_size
    ]


def eval_indices(num_prompts, num_processes, batch_size, rank, limit=0):
    """Test-split batches for `rank`: every prompt once across ranks, in order.

    Prompt i goes to rank ``i % num_processes``; the list is padded with -1 so all
    ranks run the same number of batches (a collective gather needs that).
    Returns a list of index lists.
    """
    count = min(num_prompts, limit) if limit else num_prompts
    mine = list(range(rank, count, num_processes))
    per_rank = -(-count // num_processes)
    num_batches = -(-per_rank // batch_size)
    mine += [-1] * (num_batches * batch_size - len(mine))
    return [mine[b * batch_size : (b + 1) * batch_size] for b in range(num_batches)]
