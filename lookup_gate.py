"""The name-lookup gate: can the tiny decoder learn to find the object its prompt names?

A diagnostic of the tiny VLM's decoder phase (vlm.py; RESULTS.md §2.9), with no images and no
tower. Each view's patch tokens are vlm.ideal_tokens of a synthetic layout: objects are squares of
whole patches on an 8 x 8 grid, each patch holding its object's name words and box code, the rest
<no_object>. The tiny config's Gemma decoder, with the name, <loc> and <no_object> rows held as in
the decoder phase, learns `detect the X` -> `<image0> X<loc x1><loc y1><loc x2><loc y2>;</image0>`
(the project's 2D box text, tokenizer.encode_boxes) by next-token prediction.

The measure is **identification**: on held-out layouts, the share of queries whose most likely
first <loc> (the box's x1, written at the position of the name's last word) is nearest the queried
object's x1 among the objects of view 0. Objects start in different grid columns, so chance is
1/objects. It is read on two held-out sets: `shared`, where one distractor shares the query's
colour and another its category (the built-in world's clean scenes, sim.sample_objects; pair
names only), and `random`, names drawn at random.

The flags change one factor at a time: one-word names or colour + category pairs, how many of each,
the word order, which distractors training shows (shared words, random, or sharing no word at all),
objects per view, their size, views, the decoder's key/value heads, and two curricula for the first
steps: other layouts with fewer names, and objects of another size.

  python lookup_gate.py --names single --colours 3       # the three squares of RESULTS.md §2.1
  python lookup_gate.py                                    # the built-in world's names and distractors
"""
import argparse
import json
import os
import time

import numpy as np
import torch

import vlm
from config import tiny_config
from data import Collator
from errors import at_least, cli
from model import build_model
from sim import CATALOGUE, COLOURS
from tokenizer import ObjectPose, PoseBins, PoseTokenizer, loc_tokens

SIZE, PATCH = 112, 14  # the tiny config's view and patch: an 8 x 8 grid
GRID = SIZE // PATCH


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--names", choices=("pairs", "single"), default="pairs",
                   help="pairs: '{colour} {category}' as in the built-in world; single: the colour word alone")
    p.add_argument("--order", choices=("colour-first", "category-first"), default="colour-first",
                   help="word order of a pair name: 'red cube' (English, the world's) or 'cube red'")
    p.add_argument("--colours", type=at_least(1), default=len(COLOURS), help="how many of the world's colours")
    p.add_argument("--categories", type=at_least(1), default=len(CATALOGUE),
                   help="how many of the world's categories")
    p.add_argument("--distractors", choices=("shared", "random", "disjoint"), default=None,
                   help="training layouts: shared = one distractor of the query's colour and one of its category "
                        "(the world's clean scenes; the default where names can share words); random = any other "
                        "names (the default otherwise); disjoint = names sharing no word with each other")
    p.add_argument("--curriculum", type=at_least(0), default=0,
                   help="train on the curriculum's layouts for this many steps first, then on --distractors")
    p.add_argument("--curriculum-vocab", default=None, metavar="CxG",
                   help="the curriculum's names: the first C colours x G categories (default: all of them)")
    p.add_argument("--curriculum-distractors", choices=("shared", "random", "disjoint"), default="disjoint",
                   help="the curriculum's distractors")
    p.add_argument("--objects", type=at_least(1), default=3, help="objects per view (each in its own grid column)")
    p.add_argument("--size", type=at_least(1), default=3, help="object side in patches (held-out layouts too)")
    p.add_argument("--start-size", type=at_least(1), default=None,
                   help="object side in training layouts for the first --start-size-steps steps (default: --size)")
    p.add_argument("--start-size-steps", type=at_least(0), default=0,
                   help="how many steps train on --start-size objects before --size ones")
    p.add_argument("--views", type=at_least(1), default=1, help="views per sample; view 0 holds the query")
    p.add_argument("--kv-heads", type=int, choices=(1, 2, 4), default=1,
                   help="the decoder's key/value heads (the tiny config and Gemma 2B: 1, multi-query)")
    p.add_argument("--steps", type=at_least(1), default=600)
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="the tiny VLM decoder phase's rate")
    p.add_argument("--eval-every", type=at_least(1), default=100)
    p.add_argument("--eval-samples", type=at_least(1), default=64, help="held-out layouts per set")
    p.add_argument("--seed", type=int, default=0, help="model init and training layouts")
    p.add_argument("--threads", type=at_least(1), default=1, help="torch CPU threads")
    p.add_argument("--out", default="runs/lookup_gate", help="results.json goes here")
    return p


# ----------------------------------------------------------------------------------------------
# Layouts

def class_names(args):
    colours, categories = list(COLOURS)[:args.colours], list(CATALOGUE)[:args.categories]
    if args.names == "single":
        return colours, colours, []
    pair = (lambda c, g: f"{g} {c}") if args.order == "category-first" else (lambda c, g: f"{c} {g}")
    return [pair(c, g) for c in colours for g in categories], colours, categories


