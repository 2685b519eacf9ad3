"""Bad input through the real command lines (issue: bad input never trains silently, never
crashes bare, never loses work).

CASES is a table of bad inputs, each run through a script's main() the way its command line runs
it (errors.cli): every case must exit non-zero (argparse: 2, errors.cli: 1) with a one-line message
that names the file or flag and what was expected, no traceback, and leave nothing in its output
folder (or, resuming, the run folder as it was). Then what has to keep working: a run never writes
a checkpoint with non-finite weights, a diverging run stops at its first non-finite step with its
last good checkpoint intact, --skip-bad trains past unreadable frames (and resumes a run a bad
frame stopped), and `data.py show` opens a LeRobot dataset without poses and with other camera
names. The readers and statistics on their own: test_bad_readers.py.

One tiny LeRobot dataset (test_robot_formats' writer) and one two-step post-training run on it
(module fixtures) serve every case; each broken input is a copy with one thing changed.
"""
import json
import os
import re
import shutil
import sys
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ablation  # noqa: E402
import bench  # noqa: E402
import data  # noqa: E402
import eval_sim  # noqa: E402
import posttrain  # noqa: E402
import pretrain  # noqa: E402
import sim_export  # noqa: E402
import checkpoint  # noqa: E402
import trainer  # noqa: E402
from errors import cli  # noqa: E402
from model import load_checkpoint  # noqa: E402
from test_formats import write_bop, write_omni3d  # noqa: E402
from test_robot_formats import write_lerobot  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--batch-size", "2", "--workers", "0", "--eval-every", "0", "--log-every", "1", "--warmup", "1"]
FRAMES = "data/chunk-000/file-000.parquet"  # write_lerobot v3.0: both episodes (12 + 5 frames) in one file


def bad_input_lerobot(root):
    """The dataset every case breaks a copy of: two episodes (12 + 5 frames) in one v3.0 file, with
    depth and camera poses."""
    return write_lerobot(str(root / "lerobot"), "v3.0", "image", lengths=(12, 5), extras=True)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    lerobot = bad_input_lerobot(root)
    run = str(root / "run")
    posttrain.main(["--robot", "tabletop", "--data", lerobot, "--out", run, "--steps", "2", "--save-every", "1", *FAST])
    return SimpleNamespace(lerobot=lerobot, run=run, ckpt=os.path.join(run, "step_000002"))


# ----------------------------------------------------------------------------- broken copies
def copy(src, tmp, name):
    dst = os.path.join(tmp, name)
    shutil.copytree(src, dst)
    return dst


def write(path, content):
    with open(path, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)


def truncate(path):
    write(path, open(path, "rb").read()[:100])


def edit_json(path, change):
    d = json.load(open(path))
    change(d)
    write(path, json.dumps(d))


def edit_column(root, key, change):
    """Rewrite column `key` of a v3.0 fixture's frames: change(rows) edits the python rows in place."""
    path = os.path.join(root, FRAMES)
    table = pq.read_table(path)
    rows = table.column(key).to_pylist()
    change(rows)
    pq.write_table(table.set_column(table.column_names.index(key), key, pa.array(rows, table.schema.field(key).type)),
                   path, row_group_size=4)


def ckpt_with(fx, tmp, name, change):
    ck = copy(fx.ckpt, tmp, "ckpt")
    change(os.path.join(ck, name))
    return ck


def run_with(fx, tmp, name, change):
    run = copy(fx.run, tmp, "run")
    change(os.path.join(run, "step_000002", name))
    return run


def lerobot_with(fx, tmp, key, change):
    root = copy(fx.lerobot, tmp, "lr")
    edit_column(root, key, change)
    return root


def nan_weight(path):
    state = load_file(path)
    state["state_proj.weight"][0, 0] = float("nan")
    save_file(state, path)


def set_row(row, dim, value):
    def change(rows):
        rows[row][dim] = value
    return change


