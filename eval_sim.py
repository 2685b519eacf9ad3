"""How users find out whether a checkpoint is any good (method.md §8).

Three evaluations, one CLI:
  - closed loop in the built-in tabletop world (sim.py): fixed recorded seeds, the task's step limit,
    success per task with a 95 % Wilson interval, GIFs of the first episodes;
    `python eval_sim.py --ckpt DIR --sim tabletop --task all --setting clean --episodes 20`
  - closed loop in LIBERO (libero_env.py, optional install): the standard protocol;
    `python eval_sim.py --ckpt DIR --sim libero --suite libero_spatial --episodes 50`
  - 3D grounding on a held-out split: decoded pose tuples vs annotations (metrics.py), overlays;
    `python eval_sim.py --grounding --ckpt DIR --data data/sim_grounding_val`
RoboTwin 2.0 runs the policy from its own evaluator through robotwin_policy/deploy_policy.py.

Every run writes `results.json` recording the full protocol (checkpoint path and config hash,
seeds (the policy's noise restarts per episode), settings, step limits, executed steps per chunk,
the priors fed (by default those the checkpoint's priors.json says training saw), git commit of
this code) and rewrites it after every episode, so a run stopped by Ctrl-C or an error still
leaves the finished episodes.
A tabletop run also records whether the policy looks at its cameras (`image_sensitivity`): how far
the planned chunk moves when the views are another episode's, next to another instruction's.
"""
import argparse
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import ee16
from draw import draw_points, overlay, save_gif, world_to_pixels
from errors import at_least, cli
from metrics import CENTRE_HIT, centre_errors, centre_summary, evaluate, grounding_pairs, landing_summary, landings

