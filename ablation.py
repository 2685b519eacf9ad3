"""The paper's central claim in miniature (method.md §9 and §11): does pose pre-training make
few-demonstration post-training work?

Four arms share the tiny architecture, the tiny VLM they start from (vlm.py: PaliGemma's role,
built once on the experiment's grounding scenes), the post-training demonstrations, the
post-training steps and the evaluation seeds; only the starting point of post-training differs:

  none         no pose pre-training: post-training starts from the tiny VLM
  semantic     pre-training on the same scenes and robot demos with the same steps, but text targets
               without poses: names + 2D boxes (stage 1) and flow matching only (stage 2)
  pose         pose pre-training: stage 1 grounding tuples, stage 2 waypoint tuples + flow (x10)
  pose+priors  as pose, with the depth and ray priors (fusion.py); the other arms see RGB only

Every arm is post-trained on the same `demos` clean demonstrations per task with `seeds` training
seeds, then evaluated closed loop on `clean` and `randomized` scenes (fixed seeds 100000, ...).
The second view of the question post-trains arms none and pose on the budget's `curve` of demos
per task (default 5 / 20 / 50, besides the main table's 20).
Held-out grounding (eval_sim.py --grounding) is measured on the stage-1 checkpoints of arms 2-4.

    python ablation.py                  # default budget: about 1 h 50 min on a 2-core CPU
    python ablation.py --quick          # the whole pipeline at toy scale (minutes; CI runs it)
    python ablation.py --budget large --device cuda --out runs/ablation_gpu

Each step (data, pre-training stage, post-training run, evaluation) writes its own folder under
--out and is skipped when finished, so rerunning the same command resumes; a training run stopped
half-way continues from its last checkpoint. The end products, rewritten after every step:
results.json (protocol, every number, wall times), results.md (the tables) and demos_curve.png.
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

import eval_sim
import posttrain
import pretrain
import sim
import sim_export
from checkpoint import checkpoints
from errors import cli, read_json
from trainer import Dist, generate_once

ARMS = {  # name -> (pre-training text targets or None, depth/ray priors)
    "none": (None, False),
    "semantic": ("boxes", False),
    "pose": ("poses", False),
    "pose+priors": ("poses", True),
}
CURVE_ARMS = ("none", "pose")
SETTINGS = ("clean", "randomized")
POST_DEMO_SEED = 50_000  # post-training demos: env seeds 50000, ...; stage-2 demos 0, ...; evaluation 100000, ...


@dataclass
class Budget:
    grounding_scenes: int  # scenes of the built-in world (2 views each): the tiny VLM and every stage 1
    vlm_vision_steps: int  # the tiny VLM: its vision tower's own objective ...
    vlm_steps: int         # ... then 2D boxes with the tower frozen
    motion_demos: int      # stage-2 demos per task and setting (both settings: the world's variety)
    stage1_steps: int
    stage2_steps: int
    post_steps: int        # post-training steps, every arm and demo count
    batch_size: int
    demos: int             # post-training demos per task for the main table (clean setting)
    curve: tuple           # demos per task for the second view (arms none and pose)
    seeds: int             # post-training seeds per arm and demo count
    episodes: int          # evaluation episodes per task and setting
    grounding_samples: int  # held-out grounding samples (3 views each)
    workers: int = 1       # DataLoader workers per training run (0: load in the training process)
    eval_max_steps: int = 0  # closed-loop step limit override (0: each task's own limit)


BUDGETS = {
    # Every part of the pipeline once, at a size where nothing is learned: for CI and for a first look.
    "quick": Budget(grounding_scenes=8, vlm_vision_steps=4, vlm_steps=4, motion_demos=1, stage1_steps=4,
                    stage2_steps=4, post_steps=4,
                    batch_size=2, demos=2, curve=(1, 2), seeds=2, episodes=1, grounding_samples=2, workers=0,
                    eval_max_steps=8),
    # About 1 h 50 min on a 2-core CPU (106 min measured).
    "default": Budget(grounding_scenes=300, vlm_vision_steps=3000, vlm_steps=3000, motion_demos=6,
                      stage1_steps=400, stage2_steps=200, post_steps=250,
                      batch_size=8, demos=20, curve=(5, 20, 50), seeds=3, episodes=5, grounding_samples=16),
    # A GPU: longer pre-training and post-training, more evaluation episodes.
    "large": Budget(grounding_scenes=1000, vlm_vision_steps=3000, vlm_steps=6000, motion_demos=10,
                    stage1_steps=6000, stage2_steps=2000, post_steps=2000,
                    batch_size=32, demos=20, curve=(5, 10, 20, 50), seeds=3, episodes=20, grounding_samples=64),
}


# ----------------------------------------------------------------------------------------------
# Steps: each writes a folder; `done` tells whether it finished

class Ledger:
    """The run's record: wall time of every finished step (steps.json), kept across resumes."""

    def __init__(self, out, total, after=None):
        self.path, self.total, self.after, self.index = os.path.join(out, "steps.json"), total, after, 0
        self.steps = read_json(self.path, "the run's step wall times") if os.path.exists(self.path) else {}

    def run(self, name, done, work):
        """Run `work()` unless `done()`; record its wall time under `name`."""
        self.index += 1
        if done():
            return
        print(f"\n[{self.index}/{self.total}] {name}  ({datetime.datetime.now():%H:%M:%S})", flush=True)
        t0 = time.perf_counter()
        work()
        self.steps[name] = self.steps.get(name, 0.0) + time.perf_counter() - t0
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.steps, f, indent=1)
        os.replace(tmp, self.path)
        if self.after is not None:
            self.after()