def can_share(n_colours, n_categories, k):
    """Can a layout hold one distractor of the query's colour and one of its category?"""
    return n_colours >= 2 and n_categories >= 2 and k >= 3


def pick_names(rng, names, k, distractors, colours, categories):
    """The query first, then k - 1 other names: with `shared` the first two share its colour and its
    category (pairs only), with `disjoint` none shares a word with any name before it."""
    query = str(rng.choice(names))
    picked = [query]
    if distractors == "shared":
        if not can_share(len(colours), len(categories), k):
            raise ValueError("--distractors shared needs pair names of >= 2 colours and >= 2 categories, and "
                             ">= 3 objects")
        c, g = next((c, g) for c in colours for g in categories if set(query.split()) == {c, g})
        c2, g2 = rng.choice([x for x in colours if x != c]), rng.choice([x for x in categories if x != g])
        picked += [n for n in names if set(n.split()) in ({c2, g}, {c, g2})]
    pool = [n for n in names if n not in picked]
    if distractors == "disjoint":
        pool = [n for n in pool if not set(n.split()) & {w for p in picked for w in p.split()}]
        while len(picked) < k and pool:
            picked.append(str(rng.choice(pool)))
            pool = [n for n in pool if not set(n.split()) & set(picked[-1].split())]
    if len(picked) + len(pool) < k:
        raise ValueError(f"{k} objects need more names than --colours/--categories give for {distractors} "
                         "layouts (training, or the held-out sets)")
    return picked + [str(n) for n in rng.choice(pool, max(0, k - len(picked)), replace=False)]


def place(rng, names, size):
    """ObjectPoses on the grid: squares of size x size patches in distinct start columns, not
    overlapping, their box edges a few pixels inside the patches; listed near to far in name order."""
    for _ in range(100):
        taken, cols, objects = np.zeros((GRID, GRID), bool), set(), []
        for name in names:
            for _ in range(50):
                cx, cy = (int(v) for v in rng.integers(0, GRID - size + 1, 2))
                if cx not in cols and not taken[cy:cy + size, cx:cx + size].any():
                    break
            else:
                break
            cols.add(cx)
            taken[cy:cy + size, cx:cx + size] = True
            x1, y1 = cx * PATCH + rng.uniform(0, 3), cy * PATCH + rng.uniform(0, 3)
            x2, y2 = (cx + size) * PATCH - 1 - rng.uniform(0, 3), (cy + size) * PATCH - 1 - rng.uniform(0, 3)
            objects.append(ObjectPose(name, (x1, y1, x2, y2), np.array([0.0, 0.0, 1.0 + len(objects)]),
                                      np.full(3, 0.05), np.eye(3)))
        if len(objects) == len(names):
            return objects
    raise ValueError(f"cannot place {len(names)} objects of {size} x {size} patches in distinct columns of an "
                     f"{GRID} x {GRID} grid")


def pose_bins():
    """The pose vocabulary the model is built with; no pose token is ever written here (32 bins)."""
    rng = np.random.default_rng(0)
    return PoseBins.fit(rng.uniform(-0.5, 0.5, (100, 3)) + [0, 0, 1], rng.uniform(0.02, 0.3, (100, 3)), n_bins=32)


class Layouts:
    """Samples in the Collator's format, with the views' ideal tokens as `teacher_tokens`."""

    def __init__(self, args, model, tok):
        self.args, self.tok = args, tok
        self.names, self.colours, self.categories = class_names(args)
        self.pose_tok = PoseTokenizer(pose_bins(), SIZE)
        self.words = sorted({i for n in self.names for i in self.pieces(n)})
        self.word_index = {w: k for k, w in enumerate(self.words)}
        emb = model.vlm.get_input_embeddings().weight.detach()
        self.word_rows, self.background_row = emb[self.words].clone(), emb[tok.convert_tokens_to_ids("<no_object>")]

    def pieces(self, name):
        return self.tok(" " + name, add_special_tokens=False)["input_ids"]

    def sample(self, rng, distractors, vocab=None, size=None):
        """(item, view-0 objects, query name). vocab (C, G): names of the first C colours x G categories only;
        size: object side in patches (default --size)."""
        a = self.args
        colours, categories = (self.colours, self.categories) if vocab is None else \
            (self.colours[:vocab[0]], self.categories[:vocab[1]])
        names = [n for n in self.names if set(n.split()) <= set(colours) | set(categories)]
        names = pick_names(rng, names, a.objects, distractors, colours, categories)
        side = size or a.size
        views = [place(rng, names if v == 0 else list(rng.permutation(names)), side) for v in range(a.views)]
        words, boxes = vlm.word_bags(views, SIZE, PATCH, self.word_index, self.pieces)  # (V, P, nW), (V, P, 4)
        tokens = vlm.ideal_tokens(self.word_rows, self.background_row, words, boxes)       # (V, P, W)
        V, query = a.views, names[0]
        item = {"images": np.zeros((V, 3, SIZE, SIZE), np.float32), "view_mask": np.ones(V, bool),
                "rays": np.zeros((V, 3, SIZE, SIZE), np.float32), "has_rays": np.zeros(V, bool),
                "depth": np.zeros((V, 2, SIZE, SIZE), np.float32), "has_depth": np.zeros(V, bool),
                "prompt": f"detect the {query}", "teacher_tokens": tokens.numpy(),
                "target": self.pose_tok.encode_boxes([[o for o in objs if o.name == query] for objs in views])}
        return item, views[0], query