EVAL_SEED0 = 100_000  # demonstrations use env seeds 0, 1, 2, ... (sim_export.write_demos): never overlap
ROOT = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- protocol record
def wilson(k, n, z=1.96):
    """95 % Wilson score interval of a success rate k/n (stays inside [0, 1], sane at k = 0 or n)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


def code_version():
    """Git commit of this code, with '+dirty' when tracked or new files differ from it."""
    try:
        run = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True,
                                        timeout=10).stdout.strip()
        commit = run("rev-parse", "HEAD")
        return (commit or "unknown") + ("+dirty" if run("status", "--porcelain") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def checkpoint_record(ckpt):
    """Path and a hash of the files that define what the checkpoint computes (weights by size)."""
    h = hashlib.sha1()
    for name in ("config.json", "recipe.json", "stats.json", "bins.json", "priors.json"):
        path = os.path.join(ckpt, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(name.encode() + f.read())
    weights = os.path.join(ckpt, "model.safetensors")
    return {"path": os.path.abspath(ckpt), "config_hash": h.hexdigest()[:16],
            "weights_bytes": os.path.getsize(weights) if os.path.isfile(weights) else None}


class Results:
    """Episode records plus the protocol; `save()` rewrites the JSON atomically after each episode."""

    def __init__(self, path, protocol):
        self.path, self.protocol, self.episodes, self.extra = path, protocol, [], {}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def add(self, **episode):
        self.episodes.append(episode)
        self.save(complete=False)

    def summary(self):
        out = {}
        closed_loop = [e for e in self.episodes if "success" in e]
        for group in dict.fromkeys(e["task"] for e in closed_loop):
            ok = [e["success"] for e in closed_loop if e["task"] == group]
            out[group] = {"episodes": len(ok), "successes": int(sum(ok)), "success_rate": float(np.mean(ok)),
                          "ci95": wilson(int(sum(ok)), len(ok))}
            graded = [e for e in closed_loop if e["task"] == group and "min_reach_cm" in e]
            if graded:  # tabletop: how close failures came (gripper to target) and how often it was touched
                out[group].update(min_reach_cm=float(np.mean([e["min_reach_cm"] for e in graded])),
                                  start_cm=float(np.mean([e["start_cm"] for e in graded])),
                                  touched_rate=float(np.mean([e["touched"] for e in graded])))
        return out

    def save(self, complete, stopped=None):
        per_task = self.summary()
        data = {"protocol": self.protocol, "complete": complete, "stopped": stopped, "per_task": per_task,
                "mean_success": float(np.mean([v["success_rate"] for v in per_task.values()])) if per_task else None,
                **self.extra, "episodes": self.episodes}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, default=float)
        os.replace(tmp, self.path)

    def report(self):
        for task, s in self.summary().items():
            lo, hi = s["ci95"]
            graded = (f"  gripper-target {s['start_cm']:.1f} -> {s['min_reach_cm']:.1f} cm, touched "
                      f"{100 * s['touched_rate']:.0f} %") if "min_reach_cm" in s else ""
            print(f"{task:>28}: {s['successes']:3d}/{s['episodes']:<3d} = {100 * s['success_rate']:5.1f} %  "
                  f"(95 % CI {100 * lo:5.1f} - {100 * hi:5.1f}){graded}")
        per_task = self.summary()
        if per_task:
            print(f"{'mean':>28}: {100 * np.mean([v['success_rate'] for v in per_task.values()]):5.1f} %")


def run_protocol(results, episodes_fn):
    """Run `episodes_fn()` (which calls results.add per episode); always leaves a results file."""
    try:
        episodes_fn()
    except (KeyboardInterrupt, Exception) as e:
        results.save(complete=False, stopped=f"{type(e).__name__}: {e}")
        print(f"stopped after {len(results.episodes)} episode(s) ({type(e).__name__}); "
              f"partial results in {results.path}")
        raise
    results.save(complete=True)


# ----------------------------------------------------------------------------- drawing the plan
def plan_marks(policy, head, tokens):
    """What to draw on the head view for the current plan: the decoded waypoints when the pose-text
    head writes any (green), else the planned chunk's end-effector positions projected (left
    orange, right blue)."""
    wps = policy.predicted_waypoints(view=0, max_new_tokens=tokens)
    if wps:
        return [(uv, (40, 255, 40)) for _, uv, _ in wps]
    marks = []
    for arm, colour in zip(ee16.ARMS, ((255, 140, 0), (0, 160, 255))):
        uv, front = world_to_pixels(policy.last_plan[:, ee16.position(arm)], head["K"], head["cam2world"])
        marks += [(p, colour) for p, ok in zip(uv, front) if ok]
    return marks


# ----------------------------------------------------------------------------- tabletop
def tabletop_views(obs, cameras):
    """Recipe camera names ('head' or 'observation.images.head') -> the world's camera views."""
    views = []
    for cam in cameras:
        name = cam.split(".")[-1]
        if name not in obs["cameras"]:
            raise ValueError(f"observation has no camera {name!r} (checkpoint cameras {cameras}, "
                             f"world cameras {sorted(obs['cameras'])})")
        v = obs["cameras"][name]
        views.append({"rgb": v["rgb"], "K": v["K"], "depth": v["depth"]})
    return views


def tabletop_episode(env, policy, seed, max_steps, gif=None, tokens=0, probes=None):
    """One closed-loop episode; success is checked after every step. Returns the episode record.
    probes: a list that receives a copy of the first observation (views, state, instruction)."""
    obs, start = env.reset(seed), time.perf_counter()
    policy.reset(episode=seed)  # the episode's own noise: its result does not depend on the episodes before it
    if probes is not None:  # copied: the renderer may reuse its buffers
        views = [{k: None if v is None else np.array(v) for k, v in view.items()}
                 for view in tabletop_views(obs, policy.cameras)]
        probes.append((views, np.array(obs["state"]), env.instruction))
    success, marks, start_cm, touched = False, [], env.reach_cm(), False
    reach = start_cm
    for t in range(max_steps):
        replan = not policy.queue
        action = policy.act(tabletop_views(obs, policy.cameras), obs["state"], env.instruction)
        if gif is not None:
            head = obs["cameras"]["head"]
            marks = plan_marks(policy, head, tokens) if replan else marks
            gif.append(draw_points(head["rgb"], marks))
        obs = env.step(action)
        reach, touched = min(reach, env.reach_cm()), touched or env.touching_target()
        if env.success():
            success = True
            break
    if gif is not None:
        gif.append(draw_points(obs["cameras"]["head"]["rgb"], []))
    return {"seed": int(seed), "instruction": env.instruction, "success": success, "steps": t + 1,
            "seconds": time.perf_counter() - start, "start_cm": start_cm, "min_reach_cm": reach, "touched": touched}