def no_episodes(fx, tmp):
    root = copy(fx.lerobot, tmp, "lr")
    path = os.path.join(root, "meta", "episodes", "chunk-000", "file-000.parquet")
    pq.write_table(pq.read_table(path).slice(0, 0), path)
    return root


def bad_jsonl(tmp):
    root = write_lerobot(os.path.join(tmp, "v21"), "v2.1", "image", lengths=(3, 2))
    with open(os.path.join(root, "meta", "episodes.jsonl"), "a") as f:
        f.write('{"episode_index": 2, "tasks": [\n')
    return root


def far_omni3d(tmp):
    path = write_omni3d(os.path.join(tmp, "omni"))
    edit_json(path, lambda d: [a["center_cam"].__setitem__(2, 20.0) for a in d["annotations"]])
    return path


def bop_without_depth_scale(tmp):
    root, _ = write_bop(os.path.join(tmp, "bop"))
    edit_json(os.path.join(root, "train_pbr", "000000", "scene_camera.json"), lambda d: d["1"].pop("depth_scale"))
    return root


def corrupt_protocol(tmp):
    out = os.path.join(tmp, "abl")
    os.makedirs(out)
    write(os.path.join(out, "protocol.json"), '{"budget_name": "quick", "budget": ')
    return out


EVAL = ["--episodes", "1", "--max-steps", "1", "--gifs", "0"]
POST = ["--robot", "tabletop", "--steps", "2", *FAST]


# case name -> what the code did with that input before this test existed (`python tests/test_bad_input.py`)
BEFORE = {}


def case(name, main, argv, code, *text, before):
    """A bad-input case: main(argv(fx, tmp, out)) must exit with `code` and a message holding every `text`."""
    BEFORE[name] = before
    return pytest.param(main, argv, code, text, id=name)


