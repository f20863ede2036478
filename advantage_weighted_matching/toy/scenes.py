"""Synthetic "scenes": the toy task with headroom (issue H.1).

32x32 RGB images on a black background, filled non-overlapping squares and
circles in the four colours of `toy.shapes.PALETTE`, described by prompts of
three kinds (drawn with equal probability)::

    kind       prompt                                  objects
    count      "three green circles"                   1-4 shapes of one colour and kind
    pair       "a red square and two blue circles"     two colours, 1-2 shapes each
    relation   "a red circle left of a blue square"    one shape each; A left of / right of / above / below B

A spec is ``{"kind": ..., "objects": [{"count", "color", "shape"}, ...],
"relation": None | "left of" | ...}``; ``prompt_for(spec)`` writes the
prompt and ``parse_prompt`` reads it back (the reward `rewards.scenes` reads
the prompt, nothing else). The two colours of a pair / relation prompt differ.

Relation rule (shared by the renderer and the reward): with ``(dy, dx)`` =
centre of A - centre of B in pixels (y down), "left of" holds when
``dx < -|dy|``, "right of" when ``dx > |dy|``, "above" when ``dy < -|dx|``,
"below" when ``dy > |dx|`` (A lies in the 90-degree cone on that side of B).
Renders satisfy it with a margin of ``RELATION_MARGIN`` px.

Shapes are 8-12 px (shrunk when four do not fit), at least ``GAP`` px apart
and 1 px from the border, edges hard (every pixel is the background or a
palette colour); everything is a pure function of the numpy Generator passed
in. The prompt space: 32 count + 192 pair + 192 relation = 416 prompts.
"""

import os
import re

import numpy as np

from advantage_weighted_matching.toy.shapes import BACKGROUND, COLORS, PALETTE, RESOLUTION, SHAPES, _place, shape_mask

KINDS = ("count", "pair", "relation")
RELATIONS = ("left of", "right of", "above", "below")
COUNTS = (1, 2, 3, 4)  # count prompts
PAIR_COUNTS = (1, 2)  # each colour of a pair prompt
RELATION_MARGIN = 3  # px by which renders satisfy their relation
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
_WORD_COUNTS = {"a": 1, "one": 1, "two": 2, "three": 3, "four": 4}
_GROUP = (
    r"(a|one|two|three|four) (" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r")(s?)"
)
_PROMPT_RE = re.compile(rf"^{_GROUP}(?: (and|{'|'.join(RELATIONS)}) {_GROUP})?$")
PROMPT_GRAMMAR = (
    "'<group>', '<group> and <group>' (two colours, 1-2 each) or '<group> <relation> <group>' (one shape "
    f"each, two colours), group = '<count> <colour> <shape>[s]', count in {{a, one, two, three, four}}, "
    f"colour in {{{', '.join(COLORS)}}}, shape in {{{', '.join(SHAPES)}}}, plural exactly when count > 1, "
    f"relation in {{{', '.join(RELATIONS)}}}"
)


# The quick start's prompts (config/toy_awm.py:quickstart): its toy model is pretrained on them
# for about 40 s, and AWM then fine-tunes it on them (dataset/toy_scenes_quick).
QUICKSTART_PROMPTS = (
    "a red circle left of a blue square", "a green square above a yellow circle",
    "a blue circle right of a red circle", "a yellow square below a green square",
)


class ScenePromptError(ValueError):
    """A prompt outside the scenes grammar (the message quotes it and the grammar)."""


def relation_holds(relation, dy, dx):
    """Does A stand in `relation` to B, given centre(A) - centre(B) = (dy, dx) (y down)? numpy-broadcast."""
    if relation == "left of":
        return dx < -np.abs(dy)
    if relation == "right of":
        return dx > np.abs(dy)
    if relation == "above":
        return dy < -np.abs(dx)
    if relation == "below":
        return dy > np.abs(dx)
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def _group(count, color, shape):
    return {"count": int(count), "color": color, "shape": shape}