def tabletop_tasks(args):
    import sim
    if args.task != "all" and args.task not in sim.TASKS:
        raise ValueError(f"unknown task {args.task!r}; expected 'all' or one of {sim.TASKS}")
    if args.setting not in sim.SETTINGS:
        raise ValueError(f"unknown setting {args.setting!r}; expected one of {sim.SETTINGS}")
    return sim.TASKS if args.task == "all" else (args.task,)


def check_tabletop_cameras(args, policy):
    import sim
    missing = [c.split(".")[-1] for c in policy.cameras if c.split(".")[-1] not in sim.CAMERAS]
    if missing:
        raise ValueError(f"{args.ckpt}/recipe.json: camera(s) {missing} do not exist "
                         f"in the tabletop world {sim.CAMERAS}")


def run_tabletop(args, policy, results):
    import sim
    from expert import max_steps
    tasks = tabletop_tasks(args)
    limits = {t: args.max_steps or max_steps(t) for t in tasks}
    results.protocol.update(tasks=list(tasks), setting=args.setting, step_limits=limits, render_size=args.render_size,
                            seeds=[EVAL_SEED0 + i for i in range(args.episodes)])

    def episodes():
        probes = []
        for task in tasks:
            env = sim.TabletopEnv(task, args.setting, EVAL_SEED0, args.render_size,
                                  cameras=tuple(dict.fromkeys(["head"] + [c.split(".")[-1] for c in policy.cameras])))
            for i in range(args.episodes):
                gif = [] if i < args.gifs else None
                ep = tabletop_episode(env, policy, EVAL_SEED0 + i, limits[task], gif, args.waypoint_tokens,
                                      probes if i < args.swap_probes else None)
                if gif:
                    save_gif(gif, os.path.join(args.out, f"{task}_{args.setting}_{ep['seed']}.gif"), sim.CONTROL_HZ)
                results.extra["latency"] = policy.latency()
                results.add(task=task, **ep)
                print(f"{task} seed {ep['seed']}: {'success' if ep['success'] else 'failure'} in {ep['steps']} steps")
            env.close()
        if len(probes) >= 2:
            results.extra["image_sensitivity"] = swap_sensitivity(policy, probes, args.seed)
    run_protocol(results, episodes)


def swap_sensitivity(policy, probes, seed=0):
    """Does the policy look at its cameras? probes: first observations (views, state, instruction)
    of >= 2 episodes; observation i is planned as is, with the views of observation i+1 (cyclic;
    same state and prompt), and with its instruction when that differs (same views and state), all
    with one fixed noise per observation. Returns the mean end-effector displacement of the planned
    chunk (raw actions, cm, averaged over the chunk's steps and both arms) for each swap."""
    import torch
    generator = torch.Generator().manual_seed(seed)  # not the policy's: the episodes' noise is untouched
    images, prompts = [], []
    for i, (views, state, prompt) in enumerate(probes):
        other_views, _, other_prompt = probes[(i + 1) % len(probes)]
        noise = policy.noise(generator)
        base = policy.chunk(policy.preprocess(views, state, prompt), noise)
        images.append(ee_move_cm(policy, base, policy.chunk(policy.preprocess(other_views, state, prompt), noise)))
        if other_prompt != prompt:
            prompts.append(ee_move_cm(policy, base, policy.chunk(policy.preprocess(views, state, other_prompt), noise)))
    return {"observations": len(probes), "image_swap_cm": float(np.mean(images)),
            "prompt_swap_cm": float(np.mean(prompts)) if prompts else None, "prompt_pairs": len(prompts),
            "how": "first observation of episodes; views (or instruction) of the next probed episode; "
                   "mean end-effector displacement of the planned chunk, cm, same noise"}


def ee_move_cm(policy, a, b):
    """Mean end-effector distance (cm) between two (H, Da) raw chunks, over steps and arms."""
    from policy import POSITION_SLICES
    arms = POSITION_SLICES[policy.recipe["robot"]]
    return 100 * float(np.mean([np.linalg.norm(a[:, s] - b[:, s], axis=-1).mean() for s in arms]))