CASES = [
    # numbers that cannot be right: argparse, before any work
    case("posttrain --steps -5", posttrain.main, lambda fx, t, out: ["--robot", "tabletop", "--data", fx.lerobot,
         "--out", out, *FAST, "--steps", "-5"], 2, "--steps", "must be >= 1",
         before="exit 0, 'done: None', empty train_log.jsonl"),
    case("posttrain --batch-size 0", posttrain.main, lambda fx, t, out: [*POST, "--data", fx.lerobot, "--out", out,
         "--batch-size", "0"], 2, "--batch-size", before="0 taken as the recipe default: trained at batch 8, exit 0"),
    case("posttrain --episodes 0", posttrain.main, lambda fx, t, out: [*POST, "--data", fx.lerobot, "--out", out,
         "--episodes", "0"], 2, "--episodes", before="ValueError traceback (open_source)"),
    case("posttrain --lr -1", posttrain.main, lambda fx, t, out: [*POST, "--data", fx.lerobot, "--out", out,
         "--lr", "-1"], 2, "--lr", "must be > 0", before="AdamW 'Invalid learning rate' traceback"),
    case("posttrain --workers -1", posttrain.main, lambda fx, t, out: [*POST, "--data", fx.lerobot, "--out", out,
         "--workers", "-1"], 2, "--workers", before="DataLoader ValueError traceback, after --out got an empty log"),
    case("pretrain --save-every 0", pretrain.main, lambda fx, t, out: ["--data", fx.lerobot, "--out", out,
         "--save-every", "0"], 2, "--save-every", before="ValueError traceback (check_start)"),
    case("pretrain --stride 0", pretrain.main, lambda fx, t, out: ["--stage", "motion", "--init", fx.ckpt, "--data",
         fx.lerobot, "--out", out, "--stride", "0"], 2, "--stride",
         before="trained on chunks of one repeated frame (still running after 90 s)"),
    case("eval_sim --episodes 0", eval_sim.main, lambda fx, t, out: ["--ckpt", fx.ckpt, "--out", out,
         "--episodes", "0"], 2, "--episodes",
         before="exit 0: empty results.json marked complete, latency nan"),
    case("eval_sim --episodes -3", eval_sim.main, lambda fx, t, out: ["--ckpt", fx.ckpt, "--out", out, "--episodes",
         "-3"], 2, "--episodes", before="exit 0: empty results.json marked complete, latency nan"),
    case("eval_sim --max-steps 0", eval_sim.main, lambda fx, t, out: ["--ckpt", fx.ckpt, "--out", out, *EVAL,
         "--max-steps", "0"], 2, "--max-steps", before="exit 0: 0 read as 'no override', the full step limit"),
    case("eval_sim --exec-steps 0", eval_sim.main, lambda fx, t, out: ["--ckpt", fx.ckpt, "--out", out, *EVAL,
         "--exec-steps", "0"], 2, "--exec-steps", before="one-line error, but an empty --out folder was left"),
    case("data.py show --index -1", data.main, lambda fx, t, out: ["show", "--data", fx.lerobot, "--out", out,
         "--index", "-1"], 2, "--index", before="numpy ValueError traceback ('expected non-negative integer')"),
    case("data.py bench --batch-size 0", data.main, lambda fx, t, out: ["bench", "--data", fx.lerobot,
         "--batch-size", "0"], 2, "--batch-size", before="DataLoader ValueError traceback"),
    case("sim.py demos --episodes 0", sim_export.main, lambda fx, t, out: ["demos", "--task", "pick", "--episodes",
         "0", "--out", out], 2, "--episodes", before="ValueError traceback"),
    case("bench.py --repeats 0", bench.main, lambda fx, t, out: ["--repeats", "0"], 2, "--repeats",
         before="StatisticsError traceback, after the first benchmark ran"),
    case("bench.py --batch-sizes 4,0", bench.main, lambda fx, t, out: ["--batch-sizes", "4,0"], 2, "--batch-sizes",
         before="a sweep that trains at batch 0"),
    # checkpoint, config, stats, recipe and train-state files: one line naming the file
    case("truncated model.safetensors", eval_sim.main, lambda fx, t, out: ["--ckpt", ckpt_with(
         fx, t, "model.safetensors", truncate), "--out", out, *EVAL], 1, "model.safetensors", "safetensors weights",
         before="SafetensorError traceback without the file name; empty --out left"),
    case("NaN in model.safetensors", eval_sim.main, lambda fx, t, out: ["--ckpt", ckpt_with(
         fx, t, "model.safetensors", nan_weight), "--out", out, *EVAL], 1, "model.safetensors", "NaN/inf",
         before="loaded; the first NaN action stopped the episode, partial results.json"),
    case("config.json not JSON", eval_sim.main, lambda fx, t, out: ["--ckpt", ckpt_with(
         fx, t, "config.json", truncate), "--out", out, *EVAL], 1, "config.json", "PoseVLAConfig", "JSONDecodeError",
         before="'error: Expecting value: line 5 column 27', no file name; empty --out"),
    case("config.json unknown key", eval_sim.main, lambda fx, t, out: ["--ckpt", ckpt_with(
         fx, t, "config.json", lambda p: edit_json(p, lambda d: d.update(colour=1))), "--out", out, *EVAL], 1,
         "config.json", "colour", before="TypeError traceback"),
    case("recipe.json not JSON", eval_sim.main, lambda fx, t, out: ["--ckpt", ckpt_with(
         fx, t, "recipe.json", truncate), "--out", out, *EVAL], 1, "recipe.json", "post-training recipe",
         before="'error: Unterminated string ...' without the file name; empty --out"),
    case("stats.json with NaN", eval_sim.main, lambda fx, t, out: ["--ckpt", ckpt_with(
         fx, t, "stats.json", lambda p: edit_json(p, lambda d: d["state"]["std"].__setitem__(3, float("nan")))),
         "--out", out, *EVAL], 1, "stats.json", "'state.std'", "finite",
         before="loaded; NaN actions stopped the episode, partial results.json"),
    case("bins.json truncated", eval_sim.main, lambda fx, t, out: ["--ckpt", ckpt_with(fx, t, "bins.json", truncate),
         "--out", out, *EVAL], 1, "bins.json", "pose bin edges", before="JSON error line without the file name"),
    case("tokenizer.json garbage", eval_sim.main, lambda fx, t, out: ["--ckpt", ckpt_with(
         fx, t, "tokenizer", lambda p: write(os.path.join(p, "tokenizer.json"), "{oops")), "--out", out, *EVAL], 1,
         "tokenizer", "text tokenizer", before="JSON error line without the file name"),
    case("--resume: truncated train_state.pt", posttrain.main, lambda fx, t, out: [
         "--resume", run_with(fx, t, "train_state.pt", truncate), "--steps", "3"], 1, "train_state.pt",
         "training state", before="torch zip-archive RuntimeError traceback without the file name"),
    case("--resume: train_args.json garbage", posttrain.main, lambda fx, t, out: [
         "--resume", run_with(fx, t, "train_args.json", lambda p: write(p, "[1, 2"))], 1, "train_args.json",
         before="JSONDecodeError traceback"),
    case("--resume: stats.json not a dict", posttrain.main, lambda fx, t, out: [
         "--resume", run_with(fx, t, "stats.json", lambda p: write(p, "[]"))], 1, "stats.json", "'state' and 'action'",
         before="ValueError traceback"),
    case("--init without model.safetensors", posttrain.main, lambda fx, t, out: [*POST, "--data", fx.lerobot, "--out",
         out, "--init", ckpt_with(fx, t, "model.safetensors", os.remove)], 1, "missing model.safetensors",
         before="the same message, as a FileNotFoundError traceback"),
    case("--out holds another run", posttrain.main, lambda fx, t, out: [*POST, "--data", fx.lerobot, "--out",
         copy(fx.run, t, "run")], 1, "already holds a run", "--resume",
         before="exit 0: the old run's step_000002 kept in place of the new one, log overwritten"),
    case("ablation: protocol.json truncated", ablation.main, lambda fx, t, out: ["--quick", "--out",
         corrupt_protocol(t)], 1, "protocol.json", before="JSONDecodeError traceback"),
    # datasets
    case("NaN in observation.state", posttrain.main, lambda fx, t, out: [*POST, "--out", out, "--data", lerobot_with(
         fx, t, "observation.state", set_row(15, 2, float("nan")))], 1, FRAMES, "'observation.state' of episode 1",
         "frame 3", before="exit 0: trained on NaN (loss nan), NaN checkpoint"),
    case("inf in action", posttrain.main, lambda fx, t, out: [*POST, "--out", out, "--data", lerobot_with(
         fx, t, "action", set_row(4, 9, float("inf")))], 1, "'action' of episode 0", "frame 4",
         before="exit 0: trained on inf"),
    case("float32 overflow in action", posttrain.main, lambda fx, t, out: [*POST, "--out", out, "--data", lerobot_with(
         fx, t, "action", set_row(7, 0, 1e300))], 1, "'action' of episode 0", "frame 7",
         before="exit 0: cast to inf in float32, trained on it"),
    case("zero episodes", posttrain.main, lambda fx, t, out: [*POST, "--out", out, "--data", no_episodes(fx, t)], 1,
         "no frames in 0 episode", before="bare IndexError traceback"),
    case("episodes.jsonl corrupt", posttrain.main, lambda fx, t, out: [*POST, "--out", out, "--data", bad_jsonl(t)], 1,
         "episodes.jsonl", "line 3", before="JSONDecodeError traceback"),
    case("missing dataset", posttrain.main, lambda fx, t, out: [*POST, "--out", out, "--data",
         os.path.join(t, "nowhere")], 1, "nowhere: path not found", before="FileNotFoundError traceback"),
    case("Omni3D: every object beyond 10 m", pretrain.main, lambda fx, t, out: ["--data", far_omni3d(t), "--out", out,
         "--steps", "1", *FAST], 1, "train.json", "no usable 3D object", "outside 0.01-10.0 m",
         before="ValueError traceback 'no object ... to fit bins on', no reason"),
    case("BOP without depth_scale", pretrain.main, lambda fx, t, out: ["--data", bop_without_depth_scale(t), "--out",
         out, "--steps", "1", *FAST], 1, "scene_camera.json", "depth_scale",
         before="depth_scale 1.0 assumed (this tiny set then hit a batch-size traceback)"),
    case("data.py show --cameras unknown", data.main, lambda fx, t, out: ["show", "--data", fx.lerobot, "--out", out,
         "--cameras", "head,top"], 1, "camera 'top' not found", "available",
         before="no --cameras option (argparse: unrecognized arguments)"),
    case("data.py show --index past the end", data.main, lambda fx, t, out: ["show", "--data", fx.lerobot, "--out", out,
         "--index", "17"], 1, "--index 17", "17 samples", before="IndexError traceback"),
]


