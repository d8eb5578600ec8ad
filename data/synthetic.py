"""The synthetic world: seeded, rendered scenes of coloured shapes with captions, edits and questions.

It is cirlab's built-in default data (``make demo``, the quickstart, the tests): it writes the same
shard kinds as real data, so it exercises the real pipeline end to end. Some (colour, shape)
combinations are held out of every training sample and appear only in the test split's targets,
so the test measures composition rather than memory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw

from cirlab.data.evalset import Protocol, write_eval_set
from cirlab.data.shards import encode_image, write_shards

# ----------------------------------------------------------------------------- vocabulary
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 215),
    "yellow": (230, 200, 30), "purple": (135, 55, 185), "orange": (240, 135, 25),
}
SIZES: tuple[str, ...] = ("small", "large")
# 3x3 grid, row-major; the middle cell is "center", the others "<row> <column>".
POSITIONS: tuple[str, ...] = (
    "top left", "top middle", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom middle", "bottom right",
)
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
CHANGES: tuple[str, ...] = ("colour", "shape", "size", "position", "add", "remove")
# Changes that create a new (colour, shape) combination: the ones a held-out query can use.
CREATING_CHANGES: tuple[str, ...] = ("colour", "shape", "add")
MAX_OBJECTS = 3
# Default held-out combinations: distinct shapes and distinct colours, so every shape and every
# colour is still seen in training (with other partners).
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"), ("green", "diamond"), ("blue", "circle"), ("yellow", "square"),
)
ALL_COMBOS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)

# Universal POS tag of every word the world writes (captions, edit texts, questions, answers)
# plus the LinCIR prompt words. Chosen to match en_core_web_sm's majority tag in these sentences;
# only the keyword classes (NOUN, PROPN, ADJ, DET) matter to the LinCIR masker.
LEXICON: dict[str, str] = {
    "a": "DET", "the": "DET", "what": "DET",
    "and": "CCONJ",
    "at": "ADP", "to": "ADP", "into": "ADP", "of": "ADP",
    "make": "VERB", "turn": "VERB", "move": "VERB", "add": "VERB", "remove": "VERB",
    "is": "AUX", "are": "AUX",
    "small": "ADJ", "large": "ADJ", "many": "ADJ",
    **{c: "ADJ" for c in COLOURS},
    **{s: "NOUN" for s in SHAPES},
    "top": "ADJ", "middle": "ADJ", "bottom": "ADJ", "left": "ADJ", "right": "NOUN", "center": "NOUN",
    "colour": "NOUN", "shape": "NOUN", "size": "NOUN", "object": "NOUN", "objects": "NOUN",
    "photo": "NOUN",
    "where": "SCONJ", "how": "SCONJ", "there": "PRON", "that": "PRON",
    "one": "NUM", "two": "NUM", "three": "NUM",
    ",": "PUNCT", "?": "PUNCT",
}


class Obj(NamedTuple):
    """One object of a scene; field order makes a sorted tuple of objects canonical (cells differ)."""

    cell: int
    shape: str
    colour: str
    size: str


Scene = tuple[Obj, ...]


def canonical(objs: Sequence[Obj]) -> Scene:
    """The canonical form of a scene: objects sorted by cell (cells are distinct)."""
    return tuple(sorted(objs))


def _combo(o: Obj) -> tuple[str, str]:
    return (o.colour, o.shape)


def object_phrase(o: Obj) -> str:
    """'a large red circle at the top left'."""
    return f"a {o.size} {o.colour} {o.shape} at the {POSITIONS[o.cell]}"


def caption(scene: Sequence[Obj], rng: random.Random | None = None) -> str:
    """Describe every object; with rng the object order is shuffled (a scene has many captions)."""
    objs = list(scene)
    if rng is not None:
        rng.shuffle(objs)
    parts = [object_phrase(o) for o in objs]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


# Frames of the varied training captions (see ``training_caption``); "" is the bare list.
CAPTION_FRAMES: tuple[str, ...] = ("", "a photo of ", "there is ")


def _mention(o: Obj, rng: random.Random, det: str = "a", full: bool = False) -> str:
    """An object named with some of its attributes: the shape always, colour adjacent to it."""
    words = [det]
    if full or rng.random() < 0.5:
        words.append(o.size)
    if full or rng.random() < 0.7:
        words.append(o.colour)
    words.append(o.shape)
    if full or rng.random() < 0.5:
        words.append(f"at the {POSITIONS[o.cell]}")
    return " ".join(words)


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _fact(o: Obj, scene: Sequence[Obj], rng: random.Random) -> str:
    """One relative statement about an object, in the words edit texts use: 'the circle is green'."""
    name = referring(o, scene, rng)
    attrs = [o.size, f"at the {POSITIONS[o.cell]}"]
    if name == o.shape:
        attrs.append(o.colour)   # colour only after the bare shape: "the circle is green"
    attr = rng.choice(attrs)
    if rng.random() < 0.5:
        return f"the {name} is {attr}"
    return f"a photo of a {name} that is {attr}"


def training_caption(scene: Sequence[Obj], rng: random.Random) -> str:
    """A varied caption of ``scene`` for the training corpora (pairs/ and texts/).

    Real caption corpora are varied, so these are too: 40% describe every object fully (in any
    order, bare, "a photo of ..." or "there is ..."), 35% name only some objects with some of their
    attributes, 25% are relative statements in the words edit texts use ("the circle is green",
    "a photo of a red square that is large"). Every statement is true of the scene, and a colour
    is only ever said of its own object's shape, so held-out combinations never appear.
    """
    objs = list(scene)
    rng.shuffle(objs)
    r = rng.random()
    if r < 0.4:
        return rng.choice(CAPTION_FRAMES) + _join([_mention(o, rng, full=True) for o in objs])
    if r < 0.75:
        some = objs[: rng.randint(1, len(objs))]
        return rng.choice(CAPTION_FRAMES) + _join([_mention(o, rng) for o in some])
    some = objs[: rng.randint(1, min(2, len(objs)))]
    return " and ".join(_fact(o, scene, rng) for o in some)


def negative_caption(scene: Sequence[Obj], rng_state: Any, positive: str, rng: random.Random,
                     combos: Sequence[tuple[str, str]]) -> str | None:
    """A hard negative for CLIP pre-training (NegCLIP): ``positive``'s caption again, with one object's
    shape swapped; None when no swap changes the words.

    The caption is rebuilt from the same random state (``rng_state``, taken before ``positive`` was
    drawn), so the frame, order and attributes said are the same and only the shape words differ (a
    rebuild whose draws diverge is skipped):
    a colour alone tells the two captions apart no longer, the image feature must carry the shape.
    The new (colour, shape) is drawn from ``combos`` (the seen ones) and is not in the scene.
    """
    scene, allowed = list(scene), set(combos)
    present = {_combo(o) for o in scene}
    for i in rng.sample(range(len(scene)), len(scene)):
        o = scene[i]
        shapes = [s for s in SHAPES if s != o.shape and (o.colour, s) in allowed and (o.colour, s) not in present]
        if not shapes:
            continue
        swapped = scene[:i] + [o._replace(shape=rng.choice(shapes))] + scene[i + 1:]
        replay = random.Random()
        replay.setstate(rng_state)
        text = training_caption(swapped, replay)
        if _differs_in_shapes_only(positive, text):
            return text
    return None


def _differs_in_shapes_only(a: str, b: str) -> bool:
    """Same words but for shape words (a replay whose draws diverged, "the circle" -> "the red
    diamond", is no hard negative: more than the shape changed)."""
    x, y = a.split(), b.split()
    diff = [(u, v) for u, v in zip(x, y) if u != v]
    return len(x) == len(y) and bool(diff) and all(u in SHAPES and v in SHAPES for u, v in diff)


# Frames of the difference captions (see ``difference_caption``): "{ref}" describes another scene,
# "{edit}" the change that turns it into the pictured one.
DIFFERENCE_FRAMES: tuple[str, ...] = (
    "a photo of {ref} that {edit}", "a photo of {ref} , {edit}", "{ref} , but {edit}", "{ref} after the edit : {edit}",
)


def scene_description(scene: Sequence[Obj], rng: random.Random) -> str:
    """A frameless description: every object fully (60%) or some objects with some attributes."""
    objs = list(scene)
    rng.shuffle(objs)
    if rng.random() < 0.6:
        return _join([_mention(o, rng, full=True) for o in objs])
    return _join([_mention(o, rng) for o in objs[: rng.randint(1, len(objs))]])


def difference_caption(ref: Sequence[Obj], edit_text: str, rng: random.Random) -> str:
    """A caption of an edited scene told as its difference from another: 'a red circle , but make it ...'.

    Web captions describe pictures relative to others ("the same room, but painted blue"); a
    pre-training corpus with such captions is what lets a CLIP text tower compose a description
    with a change, the ability zero-shot composed retrieval (LinCIR, Pic2Word, SEARLE) relies on.
    """
    frame, description = difference_caption_parts(ref, rng)
    return frame.format(ref=description, edit=edit_text)


def difference_caption_parts(ref: Sequence[Obj], rng: random.Random) -> tuple[str, str]:
    """The frame ("... {ref} ... {edit}") and the reference's description of one difference caption.

    Kept apart so that pre-training can also give the reference as one dense token (CLIPTask's
    `dense_references`): the frame with `*` for {ref} is the caption a pseudo-word method reads.
    """
    frame = rng.choice(DIFFERENCE_FRAMES)  # drawn before the description: the world's draws stay as they were
    return frame, scene_description(ref, rng)


def referring(o: Obj, scene: Sequence[Obj], rng: random.Random) -> str:
    """An unambiguous name: the shape alone when it is unique in the scene (half the time), else colour+shape."""
    unique_shape = sum(x.shape == o.shape for x in scene) == 1
    if unique_shape and rng.random() < 0.5:
        return o.shape
    return f"{o.colour} {o.shape}"  # (colour, shape) is unique within a scene by construction


# ----------------------------------------------------------------------------- scenes and edits
def random_scene(rng: random.Random, combos: Sequence[tuple[str, str]]) -> Scene:
    """1-3 objects with distinct cells and distinct (colour, shape) combos drawn from ``combos``."""
    n = rng.choices((1, 2, 3), weights=(0.2, 0.4, 0.4))[0]
    cells = rng.sample(range(len(POSITIONS)), n)
    picked = rng.sample(list(combos), n)
    return canonical([Obj(cell, s, c, rng.choice(SIZES)) for cell, (c, s) in zip(cells, picked)])


def feasible_changes(scene: Scene, new_combos: Sequence[tuple[str, str]]) -> list[str]:
    """Change types that can apply to ``scene`` when new objects/attributes must come from ``new_combos``."""
    have = {_combo(o) for o in scene}
    out = []
    if any(c != o.colour and (c, o.shape) in new_combos and (c, o.shape) not in have
           for o in scene for c in COLOURS):
        out.append("colour")
    if any(s != o.shape and (o.colour, s) in new_combos and (o.colour, s) not in have
           for o in scene for s in SHAPES):
        out.append("shape")
    out.append("size")
    if len(scene) < len(POSITIONS):
        out.append("position")
    if len(scene) < MAX_OBJECTS and any(c not in have for c in new_combos):
        out.append("add")
    if len(scene) >= 2:
        out.append("remove")
    return out


def apply_change(scene: Scene, change: str, rng: random.Random,
                 new_combos: Sequence[tuple[str, str]]) -> tuple[Scene, str] | None:
    """Edit ``scene`` by one change of type ``change``; returns (target scene, modification text) or None.

    Colours, shapes and added objects are taken from ``new_combos`` so training edits never create
    a held-out combination and held-out test edits always do.
    """
    objs = list(scene)
    have = {_combo(o) for o in objs}
    free = [c for c in range(len(POSITIONS)) if c not in {o.cell for o in objs}]
    if change == "colour":
        cands = [(i, c) for i, o in enumerate(objs) for c in COLOURS
                 if c != o.colour and (c, o.shape) in new_combos and (c, o.shape) not in have]
        if not cands:
            return None
        i, c = rng.choice(cands)
        text = f"make the {referring(objs[i], objs, rng)} {c}"
        objs[i] = objs[i]._replace(colour=c)
    elif change == "shape":
        cands = [(i, s) for i, o in enumerate(objs) for s in SHAPES
                 if s != o.shape and (o.colour, s) in new_combos and (o.colour, s) not in have]
        if not cands:
            return None
        i, s = rng.choice(cands)
        text = f"turn the {referring(objs[i], objs, rng)} into a {s}"
        objs[i] = objs[i]._replace(shape=s)
    elif change == "size":
        i = rng.randrange(len(objs))
        new = "small" if objs[i].size == "large" else "large"
        text = f"make the {referring(objs[i], objs, rng)} {new}"
        objs[i] = objs[i]._replace(size=new)
    elif change == "position":
        if not free:
            return None
        i, cell = rng.randrange(len(objs)), rng.choice(free)
        text = f"move the {referring(objs[i], objs, rng)} to the {POSITIONS[cell]}"
        objs[i] = objs[i]._replace(cell=cell)
    elif change == "add":
        cands = [c for c in new_combos if c not in have]
        if len(objs) >= MAX_OBJECTS or not cands or not free:
            return None
        (c, s), cell, size = rng.choice(cands), rng.choice(free), rng.choice(SIZES)
        new_obj = Obj(cell, s, c, size)
        text = f"add {object_phrase(new_obj)}"
        objs.append(new_obj)
    elif change == "remove":
        if len(objs) < 2:
            return None
        i = rng.randrange(len(objs))
        text = f"remove the {referring(objs[i], objs, rng)}"
        del objs[i]
    else:
        raise ValueError(f"unknown change {change!r}; expected one of {', '.join(CHANGES)}")
    return canonical(objs), text


def random_edit(scene: Scene, rng: random.Random, new_combos: Sequence[tuple[str, str]],
                changes: Sequence[str] = CHANGES) -> tuple[str, Scene, str] | None:
    """A uniformly chosen feasible change among ``changes``: (change, target scene, text), or None."""
    options = [c for c in feasible_changes(scene, new_combos) if c in changes]
    if not options:
        return None
    change = rng.choice(options)
    result = apply_change(scene, change, rng, new_combos)
    assert result is not None, "feasible_changes and apply_change disagree"
    return (change, *result)


def questions(scene: Scene, rng: random.Random, k: int) -> list[tuple[str, str, str]]:
    """Up to ``k`` unambiguous (question type, instruction, answer) triples about ``scene``."""
    cands: list[tuple[str, str, str]] = [
        ("count", "how many objects are there?", NUMBER_WORDS[len(scene)])]
    shapes = [o.shape for o in scene]
    colours = [o.colour for o in scene]
    unique_shape = [o for o in scene if shapes.count(o.shape) == 1]
    unique_colour = [o for o in scene if colours.count(o.colour) == 1]
    if unique_shape:
        o = rng.choice(unique_shape)
        cands.append(("colour", f"what colour is the {o.shape}?", o.colour))
    if unique_colour:
        o = rng.choice(unique_colour)
        cands.append(("shape", f"what shape is the {o.colour} object?", o.shape))
    o = rng.choice(scene)
    cands.append(("position", f"where is the {referring(o, scene, rng)}?", POSITIONS[o.cell]))
    o = rng.choice(scene)
    cands.append(("size", f"what size is the {referring(o, scene, rng)}?", o.size))
    return rng.sample(cands, min(k, len(cands)))


NO_ANSWER = "none"  # the answer to a question about something the scene does not hold


def absent_question(scene: Scene, rng: random.Random) -> tuple[str, str, str] | None:
    """A question about a shape or colour the scene does not hold, answered ``NO_ANSWER``.

    ("what colour is the triangle?" of a scene without a triangle.) A conditional encoder asked
    only questions that apply never learns what to answer when one does not, yet in a conditional
    gallery most images lack the object a question names (docs/focallens-synthetic.md). Says one
    shape or one colour, never both: no (colour, shape) combination, held out or not, is said.
    """
    shapes = [sh for sh in SHAPES if sh not in {o.shape for o in scene}]
    colours = [c for c in COLOURS if c not in {o.colour for o in scene}]
    options = ([("colour", f"what colour is the {sh}?") for sh in shapes]
               + [("size", f"what size is the {sh}?") for sh in shapes]
               + [("shape", f"what shape is the {c} object?") for c in colours])
    if not options:
        return None
    kind = rng.choice(sorted({k for k, _ in options}))  # types first, as the conditional sets draw them
    qtype, q = rng.choice([o for o in options if o[0] == kind])
    return qtype, q, NO_ANSWER


# ----------------------------------------------------------------------------- rendering
_BACKGROUND = 232
_RADIUS = {"small": 0.19, "large": 0.32}   # fraction of a cell; extents stay inside the cell
_JITTER = 0.08                              # centre jitter, fraction of a cell (~2 px at 64)
_SUPERSAMPLE = 2                            # drawn at 2x then box-filtered: anti-aliased edges


def render(scene: Sequence[Obj], rng: np.random.Generator, image_size: int = 64) -> Image.Image:
    """One rendering: jittered position (a few px), size (+/-10%) and shade, plus light background noise."""
    big = image_size * _SUPERSAMPLE
    cell = big / 3
    bg = tuple(int(v) for v in np.clip(_BACKGROUND + rng.integers(-10, 11, 3), 0, 255))
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    for o in scene:
        row, col = divmod(o.cell, 3)
        cx = (col + 0.5 + rng.uniform(-_JITTER, _JITTER)) * cell
        cy = (row + 0.5 + rng.uniform(-_JITTER, _JITTER)) * cell
        r = _RADIUS[o.size] * cell * rng.uniform(0.9, 1.1)
        fill = tuple(int(v) for v in np.clip(np.array(COLOURS[o.colour]) + rng.integers(-18, 19, 3), 0, 255))
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            h = 0.89 * r  # same area as the circle
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif o.shape == "triangle":
            R = 1.25 * r  # circumradius; shifted down so its bounding box is centred
            dy = R / 4
            draw.polygon([(cx, cy - R + dy), (cx - 0.866 * R, cy + R / 2 + dy),
                          (cx + 0.866 * R, cy + R / 2 + dy)], fill=fill)
        elif o.shape == "diamond":
            d = 1.15 * r
            draw.polygon([(cx, cy - d), (cx + d, cy), (cx, cy + d), (cx - d, cy)], fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}; expected one of {', '.join(SHAPES)}")
    img = img.resize((image_size, image_size), Image.BOX)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 3.0, (image_size, image_size, 3))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------- the manifest