# ----------------------------------------------------------------------------- grounding
def generate_scored(model, text_tok, pose_tok, items, n_views, max_new_tokens, device="cpu"):
    """Greedy decoding of sample items (data.tensors arrays + prompt) -> per item (Decoded, per-view
    scores, generated ids): collated, generated with scores, each row through scored_decode."""
    import torch
    from data import Collator
    from batches import to_device
    batch = to_device(Collator(text_tok, max_dim=model.cfg.max_dim)(items), device)
    with torch.no_grad():
        ids, logps = model.generate(batch, max_new_tokens=max_new_tokens, return_scores=True)
    return [(*scored_decode(text_tok, pose_tok, row, row_lp, n_views), row)
            for row, row_lp in zip(ids.tolist(), logps.tolist())]


def scored_decode(text_tok, pose_tok, ids, logps, n_views):
    """Generated ids -> (Decoded, per-view lists of scores): each tuple scored by the mean
    log-probability of its tokens, so AP can rank detections by the model's confidence. A tuple is
    the tokens between separators (`;`, view markers, eos), each parsed on its own."""
    from tokenizer import Decoded
    out = Decoded(views=[[] for _ in range(n_views)], negative=[False] * n_views)
    scores = [[] for _ in range(n_views)]
    view, frag, frag_lp = None, [], []

    def close():
        if frag and view is not None and 0 <= view < n_views:
            text = text_tok.decode(frag, skip_special_tokens=True)
            d = pose_tok.decode(f"<image{view}>{text}</image{view}>", n_views=n_views)
            out.views[view] += d.views[view]
            scores[view] += [float(np.mean(frag_lp))] * len(d.views[view])
            out.negative[view] |= d.negative[view]
            out.n_rejected += d.n_rejected
        frag.clear(), frag_lp.clear()

    for i, lp in zip(ids, logps):
        i, piece = int(i), text_tok.convert_ids_to_tokens(int(i))
        marker = re.fullmatch(r"<(/?)image(\d+)>", piece or "")
        if marker or i == text_tok.eos_token_id:
            close()
            view = None if (marker is None or marker.group(1)) else int(marker.group(2))
            if i == text_tok.eos_token_id:
                break
            continue
        frag.append(i)
        frag_lp.append(float(lp))
        if ";" in text_tok.decode([i]):
            close()
    close()
    return out, scores


def run_grounding(args, protocol):
    """Decode every held-out sample (the model and data are read before anything is written to
    --out); returns the Results, the metrics in results.extra["grounding"]."""
    from data import GroundingDataset, tensors
    from formats import omni3d_files
    from model import load_checkpoint
    from tokenizer import PoseTokenizer
    model, tok, bins = load_checkpoint(args.ckpt)
    model.eval()
    size, n_views = model.cfg.image_size, model.cfg.n_views
    if os.path.isdir(args.data) and not any("val" in os.path.basename(p) for p in omni3d_files(args.data, "val")):
        print(f"warning: {args.data} has no JSON named *val*; evaluating on every JSON there: make sure it is held out")
    pose_tok = PoseTokenizer(bins, size)
    ds = GroundingDataset(args.data, pose_tok, size, n_views=n_views, neg_frac=0.0, split="val", seed=args.seed)
    n = min(len(ds), args.max_samples) if args.max_samples else len(ds)
    pairs, centres, landed = [], [], []
    results = Results(os.path.join(args.out, "results.json"), protocol)
    results.protocol.update(data=os.path.abspath(args.data), split="val", samples=n, views=n_views, image_size=size)
    for start in range(0, n, args.batch_size):
        idx = range(start, min(n, start + args.batch_size))
        built = [ds.build(i, every_object=True) for i in idx]  # every object: where do wrong anchors land?
        items = [{**tensors(views, size), "prompt": prompt, "target": ""} for views, prompt, _ in built]
        answers = generate_scored(model, tok, pose_tok, items, n_views, args.max_new_tokens)
        for i, (every, prompt, _), (decoded, scores, _) in zip(idx, built, answers):
            query = ds.samples[i][1]
            landed += landings(decoded, every, query, size)
            views = [replace(v, objects=[o for o in v.objects if o.name == query]) for v in every]
            pairs += grounding_pairs(decoded, views, scores)
            centres += centre_errors(decoded, views)
            if i < args.overlays:
                overlay(views, decoded, size).save(os.path.join(args.out, f"grounding_{i:04d}.png"))
            results.add(task="grounding", index=i, prompt=prompt, n_pred=sum(len(p) for p, _ in pairs[-n_views:]),
                        n_rejected=decoded.n_rejected)
    metrics = {**evaluate(pairs), **centre_summary(centres, size), **landing_summary(landed)}
    results.protocol["recall_2d"] = f"same-name anchor within {CENTRE_HIT:.0%} of the image size of the 2D box centre"
    results.protocol["landed"] = (f"written anchors of the queried name by the labelled object nearest them (within "
                                  f"{CENTRE_HIT:.0%} of the image size): the queried one, another one or none")
    results.extra["grounding"] = metrics
    results.save(complete=True)
    return results