def sample_spec(rng, kinds=KINDS):
    """A random spec from numpy Generator `rng`: kind uniform over `kinds`, then its fields uniform."""
    kind = kinds[rng.integers(len(kinds))]
    shape = lambda: SHAPES[rng.integers(len(SHAPES))]  # noqa: E731
    if kind == "count":
        return {"kind": kind, "objects": [_group(COUNTS[rng.integers(len(COUNTS))], COLORS[rng.integers(4)], shape())],
                "relation": None}
    first, second = (COLORS[i] for i in rng.permutation(len(COLORS))[:2])
    if kind == "pair":
        counts = [PAIR_COUNTS[i] for i in rng.integers(len(PAIR_COUNTS), size=2)]
        return {"kind": kind, "objects": [_group(counts[0], first, shape()), _group(counts[1], second, shape())],
                "relation": None}
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    return {"kind": kind, "objects": [_group(1, first, shape()), _group(1, second, shape())], "relation": relation}


def all_specs(kind):
    """Every spec of one kind, in a fixed order."""
    if kind == "count":
        return [{"kind": kind, "objects": [_group(n, c, s)], "relation": None}
                for n in COUNTS for c in COLORS for s in SHAPES]
    pairs = [(a, b) for a in COLORS for b in COLORS if a != b]
    shapes = [(s, t) for s in SHAPES for t in SHAPES]
    if kind == "pair":
        return [{"kind": kind, "objects": [_group(n, a, s), _group(m, b, t)], "relation": None}
                for n in PAIR_COUNTS for m in PAIR_COUNTS for a, b in pairs for s, t in shapes]
    if kind == "relation":
        return [{"kind": kind, "objects": [_group(1, a, s), _group(1, b, t)], "relation": r}
                for r in RELATIONS for a, b in pairs for s, t in shapes]
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def check_spec(spec):
    """Raise ValueError unless `spec` is one the grammar can say."""
    kind, objects, relation = spec.get("kind"), spec.get("objects"), spec.get("relation")
    ok = kind in KINDS and isinstance(objects, (list, tuple)) and all(
        o.get("color") in PALETTE and o.get("shape") in SHAPES for o in objects)
    if ok and kind == "count":
        ok = len(objects) == 1 and objects[0].get("count") in COUNTS and relation is None
    elif ok:
        counts = (1,) if kind == "relation" else PAIR_COUNTS
        ok = (len(objects) == 2 and all(o.get("count") in counts for o in objects)
              and objects[0]["color"] != objects[1]["color"]
              and (relation in RELATIONS if kind == "relation" else relation is None))
    if not ok:
        raise ValueError(f"bad scenes spec {spec!r}: expected {PROMPT_GRAMMAR}")


def prompt_for(spec):
    """"three green circles", "a red square and two blue circles", "a red circle left of a blue square"."""
    check_spec(spec)
    groups = [f"{COUNT_WORDS[o['count']]} {o['color']} {o['shape']}{'s' if o['count'] > 1 else ''}"
              for o in spec["objects"]]
    if spec["kind"] == "count":
        return groups[0]
    return f"{groups[0]} {'and' if spec['kind'] == 'pair' else spec['relation']} {groups[1]}"


def parse_prompt(prompt):
    """Inverse of `prompt_for` -> spec. Case and surrounding whitespace are ignored, nothing
    else is: anything outside the grammar raises ScenePromptError."""
    if not isinstance(prompt, str):
        raise ScenePromptError(f"scenes prompt must be a string, got {type(prompt).__name__}: {prompt!r}")
    match = _PROMPT_RE.match(prompt.strip().lower())
    if match is None:
        raise ScenePromptError(f"cannot parse scenes prompt {prompt!r}: expected {PROMPT_GRAMMAR}")
    words = match.groups()
    objects = []
    for count_word, color, shape, plural in (words[0:4], words[5:9]):
        if count_word is None:
            continue
        count = _WORD_COUNTS[count_word]
        if (count > 1) != bool(plural):
            raise ScenePromptError(f"cannot parse scenes prompt {prompt!r}: '{count_word} ... {shape}{plural}' "
                                   f"has the wrong number; expected {PROMPT_GRAMMAR}")
        objects.append(_group(count, color, shape))
    joiner = words[4]
    kind = "count" if joiner is None else "pair" if joiner == "and" else "relation"
    spec = {"kind": kind, "objects": objects, "relation": joiner if kind == "relation" else None}
    try:
        check_spec(spec)
    except ValueError:
        raise ScenePromptError(f"cannot parse scenes prompt {prompt!r}: expected {PROMPT_GRAMMAR}") from None
    return spec


