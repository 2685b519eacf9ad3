"""lookup_gate.py: the synthetic layouts, their ideal tokens and targets, and the identification measure.

Catches: shared-word layouts that lose the world's two language distractors (or 'disjoint' ones that
share a word), objects in one column (which would make identification ambiguous), tokens or targets
built for the wrong object, a measure that credits the wrong object, and --kv-heads not reaching the
decoder."""
import json

import numpy as np
import pytest
import torch

import lookup_gate as lg
import vlm
from tokenizer import ObjectPose


@pytest.fixture(scope="module")
def gate():
    args = lg.build_parser().parse_args([])
    model, tok = lg.build(args)
    return args, model, tok, lg.Layouts(args, model, tok)


def words(name):
    return set(name.split())


def test_shared_layouts_hold_both_language_distractors_and_disjoint_ones_none(gate):
    _, _, _, layouts = gate
    rng = np.random.default_rng(0)
    for _ in range(40):
        _, objects, query = layouts.sample(rng, "shared")
        others = [o.name for o in objects if o.name != query]
        assert [o.name for o in objects].count(query) == 1 and len(others) == 2
        shared = sorted(len(words(n) & words(query)) for n in others)
        assert shared == [1, 1] and words(others[0]) & words(query) != words(others[1]) & words(query)
        _, objects, query = layouts.sample(rng, "disjoint")
        names = [o.name for o in objects]
        assert all(not words(a) & words(b) for i, a in enumerate(names) for b in names[i + 1:]), names


def test_objects_start_in_distinct_columns_and_do_not_overlap(gate):
    _, _, _, layouts = gate
    rng = np.random.default_rng(1)
    for _ in range(40):
        _, objects, _ = layouts.sample(rng, "random")
        columns = [int(o.box2d[0] // lg.PATCH) for o in objects]
        assert len(set(columns)) == len(objects)
        cls, _ = vlm.patch_targets(objects, lg.SIZE, lg.PATCH)
        assert [int((cls == k + 1).sum()) for k in range(len(objects))] == [9] * len(objects)  # 3 x 3 each, whole
        _, objects, _ = layouts.sample(rng, "random", size=1)                  # the size curriculum's objects
        cls, _ = vlm.patch_targets(objects, lg.SIZE, lg.PATCH)
        assert [int((cls == k + 1).sum()) for k in range(len(objects))] == [1] * len(objects)


def test_tokens_and_target_belong_to_the_queried_object(gate):
    """The ideal tokens read back as their own objects' names and boxes (vlm.token_metrics), and the
    target's first <loc> is the queried object's x1."""
    _, model, tok, layouts = gate
    item, objects, query = layouts.sample(np.random.default_rng(2), "shared")
    cls, box = vlm.patch_targets(objects, lg.SIZE, lg.PATCH)
    bags = np.zeros((len(objects) + 1, len(layouts.words)), np.float32)
    for k, o in enumerate(objects):
        bags[k + 1, [layouts.words.index(w) for w in layouts.pieces(o.name)]] = 1.0
    w, b = torch.from_numpy(bags[cls])[None], torch.from_numpy(box)[None]
    name_acc, centre_err = vlm.token_metrics(model, torch.from_numpy(item["teacher_tokens"][:1]), w, b,
                                             torch.tensor(layouts.words))
    assert name_acc == 1.0 and centre_err < 0.04
    x1 = objects[[o.name for o in objects].index(query)].box2d[0]
    assert item["target"].startswith(f"<image0> {query}<loc{int(x1 / lg.SIZE * 1024):04d}>"), item["target"]
    assert item["prompt"] == f"detect the {query}"


def test_identified_credits_only_the_nearest_object():
    objects = [ObjectPose(n, (x, 0, x + 20, 20), np.zeros(3), np.ones(3), np.eye(3))
               for n, x in (("red cube", 10), ("green cube", 50), ("red ball", 90))]
    assert lg.identified(55.0, objects, "green cube") and lg.identified(31.0, objects, "green cube")
    assert not lg.identified(29.0, objects, "green cube") and not lg.identified(88.0, objects, "green cube")


def test_gate_runs_with_its_flags_and_records_them(tmp_path):
    out = tmp_path / "gate"
    curve = lg.main(["--steps", "2", "--eval-every", "1", "--eval-samples", "4", "--kv-heads", "4",
                     "--out", str(out)])
    result = json.loads((out / "results.json").read_text())
    assert [r["step"] for r in result["curve"]] == [0, 1, 2] == [r["step"] for r in curve]
    assert result["protocol"]["kv_heads"] == 4 and result["protocol"]["chance"] == pytest.approx(1 / 3)
    assert all(0 <= r["shared_identified"] <= 1 for r in curve)
    model, _ = lg.build(lg.build_parser().parse_args(["--kv-heads", "4"]))
    attn = model.lm.layers[0].self_attn
    assert attn.k_proj.out_features == 4 * attn.head_dim  # the decoder has the heads the flag asks for


def test_curriculum_vocabulary_restricts_every_name(gate):
    _, _, _, layouts = gate
    rng = np.random.default_rng(3)
    allowed = {f"{c} cube" for c in ("red", "green", "blue")}
    for _ in range(20):
        item, objects, query = layouts.sample(rng, "random", lg.parse_vocab("3x1"))
        assert {o.name for o in objects} <= allowed and item["prompt"] == f"detect the {query}"
    with pytest.raises(ValueError, match="CxG"):
        lg.parse_vocab("3-1")