def print_grounding(m):
    print(f"{m['n_images']} views, {m['n_gt']} objects, {m['n_pred']} predicted, {m['n_matched']} matched")
    print(f"AP (3D IoU 0.05..0.50) {100 * m['AP']:.1f}  AP@0.25 {100 * m['AP@0.25']:.1f}  "
          f"AP@0.5 {100 * m['AP@0.5']:.1f}")
    print(f"2D: centre error {m['centre_px']:.1f} px, recall {100 * m['recall_2d']:.1f} %; written anchors on the "
          f"queried object {100 * m['landed_queried']:.1f} %, on another object {100 * m['landed_other']:.1f} %, "
          f"on none {100 * m['landed_none']:.1f} %")
    print(f"rotation {m['rot_deg']:.1f} deg  translation {m['trans_cm']:.1f} cm  depth {m['depth_cm']:.1f} cm  "
          f"size {m['size_cm']:.1f} cm  5deg5cm {100 * m['5deg5cm']:.1f} %  10deg5cm {100 * m['10deg5cm']:.1f} %")


# ----------------------------------------------------------------------------- CLI
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True,
                   help="checkpoint directory (model.save_checkpoint + recipe.json, stats.json)")
    p.add_argument("--sim", default="tabletop", choices=("tabletop", "libero"), help="closed-loop simulator")
    p.add_argument("--task", default="all", help="'all' or one task name (tabletop: pick, place, push, handover; "
                   "LIBERO: a task name of the suite)")
    p.add_argument("--setting", default="clean", help="tabletop: clean (Easy) or randomized (Hard)")
    p.add_argument("--suite", default="libero_spatial",
                   help="LIBERO suite: libero_spatial|libero_object|libero_goal|libero_10")
    p.add_argument("--episodes", type=at_least(1), default=20,
                   help="episodes per task (LIBERO: initial states, at most 50)")
    p.add_argument("--exec-steps", type=at_least(1), default=None, help="control steps executed per chunk before "
                   "re-planning (default: half the chunk at control rate)")
    p.add_argument("--max-steps", type=at_least(1), default=None,
                   help="override the per-task step limit (recorded; smoke tests)")
    p.add_argument("--render-size", type=at_least(1), default=128,
                   help="tabletop camera resolution (the demos' default)")
    p.add_argument("--gifs", type=at_least(0), default=2, help="GIFs of the first N episodes per task (head view)")
    p.add_argument("--waypoint-tokens", type=at_least(0), default=160, help="max tokens when decoding waypoints for "
                   "GIFs (0: draw the planned chunk's end-effector positions instead)")
    p.add_argument("--swap-probes", type=at_least(0), default=4, help="tabletop: probe image sensitivity on the first "
                   "observation of the first N episodes per task (a few extra chunks; 0: off)")
    p.add_argument("--no-rays", action="store_true", help="do not feed ray maps (ablation; default: as the "
                   "checkpoint's priors.json records its training data, both for a checkpoint without one)")
    p.add_argument("--no-depth", action="store_true", help="do not feed depth (ablation; default: as trained)")
    p.add_argument("--rays", action="store_true", help="feed ray maps even if the training data had no intrinsics")
    p.add_argument("--depth", action="store_true", help="feed depth even if the training data had none")
    p.add_argument("--seed", type=int, default=0, help="policy noise seed (LIBERO uses its protocol seed 7)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--compile", action="store_true", help="sample through fast.FastSampler (bf16 weights on CUDA, "
                   "the Euler loop compiled; the first chunk pays the compile time)")
    p.add_argument("--out", default=None, help="output folder (default outputs/eval/<sim>_<time>)")
    p.add_argument("--grounding", action="store_true", help="3D grounding evaluation instead of closed loop")
    p.add_argument("--data", default=None, help="grounding: held-out Omni3D/BOP data (split 'val')")
    p.add_argument("--max-samples", type=at_least(0), default=0, help="grounding: evaluate at most N samples (0: all)")
    p.add_argument("--batch-size", type=at_least(1), default=4, help="grounding: samples per generate call")
    p.add_argument("--max-new-tokens", type=at_least(1), default=256, help="grounding: decoding budget per sample")
    p.add_argument("--overlays", type=at_least(0), default=8, help="grounding: overlay PNGs of the first N samples")
    return p.parse_args(argv)