def final_checkpoint(run_dir, steps):
    return os.path.join(run_dir, f"step_{steps:06d}")


def train_step(ledger, name, main, run_dir, steps, argv):
    """A pretrain/posttrain run: skipped when its last checkpoint exists, resumed when it has any."""
    def work():
        has_any = os.path.isdir(run_dir) and bool(checkpoints(run_dir))  # a staged step_*.tmp is none
        main(["--resume", run_dir] if has_any else argv + ["--out", run_dir])
    ledger.run(name, lambda: os.path.isdir(final_checkpoint(run_dir, steps)), work)
    return final_checkpoint(run_dir, steps)


def eval_step(ledger, name, out, argv):
    """An eval_sim run: skipped when its results.json says complete."""
    path = os.path.join(out, "results.json")

    def done():
        return os.path.exists(path) and read_json(path, "eval_sim results").get("complete", False)
    ledger.run(name, done, lambda: eval_sim.main(argv + ["--out", out]))
    return path


# ----------------------------------------------------------------------------------------------
# The experiment

def data_step(ledger, name, path, write):
    """A generated dataset folder: written once, aside and then renamed (trainer.generate_once)."""
    ledger.run(name, lambda: os.path.isdir(path), lambda: generate_once(path, write, Dist()))
    return path


def make_data(ledger, b, cache):
    """Grounding scenes (train/val), stage-2 demos (both settings) and post-training demos (clean)."""
    root = os.path.join(cache, "ablation")
    g = {split: data_step(ledger, f"data grounding {split}", os.path.join(root, f"grounding_{split}_{n}"),
                          lambda tmp, n=n, s=seed: sim_export.write_grounding(tmp, n, seed=s))
         for split, n, seed in (("train", b.grounding_scenes, 0), ("val", max(4, b.grounding_scenes // 20), 10_000))}
    motion, post = [], []
    n_post = max((b.demos,) + tuple(b.curve))
    for task in sim.TASKS:
        for setting in SETTINGS:
            motion.append(data_step(ledger, f"data motion {task} {setting}",
                                    os.path.join(root, f"motion_{task}_{setting}_{b.motion_demos}"),
                                    lambda tmp, t=task, s=setting: sim_export.write_demos(
                                        tmp, t, b.motion_demos, s, 0)))
        post.append(data_step(ledger, f"data post-training {task}", os.path.join(root, f"post_{task}_clean_{n_post}"),
                              lambda tmp, t=task: sim_export.write_demos(tmp, t, n_post, "clean", POST_DEMO_SEED)))
    return g, motion, post


def pretrain_vlm(ledger, b, out, g):
    """The tiny VLM every arm starts from (pretrain.py --stage vlm on the experiment's scenes)."""
    return train_step(ledger, "pretrain tiny VLM", pretrain.main, os.path.join(out, "pretrain", "vlm"), b.vlm_steps,
                      ["--stage", "vlm", "--data", g["train"], "--eval-data", g["val"], "--steps", str(b.vlm_steps),
                       "--vision-steps", str(b.vlm_vision_steps), "--save-every", str(max(1, b.vlm_steps // 4)),
                       "--batch-size", str(b.batch_size), "--eval-every", "0", "--show", "0", "--seed", "0",
                       "--workers", str(b.workers)])


def pretrain_arm(ledger, arm, b, out, data, vlm):
    """Stages 1 and 2 of one arm from the tiny VLM; returns (stage-1 checkpoint, stage-2 checkpoint)."""
    targets, priors = ARMS[arm]
    g, motion = data
    common = ["--batch-size", str(b.batch_size), "--eval-every", "0", "--targets", targets, "--seed", "0",
              "--workers", str(b.workers)]
    s1 = train_step(ledger, f"pretrain {arm} stage 1", pretrain.main, os.path.join(out, "pretrain", arm, "stage1"),
                    b.stage1_steps, ["--stage", "grounding", "--init", vlm, "--data", g["train"],
                                     "--eval-data", g["val"],
                                     "--steps", str(b.stage1_steps), "--save-every", str(max(1, b.stage1_steps // 4)),
                                     "--show", "0"] + ([] if priors else ["--no-priors"]) + common)
    s2 = train_step(ledger, f"pretrain {arm} stage 2", pretrain.main, os.path.join(out, "pretrain", arm, "stage2"),
                    b.stage2_steps, ["--stage", "motion", "--init", s1, "--data", ",".join(motion),
                                     "--steps", str(b.stage2_steps), "--save-every", str(max(1, b.stage2_steps // 2))]
                    + common)
    return s1, s2


def run_dir(out, arm, n, seed):
    return os.path.join(out, "posttrain", arm.replace("+", "_"), f"demos{n}", f"seed{seed}")


def eval_path(out, arm, n, seed, setting):
    return os.path.join(run_dir(out, arm, n, seed), f"eval_{setting}", "results.json")


def post_and_eval(ledger, arm, n, seed, init, b, out, post, args):
    """Post-train one (arm, demos, seed), then evaluate it closed loop on both settings."""
    tag = f"{arm}/demos{n}/seed{seed}"
    argv = ["--robot", "tabletop", "--data", ",".join(post), "--episodes", str(n), "--steps", str(b.post_steps),
            "--batch-size", str(b.batch_size), "--seed", str(seed), "--eval-every", "0",
            "--save-every", str(max(1, b.post_steps // 2)), "--workers", str(b.workers)]
    argv += ["--init", init] + ([] if ARMS[arm][1] else ["--no-priors"])
    ckpt = train_step(ledger, f"posttrain {tag}", posttrain.main, run_dir(out, arm, n, seed), b.post_steps, argv)
    gifs = "1" if seed == 0 and n == b.demos else "0"
    for setting in SETTINGS:
        eval_step(ledger, f"eval {tag} {setting}", os.path.dirname(eval_path(out, arm, n, seed, setting)),
                  ["--ckpt", ckpt, "--task", "all", "--setting", setting, "--episodes", str(b.episodes),
                   "--gifs", gifs, "--waypoint-tokens", "0", "--seed", str(seed), "--device", args.device]
                  + (["--max-steps", str(b.eval_max_steps)] if b.eval_max_steps else []))


def plan(b):
    """Every (arm, demos) pair to post-train: the main table, then the curve's extra points."""
    pairs = [(arm, b.demos) for arm in ARMS]
    pairs += [(arm, n) for arm in CURVE_ARMS for n in b.curve if n != b.demos]
    return pairs


def count_steps(b):
    data = 2 + len(sim.TASKS) * (len(SETTINGS) + 1)
    pre = 1 + 3 * (len(ARMS) - 1)  # the tiny VLM, then two stages + grounding evaluation per pre-trained arm
    return data + pre + len(plan(b)) * b.seeds * (1 + len(SETTINGS))


# ----------------------------------------------------------------------------------------------
# Numbers: success per arm (mean over seeds, pooled Wilson interval), grounding, wall time

def success(paths):
    """eval_sim results.json files (one per seed) -> success summary: per-seed mean over tasks,
    pooled per-task counts and a 95 % Wilson interval of all pooled episodes."""
    runs = [read_json(p, "eval_sim results") for p in paths if os.path.exists(p)]
    runs = [r for r in runs if r.get("complete")]
    if not runs:
        return None
    episodes = [e for r in runs for e in r["episodes"]]
    tasks = {t: [e["success"] for e in episodes if e["task"] == t] for t in dict.fromkeys(e["task"] for e in episodes)}
    k = sum(e["success"] for e in episodes)
    per_seed = [float(r["mean_success"]) for r in runs]
    return {"mean": float(np.mean(per_seed)), "std": float(np.std(per_seed)), "per_seed": per_seed,
            "seeds": len(runs), "ci95": eval_sim.wilson(k, len(episodes)), "episodes": len(episodes),
            "min_reach_cm": float(np.mean([e["min_reach_cm"] for e in episodes])),
            "start_cm": float(np.mean([e["start_cm"] for e in episodes])),
            "touched": float(np.mean([e["touched"] for e in episodes])),
            "tasks": {t: {"successes": int(sum(ok)), "episodes": len(ok), "rate": float(np.mean(ok))}
                      for t, ok in tasks.items()}}


def grounding_metrics(path):
    r = read_json(path, "eval_sim grounding results") if os.path.exists(path) else {}
    if not r.get("complete"):
        return None
    m = r["grounding"]
    return {k: m[k] for k in ("recall_2d", "centre_px", "AP", "AP@0.25", "trans_cm", "rot_deg", "n_pred", "n_gt")}


def pct(x):
    return "-" if x is None or not np.isfinite(x) else f"{100 * x:.1f}"


def num(x, fmt="{:.1f}"):
    return "-" if x is None or not np.isfinite(x) else fmt.format(x)


def minutes(seconds):
    return f"{seconds / 60:.1f} min"


def markdown(res):
    b, lines = res["protocol"]["budget"], []
    lines += [f"Budget `{res['protocol']['budget_name']}`: stage 1 {b['stage1_steps']} + stage 2 {b['stage2_steps']} "
              f"steps, post-training {b['post_steps']} steps, batch {b['batch_size']}, "
              f"{b['demos']} clean demos per task, "
              f"{b['seeds']} seeds, {b['episodes']} episodes per task and setting. Success: mean over seeds "
              f"(per-seed values in results.json) with the 95 % Wilson interval of the pooled episodes. Reach: the "
              f"closest the nearer gripper came to the target object (mean over episodes; cm); touched: episodes "
              f"in which a finger touched it. Grounding: held-out scenes, stage-1 checkpoint.", "",
              "| arm | clean success | randomized success | reach clean / rand (cm) | touched clean / rand | "
              "2D recall | centre err (px) | AP3D | trans err (cm) | pre-training | post-training (per run) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        row = res["main"].get(arm, {})
        cells = []
        for s in SETTINGS:
            r = row.get(s)
            cells.append("-" if r is None else f"{pct(r['mean'])} % [{pct(r['ci95'][0])}, {pct(r['ci95'][1])}]")
        graded = [row.get(s) or {} for s in SETTINGS]
        cells += [" / ".join(num(r.get("min_reach_cm")) for r in graded),
                  " / ".join(pct(r.get("touched")) + (" %" if r else "") for r in graded)]
        g = res["grounding"].get(arm) or {}
        w = res["wall_s"].get(arm, {})
        cells += [pct(g.get("recall_2d")), num(g.get("centre_px")), pct(g.get("AP")), num(g.get("trans_cm")),
                  minutes(w["pretrain"]) if w.get("pretrain") else "-",
                  minutes(w["posttrain"]) if w.get("posttrain") else "-"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Per task (pooled over seeds):", "",
              "| arm | " + " | ".join(f"{t} {s}" for s in SETTINGS for t in sim.TASKS) + " |",
              "|---|" + "---|" * (len(SETTINGS) * len(sim.TASKS))]
    for arm in ARMS:
        row = res["main"].get(arm, {})
        cells = [pct((row.get(s) or {}).get("tasks", {}).get(t, {}).get("rate")) for s in SETTINGS for t in sim.TASKS]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Success against demonstrations per task (mean over seeds, %; reach in brackets):", "",
              "| demos per task | " + " | ".join(f"{a} {s}" for a in CURVE_ARMS for s in SETTINGS) + " |",
              "|---|" + "---|" * (len(CURVE_ARMS) * len(SETTINGS))]
    for n in sorted({int(n) for a in CURVE_ARMS for n in res["curve"].get(a, {})}):
        cells = []
        for a in CURVE_ARMS:
            for s in SETTINGS:
                r = res["curve"].get(a, {}).get(str(n), {}).get(s) or {}
                cells.append(f"{pct(r.get('mean'))} ({num(r.get('min_reach_cm'))} cm)")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", f"Total wall time {minutes(res['total_wall_s'])} on {res['protocol']['hardware']}."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The plot (Pillow only: no plotting library in requirements.txt)

COLOURS = {("none", "clean"): (120, 120, 120), ("none", "randomized"): (190, 190, 190),
           ("pose", "clean"): (20, 90, 200), ("pose", "randomized"): (120, 170, 240)}


def plot_curve(curve, path, title):
    """Two panels against demos per task, one line per (arm, setting): success (%) with Wilson
    intervals, and reach (cm, lower is better), which still separates arms when success is rare."""
    xs = sorted({int(n) for a in curve.values() for n in a})
    if not xs:
        return
    reach = [r["min_reach_cm"] for a in curve.values() for n in a.values() for r in n.values() if r]
    top = max(reach, default=1.0) * 1.1
    panels = [panel(curve, xs, "success", "success (%)", 1.0, lambda v: f"{100 * v:.0f}"),
              panel(curve, xs, "min_reach_cm", "reach: closest gripper-target distance (cm)", top,
                    lambda v: f"{v:.0f}")]
    img = Image.new("RGB", (panels[0].width, 30 + sum(p.height for p in panels)), "white")
    ImageDraw.Draw(img).text((10, 8), title, fill="black")
    img.paste(panels[0], (0, 30))
    img.paste(panels[1], (0, 30 + panels[0].height))
    img.save(path)


def panel(curve, xs, key, label, y_max, tick):
    W, H, left, right, top, bottom = 640, 300, 60, 170, 24, 44
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    px = lambda i: left + (i + 0.5) * (W - left - right) / len(xs)  # noqa: E731 (evenly spaced demo counts)
    py = lambda v: top + (1 - v / y_max) * (H - top - bottom)  # noqa: E731
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for f in (0, 0.25, 0.5, 0.75, 1.0):
        d.line([left - 4, py(f * y_max), W - right, py(f * y_max)], fill=(225, 225, 225) if 0 < f < 1 else "black")
        d.text((left - 34, py(f * y_max) - 6), tick(f * y_max), fill="black")
    for i, n in enumerate(xs):
        d.text((px(i) - 6, H - bottom + 8), str(n), fill="black")
    d.text((left + (W - left - right) / 2 - 60, H - 20), "demonstrations per task", fill="black")
    d.text((left, 6), label, fill="black")
    for j, ((arm, setting), colour) in enumerate(COLOURS.items()):
        pts = []
        for i, n in enumerate(xs):
            r = curve.get(arm, {}).get(str(n), {}).get(setting)
            if r is None:
                continue
            x = px(i) + (j - 1.5) * 3
            if key == "success":
                d.line([x, py(r["ci95"][0]), x, py(r["ci95"][1])], fill=colour)
            pts.append((x, py(r["mean" if key == "success" else key])))
        if len(pts) > 1:
            d.line(pts, fill=colour, width=3)
        for x, y in pts:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        d.line([W - right + 12, top + 12 + 20 * j, W - right + 36, top + 12 + 20 * j], fill=colour, width=3)
        d.text((W - right + 42, top + 6 + 20 * j), f"{arm} {setting}", fill="black")
    return img

# ----------------------------------------------------------------------------------------------

def collect(b, out, protocol, steps, complete):
    """results.json's content, from whatever has finished so far."""
    def seeds(arm, n):
        return {s: success([eval_path(out, arm, n, k, s) for k in range(b.seeds)]) for s in SETTINGS}
    wall = {}
    for arm in ARMS:
        pre = sum(v for k, v in steps.items() if k.startswith(f"pretrain {arm} stage"))
        post = [v for k, v in steps.items() if k.startswith(f"posttrain {arm}/demos{b.demos}/")]
        wall[arm] = {"pretrain": pre, "posttrain": float(np.mean(post)) if post else 0.0}
    return {"protocol": protocol, "complete": complete,
            "main": {arm: seeds(arm, b.demos) for arm in ARMS},
            "curve": {arm: {str(n): seeds(arm, n) for n in sorted(set(b.curve) | {b.demos})} for arm in CURVE_ARMS},
            "grounding": {arm: grounding_metrics(os.path.join(out, "pretrain", arm, "grounding", "results.json"))
                          for arm in ARMS if ARMS[arm][0]},
            "wall_s": wall, "total_wall_s": float(sum(steps.values())), "steps_s": steps}


def write_results(b, out, protocol, ledger, complete=False):
    res = collect(b, out, protocol, ledger.steps, complete)
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1, default=float)
    os.replace(tmp, os.path.join(out, "results.json"))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(res))
    plot_curve(res["curve"], os.path.join(out, "demos_curve.png"),
               f"tabletop success vs demos ({protocol['budget_name']} budget, {b.seeds} seeds)")
    return res


def hardware(device):
    name = torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or platform.machine())
    return f"{name}, {os.cpu_count()} CPU cores, torch {torch.__version__}, device {device}"


def parse(argv=None):
    p = argparse.ArgumentParser(description="Pose pre-training vs none vs semantic pre-training, "
                                            "in the built-in world.")
    p.add_argument("--budget", default="default", choices=sorted(BUDGETS),
                   help="steps, demos, seeds, episodes (BUDGETS)")
    p.add_argument("--quick", action="store_true", help="shorthand for --budget quick (a few minutes; CI)")
    p.add_argument("--out", default=None, help="run folder (default runs/ablation_<budget>); rerun to resume")
    p.add_argument("--cache", default="data_cache", help="folder for the generated data (shared across runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="evaluation device")
    args = p.parse_args(argv)
    args.budget = "quick" if args.quick else args.budget
    args.out = args.out or os.path.join("runs", f"ablation_{args.budget}")
    return args


def main(argv=None):
    args = parse(argv)
    b = BUDGETS[args.budget]
    os.makedirs(args.out, exist_ok=True)
    proto_path = os.path.join(args.out, "protocol.json")
    budget = json.loads(json.dumps(asdict(b)))  # as protocol.json holds it (tuples become lists)
    protocol = {"budget_name": args.budget, "budget": budget, "arms": {
        "none": "post-training from the tiny VLM", "semantic": "stage 1 names + 2D boxes, stage 2 flow matching only",
        "pose": "stage 1 pose tuples, stage 2 waypoint tuples + flow (x10)",
        "pose+priors": "as pose, with depth and ray priors"},
        "seeds": "pre-training: seed 0, once per arm; post-training (and evaluation policy noise): seeds 0..seeds-1",
        "post_training_demos": f"clean, env seeds {POST_DEMO_SEED}+ (first N episodes)",
        "stage2_demos": "clean and randomized, env seeds 0+", "eval_seeds": f"{eval_sim.EVAL_SEED0}+",
        "grounding": "eval_sim --grounding on each arm's stage-1 checkpoint, held-out scenes",
        "code": eval_sim.code_version(), "hardware": hardware(args.device), "command": " ".join(sys.argv)}
    if os.path.exists(proto_path):
        saved = read_json(proto_path, "the run's protocol (budget, arms, seeds)")
        if saved["budget"] != protocol["budget"]:
            raise ValueError(f"{args.out} holds a run with budget {saved['budget_name']} {saved['budget']}; "
                             f"use another --out for budget {args.budget}")
        protocol["started"] = saved["started"]
    else:
        protocol["started"] = datetime.datetime.now().isoformat(timespec="seconds")
        with open(proto_path, "w") as f:
            json.dump(protocol, f, indent=1)
    ledger = Ledger(args.out, count_steps(b))
    ledger.after = lambda: write_results(b, args.out, protocol, ledger)
    g, motion, post = make_data(ledger, b, args.cache)
    init = {"none": pretrain_vlm(ledger, b, args.out, g)}
    for arm in ARMS:
        if ARMS[arm][0]:
            s1, init[arm] = pretrain_arm(ledger, arm, b, args.out, (g, motion), init["none"])
            eval_step(ledger, f"grounding {arm}", os.path.join(args.out, "pretrain", arm, "grounding"),
                      ["--grounding", "--ckpt", s1, "--data", g["val"], "--max-samples", str(b.grounding_samples),
                       "--overlays", "2", "--device", args.device])
    for seed in range(b.seeds):  # seed-major: every arm gets its first seed before any gets a second
        for arm, n in plan(b):
            post_and_eval(ledger, arm, n, seed, init[arm], b, args.out, post, args)
    res = write_results(b, args.out, protocol, ledger, complete=True)
    print("\n" + markdown(res) + f"\nwrote {args.out}/results.json, results.md, demos_curve.png")
    return res


if __name__ == "__main__":
    cli(main)