@dataclass
class WorldManifest:
    """What ``build_world`` wrote: folders, counts, held-out combinations and the parameters used."""

    root: Path
    seed: int
    image_size: int
    held_out: list[tuple[str, str]]
    counts: dict[str, int]
    params: dict[str, Any] = field(default_factory=dict)
    folders: dict[str, str] = field(default_factory=dict)
    seconds: float | None = None   # wall time of the build; not written (world.json is reproducible)

    def path(self, name: str) -> Path:
        """Absolute folder of one part, e.g. ``path("pairs")`` or ``path("eval/test")``."""
        if name not in self.folders:
            raise KeyError(f"synthetic world has no part {name!r}; parts: {', '.join(self.folders)}")
        return self.root / self.folders[name]

    def to_json(self) -> dict[str, Any]:
        return {"format": "cirlab-synthetic-world/1", "seed": self.seed, "image_size": self.image_size,
                "held_out": [list(c) for c in self.held_out], "counts": self.counts,
                "params": self.params, "folders": self.folders,
                "vocabulary": {"shapes": list(SHAPES), "colours": list(COLOURS), "sizes": list(SIZES),
                               "positions": list(POSITIONS), "changes": list(CHANGES)}}


MANIFEST_NAME = "world.json"
FOLDERS = {"pairs": "pairs", "pairs_val": "pairs_val", "objects": "objects", "images": "images", "texts": "texts",
           "triplets/train": "triplets/train", "instructions": "instructions", "eval/val": "eval/val",
           "eval/test": "eval/test"}