def prior_flags(args):
    """Policy's use_rays / use_depth: None (as the checkpoint was trained) unless a flag says otherwise."""
    for name in ("rays", "depth"):
        if getattr(args, name) and getattr(args, f"no_{name}"):
            raise ValueError(f"--{name} and --no-{name} contradict each other; give at most one")
    return {"use_rays": False if args.no_rays else (True if args.rays else None),
            "use_depth": False if args.no_depth else (True if args.depth else None)}


def prior_record(policy, flags):
    """What results.json records about the priors: what was fed, what training saw, and why."""
    why = ("flags" if any(v is not None for v in flags.values()) else
           "priors.json" if policy.priors else "default: both (the checkpoint has no priors.json)")
    return {"rays": policy.use_rays, "depth": policy.use_depth, "priors_trained": policy.priors, "priors_from": why}


def main(argv=None):
    """Every input (flags, checkpoint, data) is checked and read before --out gets a file."""
    args = parse(argv)
    kind = "grounding" if args.grounding else args.sim
    if not os.path.isdir(args.ckpt):
        raise FileNotFoundError(f"{args.ckpt}: checkpoint directory not found")
    args.out = args.out or os.path.join("outputs", "eval", f"{kind}_{datetime.datetime.now():%Y%m%d_%H%M%S}")
    protocol = {"kind": kind, "checkpoint": checkpoint_record(args.ckpt), "code": code_version(),
                "command": " ".join(sys.argv), "started": datetime.datetime.now().isoformat(timespec="seconds")}
    if args.grounding:
        if not args.data:
            raise ValueError("--grounding needs --data PATH (held-out grounding scenes)")
        results = run_grounding(args, protocol)
        print_grounding(results.extra["grounding"])
        print(f"wrote {results.path}")
        return results
    from policy import Policy
    priors = prior_flags(args)
    if args.sim == "libero":
        import libero_env
        libero_env.check_suite(args.suite)
        libero_env.require_libero()  # fail before loading the model
        policy = Policy(args.ckpt, robots=("libero",), exec_steps=args.exec_steps, **priors, seed=libero_env.SEED,
                        device=args.device, compile=args.compile)
        protocol.update(exec_steps=policy.exec_steps, **prior_record(policy, priors), compile=args.compile)
        results = Results(os.path.join(args.out, "results.json"), protocol)
        libero_env.run_libero(args, policy, results, run_protocol)
    else:
        tabletop_tasks(args)
        policy = Policy(args.ckpt, robots=("tabletop",), exec_steps=args.exec_steps, **priors, seed=args.seed,
                        device=args.device, compile=args.compile)
        check_tabletop_cameras(args, policy)
        protocol.update(exec_steps=policy.exec_steps, chunk=policy.recipe["chunk"], stride=policy.recipe["stride"],
                        **prior_record(policy, priors), policy_seed=args.seed,
                        policy_noise="per episode, seeded by numpy SeedSequence([policy_seed, env seed])",
                        compile=args.compile)
        results = Results(os.path.join(args.out, "results.json"), protocol)
        run_tabletop(args, policy, results)
    results.report()
    sens = results.extra.get("image_sensitivity")
    if sens:
        other = "n/a (one instruction)" if sens["prompt_swap_cm"] is None else f"{sens['prompt_swap_cm']:.2f} cm"
        print(f"image sensitivity: another episode's views move the plan {sens['image_swap_cm']:.2f} cm, "
              f"another instruction {other} ({sens['observations']} observations)")
    lat = policy.latency()
    print(f"latency: {lat['ms_per_chunk']:.0f} ms per chunk, policy-limited control rate {lat['control_hz']:.1f} Hz "
          f"({lat['exec_steps']} steps per chunk); wrote {results.path}")
    return results


if __name__ == "__main__":
    cli(main)