def run_cli(main, argv, capsys):
    """(exit status, message) of main(argv) run as its command line runs it."""
    with pytest.raises(SystemExit) as e:
        cli(main, argv)
    err = capsys.readouterr().err
    if isinstance(e.value.code, str):  # sys.exit("error: ..."): status 1, the text to stderr
        return 1, e.value.code
    return e.value.code, err


def listing(folder):
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, dirs, files in os.walk(folder)
                  for n in dirs + files)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("main,argv,code,text", CASES)
def test_bad_input_exits_with_one_clear_line(fx, tmp_path, capsys, main, argv, code, text):
    out = str(tmp_path / "out")
    args = argv(fx, str(tmp_path), out)
    inputs = listing(str(tmp_path))
    status, message = run_cli(main, args, capsys)
    assert status == code, message
    assert "Traceback" not in message and (code == 2 or message.startswith("error: ")), message
    for t in text:
        assert t in message, f"{t!r} not in {message!r}"
    assert not os.path.exists(out), os.listdir(out)  # nothing half-written
    assert listing(str(tmp_path)) == inputs  # a resumed or refused run folder is left as it was


def test_cli_prints_our_errors_in_one_line_and_keeps_a_bug_s_traceback():
    def worker_error(argv):  # how a DataLoader worker's error reaches the main process
        raise ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"data.py\", line 1, in item\n"
                         "ValueError: x.parquet: row 3 'image': cannot decode")
    with pytest.raises(SystemExit, match=r"^error: x.parquet: row 3 'image': cannot decode$"):
        cli(worker_error)
    with pytest.raises(ZeroDivisionError):  # not bad input: a bug, with its traceback
        cli(lambda argv: 1 / 0)