def load_world(path: str | os.PathLike) -> WorldManifest:
    """Open a folder written by ``build_world``; fails with the path and the fix if it is not one."""
    root = Path(path)
    mfile = root / MANIFEST_NAME
    if not mfile.is_file():
        raise FileNotFoundError(f"{root} holds no synthetic world ({MANIFEST_NAME} missing); "
                                "build one with `cirlab data synthetic --out DIR`")
    m = json.loads(mfile.read_text())
    return WorldManifest(root, m["seed"], m["image_size"], [tuple(c) for c in m["held_out"]],
                         m["counts"], m["params"], m["folders"])


# ----------------------------------------------------------------------------- the build
def _np_rng(seed: int, stream: int) -> np.random.Generator:
    # One independent stream per part, so changing one part's size leaves the others unchanged.
    return np.random.default_rng(np.random.SeedSequence([seed, stream]))


def _py_rng(seed: int, stream: int) -> random.Random:
    return random.Random(seed * 1_000_003 + stream)


def _jpeg(img: Image.Image) -> bytes:
    return encode_image(img, "jpeg")


def _validate(held_out: Sequence[tuple[str, str]], image_size: int, renders_per_scene: int,
              n_train_scenes: int, n_eval_queries: int) -> list[tuple[str, str]]:
    held = [tuple(c) for c in held_out]
    for c in held:
        if c not in ALL_COMBOS:
            raise ValueError(f"held-out combination {c!r} is not a (colour, shape) of the world; "
                             f"colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)}")
    seen = [c for c in ALL_COMBOS if c not in held]
    if len(seen) < MAX_OBJECTS + 1:
        raise ValueError(f"too many held-out combinations ({len(held)}): keep at least "
                         f"{MAX_OBJECTS + 1} of the {len(ALL_COMBOS)} for training")
    if image_size < 16:
        raise ValueError(f"image_size={image_size} is too small to draw shapes; use 16 or more (default 64)")
    if renders_per_scene < 1 or n_train_scenes < 1 or n_eval_queries < 1:
        raise ValueError("renders_per_scene, n_train_scenes and n_eval_queries must be >= 1")
    return held