def collate(collator, samples):
    batch = collator([s[0] for s in samples])
    batch.pop("skipped")
    batch["use_teacher"] = torch.ones(len(samples), dtype=torch.bool)  # every sample reads its ideal tokens
    return batch


# ----------------------------------------------------------------------------------------------
# The measure

def identified(x, objects, query):
    """Is pixel column x nearest the queried object's x1 among `objects`?"""
    x1 = np.array([o.box2d[0] for o in objects])
    return int(np.abs(x1 - x).argmin()) == [o.name for o in objects].index(query)


@torch.no_grad()
def identification(model, collator, samples, loc_ids):
    """(share identified, median |x - x1| in px) of the teacher-forced most likely first <loc>."""
    is_loc = set(loc_ids)
    model.eval()
    hits, errors = [], []
    for i in range(0, len(samples), 16):
        chunk = samples[i:i + 16]
        batch = collate(collator, chunk)
        h, _, p_valid = model.joint_forward(batch)
        logits = model.label_logits(h, p_valid)                                 # (B, Tl, V)
        for j, (_, objects, query) in enumerate(chunk):
            k = next(t for t, label in enumerate(batch["label_ids"][j].tolist()) if label in is_loc)  # first <loc>
            x = (int(logits[j, k, loc_ids].argmax()) + 0.5) * SIZE / len(loc_ids)
            hits.append(identified(x, objects, query))
            errors.append(abs(x - objects[[o.name for o in objects].index(query)].box2d[0]))
    model.train()
    return float(np.mean(hits)), float(np.median(errors))


# ----------------------------------------------------------------------------------------------

def parse_vocab(text):
    """'2x2' -> (2, 2)."""
    try:
        c, g = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--curriculum-vocab {text!r}: expected CxG, e.g. 2x2") from None
    return c, g


def build(args):
    """The tiny config's decoder with --kv-heads, <loc> rows coded and the looked-up rows held, only the
    decoder trainable (the tower is never run on anything that matters: every sample reads ideal tokens)."""
    torch.manual_seed(args.seed)
    shape = tiny_config().vlm
    shape["text_config"]["num_key_value_heads"] = args.kv_heads
    model, tok = build_model("tiny", pose_bins(), n_views=args.views, vlm=shape)
    vlm.init_loc_embeddings(model, tok)
    for p in model.parameters():
        p.requires_grad = False
    for p in model.lm.parameters():
        p.requires_grad = True
    return model, tok


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = build(args)
    layouts = Layouts(args, model, tok)
    vlm.hold_rows(model, vlm.held_rows(tok, layouts.words))
    collator, loc_ids = Collator(tok), tok.convert_tokens_to_ids(loc_tokens())
    held_rng = np.random.default_rng(12345)
    shareable = can_share(len(layouts.colours), len(layouts.categories), args.objects)
    args.distractors = args.distractors or ("shared" if shareable else "random")
    kinds = ["shared", "random"] if shareable else ["random"]
    held = {kind: [layouts.sample(held_rng, kind) for _ in range(args.eval_samples)] for kind in kinds}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    rng, start, curve = np.random.default_rng(args.seed), time.perf_counter(), []
    curriculum_vocab = parse_vocab(args.curriculum_vocab) if args.curriculum_vocab else None

    def measure(step, loss):
        row = {"step": step, "loss": loss}
        for name, samples in held.items():
            row[f"{name}_identified"], row[f"{name}_x1_error_px"] = identification(model, collator, samples, loc_ids)
        curve.append(row)
        print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
              + f" ({step / max(time.perf_counter() - start, 1e-9):.2f} steps/s)", flush=True)

    measure(0, None)
    for step in range(1, args.steps + 1):
        early = step <= args.curriculum
        kind, vocab = (args.curriculum_distractors, curriculum_vocab) if early else (args.distractors, None)
        size = args.start_size if step <= args.start_size_steps else None
        out = model(collate(collator, [layouts.sample(rng, kind, vocab, size) for _ in range(args.batch_size)]))
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.steps:
            measure(step, round(out["loss"].item(), 4))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"protocol": {**vars(args), "chance": 1 / args.objects, "names": layouts.names}, "curve": curve},
                  f, indent=1)
    return curve


if __name__ == "__main__":
    cli(main)