def test_save_refuses_non_finite_weights(fx, tmp_path):
    model, tok, bins = load_checkpoint(fx.ckpt)
    with torch.no_grad():
        model.state_proj.weight[0, 0] = float("inf")
    optimizer = torch.optim.AdamW(model.parameters())
    run = checkpoint.Run(model, tok, bins, str(tmp_path), {}, {})
    cfg = trainer.TrainConfig()
    with pytest.raises(ValueError, match="state_proj.weight.*not writing"):
        checkpoint.save(run, 3, optimizer, trainer.make_scheduler(optimizer, cfg), SimpleNamespace(state_dict=dict),
                        cfg, trainer.Dist())
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- what keeps working
def test_diverging_run_stops_at_the_first_non_finite_step_and_keeps_its_last_good_checkpoint(fx, tmp_path, capsys):
    out = str(tmp_path / "run")
    status, message = run_cli(posttrain.main, [*POST, "--data", fx.lerobot, "--out", out, "--steps", "5",
                                               "--save-every", "1", "--lr", "1e30"], capsys)
    assert status == 1 and "step 2: the loss or gradient is not finite" in message, message
    assert f"last good checkpoint is {out}/step_000001" in message
    assert sorted(os.listdir(out)) == ["step_000001", "train_log.jsonl"]  # no step 2, nothing half-written
    model, _, _ = load_checkpoint(os.path.join(out, "step_000001"))
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert [r["step"] for r in map(json.loads, open(os.path.join(out, "train_log.jsonl")))] == [1]


def corrupt_frames(root, rows):
    """The head image of these rows no longer decodes."""
    def change(cells):
        for r in rows:
            cells[r] = {"bytes": b"\x89PNG\r\n\x1a\nnot really", "path": None}
    edit_column(root, "observation.images.head", change)