def _prepare_out(out: Path) -> None:
    """Refuse a non-empty folder that is not a world; clear an old world's parts before rewriting."""
    if out.exists() and any(out.iterdir()):
        if not (out / MANIFEST_NAME).is_file():
            raise FileExistsError(f"{out} is not empty and holds no synthetic world; "
                                  "give an empty or new folder to --out")
        for rel in ("pairs", "pairs_val", "objects", "images", "texts", "triplets", "instructions", "eval",
                    MANIFEST_NAME):
            p = out / rel
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def object_caption(o: Obj) -> str:
    """The label caption of a one-object picture: 'a photo of a red circle' (colour and shape only)."""
    return f"a photo of a {o.colour} {o.shape}"


def _build_objects(out: Path, seed: int, image_size: int, seen: list[tuple[str, str]], n_objects: int,
                   shard_size: int) -> dict[str, int]:
    """objects/: one-object pictures captioned with their class, the labelled image set a CLIP warm-up
    starts from (as real towers start from ImageNet). A batch of scenes is told apart by colours and
    places alone, so contrastive pre-training on scenes never has to see shape; among pictures of one
    object, 'a red circle' and 'a red square' differ only by it. Seen combinations only."""
    rng, nrng = _py_rng(seed, 8), _np_rng(seed, 8)

    def objects() -> Iterator[dict[str, Any]]:
        for i in range(n_objects):
            colour, shape = seen[i % len(seen)]  # every class equally often
            o = Obj(rng.randrange(9), shape, colour, rng.choice(SIZES))
            yield {"id": f"obj-{i:06d}", "image": _jpeg(render((o,), nrng, image_size)), "text": object_caption(o),
                   "scene_caption": caption((o,)), "shape": shape, "colour": colour, "size": o.size}
    return {"objects": write_shards(objects(), out / "objects", "pair", shard_size).total}