def _box_centre(box):
    y, x, size = box
    return y + (size - 1) / 2, x + (size - 1) / 2


def place_objects(spec, rng, resolution=RESOLUTION, max_tries=500):
    """Boxes (y, x, size) for every shape of `spec`, objects in order; a relation spec's two
    boxes satisfy the relation by RELATION_MARGIN px (rejection sampling)."""
    total = sum(o["count"] for o in spec["objects"])
    for _ in range(max_tries):
        boxes = _place(total, rng, resolution)
        if spec["kind"] != "relation":
            return boxes
        (ya, xa), (yb, xb) = _box_centre(boxes[0]), _box_centre(boxes[1])
        dy, dx = ya - yb, xa - xb
        # shift the offset towards "not holding" by the margin: it must hold anyway
        if spec["relation"] in ("left of", "right of"):
            sign = -1 if spec["relation"] == "left of" else 1
            if relation_holds(spec["relation"], dy, dx - sign * RELATION_MARGIN):
                return boxes
        else:
            sign = -1 if spec["relation"] == "above" else 1
            if relation_holds(spec["relation"], dy - sign * RELATION_MARGIN, dx):
                return boxes
    raise RuntimeError(f"could not place {prompt_for(spec)!r} in {max_tries} tries")


def render(spec, rng, resolution=RESOLUTION):
    """uint8 [resolution, resolution, 3]: the spec's shapes at random sizes/positions drawn from `rng`."""
    check_spec(spec)
    image = np.empty((resolution, resolution, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    boxes = iter(place_objects(spec, rng, resolution))
    for group in spec["objects"]:
        colour = np.asarray(PALETTE[group["color"]], dtype=np.uint8)
        for _ in range(group["count"]):
            y, x, size = next(boxes)
            image[y: y + size, x: x + size][shape_mask(group["shape"], size)] = colour
    return image


def make_dataset(n, seed, kinds=KINDS, prompts=None):
    """(images uint8 [n, 32, 32, 3], prompts list[str], specs list[dict]) from seed `seed`:
    prompt kinds drawn uniformly from `kinds`, or, given `prompts`, prompts drawn uniformly from those."""
    rng = np.random.default_rng(seed)
    choices = [parse_prompt(p) for p in prompts] if prompts else None
    images = np.empty((n, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    prompts, specs = [], []
    for index in range(n):
        spec = choices[rng.integers(len(choices))] if choices else sample_spec(rng, tuple(kinds))
        images[index] = render(spec, rng)
        prompts.append(prompt_for(spec))
        specs.append(spec)
    return images, prompts, specs


def balanced_prompts(n, seed):
    """`n` distinct-as-possible prompts cycling count, pair, relation; within a kind its specs
    in a `seed`-shuffled order (64 prompts: 22 count, 21 pair, 21 relation)."""
    rng = np.random.default_rng([seed, 1])
    orders = {kind: [all_specs(kind)[i] for i in rng.permutation(len(all_specs(kind)))] for kind in KINDS}
    return [prompt_for(orders[KINDS[i % 3]][(i // 3) % len(orders[KINDS[i % 3]])]) for i in range(n)]


def write_quickstart_prompts(directory, repeats=8):
    """`train.txt`: the QUICKSTART_PROMPTS; `test.txt`: them `repeats` times (each repeat is
    evaluated from other start noise). Returns `directory`."""
    os.makedirs(directory, exist_ok=True)
    for name, prompts in (("train.txt", QUICKSTART_PROMPTS), ("test.txt", QUICKSTART_PROMPTS * repeats)):
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            f.write("\n".join(prompts) + "\n")
    return directory


def write_prompt_files(directory, n_train=1000, n_test=64, seed=0):
    """Write `train.txt` (n_train random prompts, kinds equally likely) and `test.txt`
    (n_test balanced prompts) in the `general_ocr` format. Returns `directory`."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng([seed, 0])
    train = [prompt_for(sample_spec(rng)) for _ in range(n_train)]
    for name, prompts in (("train.txt", train), ("test.txt", balanced_prompts(n_test, seed))):
        path = os.path.join(directory, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write("\n".join(prompts) + "\n")
        os.replace(path + ".tmp", path)
    return directory