def test_skip_bad_trains_past_bad_frames_and_resumes_a_run_they_stopped(fx, tmp_path, capsys):
    root = copy(fx.lerobot, str(tmp_path), "lr")
    corrupt_frames(root, range(12, 17))  # every frame of episode 1
    out, argv = str(tmp_path / "run"), [*POST, "--data", root, "--steps", "6", "--save-every", "1", "--seed", "1"]
    status, message = run_cli(posttrain.main, argv + ["--out", out], capsys)
    assert status == 1 and "'observation.images.head': cannot decode" in message and "row 1" in message, message
    stopped = checkpoint.checkpoints(out)
    assert stopped and not any(n.endswith((".partial", ".tmp")) for n in os.listdir(out))
    posttrain.main(["--resume", out, "--skip-bad"])  # the same run, past the bad frames
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    assert [r["step"] for r in log] == list(range(1, 7)) and sum(r["skipped"] for r in log) > 0
    assert os.path.isdir(os.path.join(out, "step_000006"))


def lerobot_head_and_wrist(tmp):
    """A LeRobot dataset as many are: cameras 'head' and 'wrist', no depth, camera poses or pose keys."""
    root = write_lerobot(os.path.join(tmp, "hw"), "v3.0", "image", lengths=(4,))
    path = os.path.join(root, FRAMES)
    table = pq.read_table(path).drop(["observation.images.right_wrist"])
    names = [n.replace("left_wrist", "wrist") for n in table.column_names]
    pq.write_table(table.rename_columns(names), path)
    feats = {k.replace("left_wrist", "wrist"): v for k, v in json.load(open(os.path.join(root, "meta", "info.json")))
             ["features"].items() if "right_wrist" not in k}
    edit_json(os.path.join(root, "meta", "info.json"), lambda d: d.update(features=feats))
    return root


def test_show_opens_a_lerobot_dataset_without_poses_and_renames_views(tmp_path, capsys):
    from PIL import Image
    root, png = lerobot_head_and_wrist(str(tmp_path)), str(tmp_path / "show.png")
    data.main(["show", "--data", root, "--out", png, "--image-size", "32"])
    assert "2 views (head, wrist)" in capsys.readouterr().out and Image.open(png).size[1] > 32 * 8
    data.main(["show", "--data", root, "--out", png, "--image-size", "32", "--cameras", "top=head"])
    assert "1 views (top)" in capsys.readouterr().out
    assert not any(n.startswith("posevla_stats") for n in os.listdir(root))  # a look writes nothing into the data


def test_readme_examples_use_folders_earlier_examples_create():
    """Every relative --data/--ckpt path of a command in README.md, then docs/usage.md, was written by
    an earlier command (its --out, or the default run folder of pretrain.py / posttrain.py)."""
    made, text = [], "".join(open(os.path.join(REPO, f)).read() for f in ("README.md", "docs/usage.md"))
    for line in re.findall(r"^(?:python|torchrun)[^\n]*", text, re.M):
        for flag, value in re.findall(r"--(data|ckpt|init|resume|eval-data) (\S+)", line):
            for path in value.split(","):
                if not path.startswith("/") and path not in ("CKPT", "DIR", "..."):
                    assert any(path.startswith(m) for m in made), (
                        f"README: {line!r} reads {path}, made by no earlier command")
        made += re.findall(r"--out (\S+)", line)
        stage = re.search(r"--stage (\w+)", line)
        robot = re.search(r"--robot (\w+)", line)
        if "pretrain.py" in line and "--out" not in line:
            made.append(f"runs/pretrain_{stage.group(1) if stage else 'grounding'}")
        if "posttrain.py" in line and "--out" not in line and robot:
            made.append(f"runs/posttrain_{robot.group(1)}")


if __name__ == "__main__":  # the table of cases, for an issue's closing note
    for name, before in BEFORE.items():
        print(f"| {name} | {before} |")