def _build_train(out: Path, seed: int, image_size: int, seen: list[tuple[str, str]], n_scenes: int,
                 n_texts: int, instructions_per_scene: int, shard_size: int,
                 n_difference_pairs: int = 0, absent_question_fraction: float = 0.0,
                 text_difference_fraction: float = 0.0) -> dict[str, int]:
    rng, nrng = _py_rng(seed, 1), _np_rng(seed, 1)
    scenes = [random_scene(rng, seen) for _ in range(n_scenes)]
    ids = [f"train-s{i:06d}" for i in range(n_scenes)]
    first = [_jpeg(render(s, nrng, image_size)) for s in scenes]   # rendering r0 of every scene
    caps, negatives, neg_rng = [], [], _py_rng(seed, 7)
    for s in scenes:
        state = rng.getstate()  # the negative replays the caption's draws (another rng: same world)
        caps.append(training_caption(s, rng))
        neg = negative_caption(s, state, caps[-1], neg_rng, seen)
        negatives.append([] if neg is None else [neg])

    # scene_caption: the full caption of what the image shows (the text may say less, or a difference)
    pairs = ({"id": f"{sid}-r0", "image": img, "text": cap, "scene": sid, "scene_caption": caption(s),
              "negatives": neg} for sid, s, img, cap, neg in zip(ids, scenes, first, caps, negatives))
    drng, dnrng = _py_rng(seed, 6), _np_rng(seed, 6)

    def difference_pairs() -> Iterator[dict[str, Any]]:
        # Edits drawn from the seen combinations only: no held-out combination is ever pictured or said.
        for i in range(n_difference_pairs):
            ref = scenes[i % n_scenes]
            change, tgt, text = random_edit(ref, drng, seen)
            sid = f"train-d{i:06d}"
            frame, description = difference_caption_parts(ref, drng)
            # reference + dense_text: the same caption with the reference as one token (CLIPTask)
            yield {"id": f"{sid}-r0", "image": _jpeg(render(tgt, dnrng, image_size)),
                   "text": frame.format(ref=description, edit=text), "scene": sid, "scene_caption": caption(tgt),
                   "reference": description, "dense_text": frame.format(ref="*", edit=text)}

    def all_pairs() -> Iterator[dict[str, Any]]:
        yield from pairs
        yield from difference_pairs()
    counts = {"pairs": write_shards(all_pairs(), out / "pairs", "pair", shard_size).total}
    # Held-in validation pairs (new scenes, seen combinations) to watch CLIP pre-training.
    vrng, vnrng = _py_rng(seed, 5), _np_rng(seed, 5)

    def pairs_val() -> Iterator[dict[str, Any]]:
        for i in range(max(50, n_scenes // 10)):
            scene = random_scene(vrng, seen)
            yield {"id": f"pval-s{i:06d}-r0", "image": _jpeg(render(scene, vnrng, image_size)),
                   "text": caption(scene, vrng), "scene": f"pval-s{i:06d}"}
    counts["pairs_val"] = write_shards(pairs_val(), out / "pairs_val", "pair", shard_size).total
    images = ({"id": f"{sid}-r0", "image": img, "scene": sid} for sid, img in zip(ids, first))
    counts["images"] = write_shards(images, out / "images", "image", shard_size).total

    qrng, arng = _py_rng(seed, 2), _py_rng(seed, 9)

    def instructions() -> Iterator[dict[str, Any]]:
        for sid, scene, img in zip(ids, scenes, first):
            for j, (qtype, q, a) in enumerate(questions(scene, qrng, instructions_per_scene)):
                yield {"id": f"{sid}-r0-q{j}", "image": img, "instruction": q, "answer": a,
                       "image_id": f"{sid}-r0", "question_type": qtype, "scene": sid}
            # its own stream: the applicable questions above do not depend on the fraction
            if arng.random() < absent_question_fraction and (absent := absent_question(scene, arng)):
                qtype, q, a = absent
                yield {"id": f"{sid}-r0-n0", "image": img, "instruction": q, "answer": a,
                       "image_id": f"{sid}-r0", "question_type": qtype, "scene": sid}
    counts["instructions"] = write_shards(instructions(), out / "instructions", "instruction", shard_size).total

    xrng, trng = _py_rng(seed, 4), _py_rng(seed, 12)

    def texts() -> Iterator[dict[str, Any]]:
        # The training scenes first, then more scenes of the same distribution. A web text corpus
        # holds the language pairs/ does, difference captions included (LinCIR's phi learns where its
        # token sits from these texts alone); which texts are, and their edits, come from trng.
        for i in range(n_texts):
            scene = scenes[i] if i < n_scenes else random_scene(xrng, seen)
            edit = random_edit(scene, trng, seen) if trng.random() < text_difference_fraction else None
            text = difference_caption(scene, edit[2], trng) if edit else training_caption(scene, xrng)
            yield {"id": f"text-{i:07d}", "text": text}
    counts["texts"] = write_shards(texts(), out / "texts", "text", max(shard_size, 10_000)).total
    return counts


def _training_scenes(seed: int, seen: list[tuple[str, str]], n_scenes: int) -> tuple[list[Scene], list[str]]:
    """The training scenes and their ids: the first draws of stream 1 (every training part uses them)."""
    rng = _py_rng(seed, 1)
    return [random_scene(rng, seen) for _ in range(n_scenes)], [f"train-s{i:06d}" for i in range(n_scenes)]


def _build_triplets(out: Path, seed: int, image_size: int, seen: list[tuple[str, str]], n_scenes: int,
                    n_triplets: int, shard_size: int) -> dict[str, int]:
    scenes, ids = _training_scenes(seed, seen, n_scenes)
    counts: dict[str, int] = {}
    trng, tnrng = _py_rng(seed, 3), _np_rng(seed, 3)

    def triplets() -> Iterator[dict[str, Any]]:
        for i in range(n_triplets):
            k = i % n_scenes
            ref = scenes[k]
            edit = random_edit(ref, trng, seen)
            assert edit is not None  # size changes always apply
            change, tgt, text = edit
            # Fresh renderings: the reference differs from the pair image of the same scene.
            ref_img = _jpeg(render(ref, tnrng, image_size))
            tgt_img = _jpeg(render(tgt, tnrng, image_size))
            tid = f"train-t{i:06d}"
            yield {"id": f"train-triplet{i:06d}", "ref": ref_img, "tgt": tgt_img,
                   "ref_id": f"{ids[k]}-r{1 + i // n_scenes}", "tgt_id": f"{tid}-r0",
                   "texts": [text], "change": change, "ref_scene": ids[k], "tgt_scene": tid,
                   "text_format": "plain", "ref_caption": caption(ref), "tgt_caption": caption(tgt)}
    counts["triplets/train"] = write_shards(triplets(), out / "triplets" / "train", "triplet", shard_size).total

    return counts


def _build_eval(out: Path, split: str, stream: int, seed: int, image_size: int, n_queries: int,
                renders: int, seen: list[tuple[str, str]], held: list[tuple[str, str]],
                held_out_fraction: float, n_distractors: int, shard_size: int) -> dict[str, int]:
    rng, nrng = _py_rng(seed, stream), _np_rng(seed, stream)
    scene_ids: dict[Scene, str] = {}     # canonical scene -> id: equal scenes share renderings

    def sid_of(scene: Scene) -> str:
        if scene not in scene_ids:
            scene_ids[scene] = f"{split}-s{len(scene_ids):06d}"
        return scene_ids[scene]

    # The split's pool for new combinations in distractors and siblings: the test split also shows
    # held-out combinations in non-targets, so their mere presence does not give the target away.
    pool = seen + held if split == "test" else seen
    queries = []
    for i in range(n_queries):
        composition = "held_out" if (split == "test" and held and i < round(held_out_fraction * n_queries)) \
            else "seen"
        while True:
            ref = random_scene(rng, seen)
            if composition == "held_out":
                edit = random_edit(ref, rng, held, CREATING_CHANGES)
            else:
                edit = random_edit(ref, rng, seen)
            if edit is not None:
                break
        change, tgt, text = edit
        # A sibling: the same reference edited by the same kind of change to another result — a
        # hard negative that only the text can rule out.
        for _ in range(4):
            res = apply_change(ref, change, rng, pool)
            if res is not None and res[0] != tgt and res[0] != ref:
                sid_of(res[0])
                break
        queries.append((sid_of(ref), sid_of(tgt), text, change, composition, ref, tgt))
    for _ in range(n_distractors):
        sid_of(random_scene(rng, pool))

    gallery_bytes: dict[str, bytes] = {}
    gallery_scene: dict[str, str] = {}
    for scene, sid in scene_ids.items():
        for r in range(renders):
            gallery_bytes[f"{sid}-r{r}"] = _jpeg(render(scene, nrng, image_size))
            gallery_scene[f"{sid}-r{r}"] = sid
    order = list(gallery_bytes)
    rng.shuffle(order)   # no positional hint: a scene's renderings are not adjacent

    def gallery() -> Iterator[dict[str, Any]]:
        for gid in order:
            yield {"id": gid, "image": gallery_bytes[gid], "scene": gallery_scene[gid]}

    def query_samples() -> Iterator[dict[str, Any]]:
        for i, (rsid, tsid, text, change, composition, ref, tgt) in enumerate(queries):
            ref_id = f"{rsid}-r{rng.randrange(renders)}"
            gt = [f"{tsid}-r{r}" for r in range(renders)]
            yield {"id": f"{split}-q{i:06d}", "ref": gallery_bytes[ref_id], "ref_id": ref_id,
                   "texts": [text], "target_id": gt[0], "gt_ids": gt, "change": change,
                   "composition": composition, "ref_scene": rsid, "tgt_scene": tsid,
                   "text_format": "plain", "ref_caption": caption(ref), "tgt_caption": caption(tgt)}

    protocol = Protocol(name="synthetic", split=split, exclude_reference=True, recall_ks=[1, 5, 10],
                        map_ks=[5, 10], text_format="plain", breakdown=["change", "composition"])
    es = write_eval_set(out / "eval" / split, protocol, query_samples(), gallery(), maxcount=shard_size)
    return {f"eval/{split}/queries": es.queries.total, f"eval/{split}/gallery": es.gallery.total,
            f"eval/{split}/scenes": len(scene_ids)}


def build_world(out_dir: str | os.PathLike, seed: int = 0, image_size: int = 64, n_train_scenes: int = 4000,
                n_triplets: int | None = None, n_texts: int | None = None, n_eval_queries: int = 400,
                n_difference_pairs: int | None = None, n_objects: int | None = None,
                renders_per_scene: int = 3, n_distractor_scenes: int | None = None,
                held_out: Sequence[tuple[str, str]] = HELD_OUT, held_out_fraction: float = 0.5,
                instructions_per_scene: int = 2, absent_question_fraction: float = 0.5,
                text_difference_fraction: float = 0.5, shard_size: int = 1000,
                workers: int | None = None) -> WorldManifest:
    """Write the synthetic world into ``out_dir`` (pairs, images, texts, triplets, instructions, eval sets).

    Folders: pairs/ (one caption per training scene), pairs_val/ (held-in validation pairs, n/10,
    at least 50), objects/ (one-object pictures captioned with their class, n), images/, texts/,
    triplets/train/, instructions/, eval/val/, eval/test/, world.json.
    Defaults: 4000 training scenes, 2 triplets and 5 caption-only texts per training scene, 400 val
    and 400 test queries (half of the test queries target a held-out combination), 3 renderings per
    evaluation scene; instructions/ holds 2 questions per scene that apply to it and, for that fraction
    of the scenes (`absent_question_fraction`, 0.5), one about a shape or colour it lacks, answered
    "none" (`absent_question`). texts/ (LinCIR's text-only corpus) holds the language of pairs/: that
    fraction of its texts (`text_difference_fraction`, 0.5, pairs/'s share by default) are difference
    captions of an edit of their scene ("a photo of {scene} that {edit}"), the rest varied captions.
    Same arguments -> byte-identical shard contents.

    ``workers``: processes writing the parts side by side (each part draws from its own random
    streams, so the bytes do not depend on it); default 2 from 1000 training scenes on, else 1.
    """
    t0 = time.perf_counter()
    held = _validate(held_out, image_size, renders_per_scene, n_train_scenes, n_eval_queries)
    if not 0.0 <= held_out_fraction <= 1.0:
        raise ValueError(f"held_out_fraction={held_out_fraction} must lie in [0, 1]")
    if not 0.0 <= absent_question_fraction <= 1.0:
        raise ValueError(f"absent_question_fraction={absent_question_fraction} must lie in [0, 1]")
    if not 0.0 <= text_difference_fraction <= 1.0:
        raise ValueError(f"text_difference_fraction={text_difference_fraction} must lie in [0, 1]")
    seen = [c for c in ALL_COMBOS if c not in held]
    n_triplets = 2 * n_train_scenes if n_triplets is None else n_triplets
    n_texts = 5 * n_train_scenes if n_texts is None else n_texts
    n_difference_pairs = n_train_scenes if n_difference_pairs is None else n_difference_pairs
    n_objects = n_train_scenes if n_objects is None else n_objects
    n_distractors = n_eval_queries // 2 if n_distractor_scenes is None else n_distractor_scenes
    out = Path(out_dir)
    _prepare_out(out)

    # (function, arguments) of every part, the heaviest first; each writes its own folders
    parts = [(_build_triplets, (out, seed, image_size, seen, n_train_scenes, n_triplets, shard_size)),
             (_build_train, (out, seed, image_size, seen, n_train_scenes, n_texts, instructions_per_scene,
                             shard_size, n_difference_pairs, absent_question_fraction, text_difference_fraction))]
    parts += [(_build_eval, (out, split, stream, seed, image_size, n_eval_queries, renders_per_scene, seen, held,
                             held_out_fraction, n_distractors, shard_size)) for split, stream in (("val", 10), ("test", 11))]
    parts.append((_build_objects, (out, seed, image_size, seen, n_objects, shard_size)))
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if n_train_scenes >= 1000 else 1
    found: dict[str, int] = {}
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork: the parts need only this module's functions and their arguments (no re-import)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            for done in [pool.submit(fn, *args) for fn, args in parts]:
                found.update(done.result())
    else:
        for fn, args in parts:
            found.update(fn(*args))
    order = ["pairs", "pairs_val", "objects", "images", "instructions", "triplets/train", "texts"]  # world.json's order
    counts = {k: found[k] for k in order if k in found}
    counts.update({k: v for k, v in found.items() if k not in counts})
    params = {"n_train_scenes": n_train_scenes, "n_triplets": n_triplets, "n_texts": n_texts,
              "n_difference_pairs": n_difference_pairs, "n_objects": n_objects,
              "n_eval_queries": n_eval_queries, "renders_per_scene": renders_per_scene,
              "n_distractor_scenes": n_distractors, "held_out_fraction": held_out_fraction,
              "instructions_per_scene": instructions_per_scene,
              "absent_question_fraction": absent_question_fraction,
              "text_difference_fraction": text_difference_fraction, "shard_size": shard_size}
    manifest = WorldManifest(out, seed, image_size, held, counts, params, dict(FOLDERS))
    (out / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=1))
    manifest.seconds = time.perf_counter() - t0
    return manifest
