"""The built-in tabletop world (method.md §11): a MuJoCo two-arm simulator.

It plays three roles: a source of 3D grounding scenes (exact object poses, sizes, RGB-D, cameras),
a source of scripted-expert demonstrations, and a closed-loop benchmark of language-conditioned
tasks. Its layout mirrors RoboTwin: two floating parallel-jaw grippers ("left arm", "right arm")
that follow absolute end-effector targets through mocap welds, a `head` camera and one wrist camera
per gripper, and a 16-dim state/action `[l_xyz, l_quat(wxyz), l_grip, r_xyz, r_quat, r_grip]` in
the world frame, which is the table frame: origin at the centre of the table top, x to the right
as seen by the head camera, y away from it, z up. Grippers are in [0, 1] with 1 = open; fingers
are position-actuated slide joints, so objects are held by contact and friction only.

Cameras follow method.md §2: K uses OpenCV pixel coordinates (pixel centres at integers, so
c = ((W-1)/2, (H-1)/2)) and `cam2world` is a 4x4 camera->world pose in OpenCV axes (x right,
y down, z forward); MuJoCo's own cameras look down -z with y up and are converted in `render.py`,
which also renders the cameras offscreen (RGB, metric depth, segmentation).
The scripted experts (which read privileged simulator state) live in `expert.py`; the writers
(Omni3D grounding JSON, LeRobot v3.0 demonstrations), the timing benchmark and the command line
(`python sim.py {grounding,demos,show,bench}`) in `sim_export.py`.
"""
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless GPU/software rendering; must precede import

from dataclasses import dataclass

import mujoco
import numpy as np

from ee16 import ARMS, DIM, NAMES, gripper, position, quaternion
from render import MJ_TO_CV, Views, cam2world_cv, gl_context, intrinsics
from tokenizer import nlerp

TASKS = ("pick", "place", "push", "handover")
SETTINGS = ("clean", "randomized")
CAMERAS = ("head", "left_wrist", "right_wrist")
CONTROL_HZ = 10          # RoboTwin-like control rate; one `step` = 0.1 s
PHYSICS_DT = 0.002       # 2 ms keeps finger contacts stiff enough to hold objects by friction
FINGER_TRAVEL = 0.045    # metres per finger; fully open gap = 2 * (travel + pad offset) = 9.4 cm
TABLE_HALF = (0.45, 0.30)
# Arms wait out to the sides, so that at the start of a task they hide nothing from the head camera.
HOME = {"left": np.array([-0.33, -0.2, 0.3]), "right": np.array([0.33, -0.2, 0.3])}
# Where objects start (x, y ranges on the table top). Together with the head camera below it fixes
# how large objects look: the head view spans about 8 object widths, so at the tiny model's 112 px
# every task's target covers at least one 14 px patch (tests/test_sim.py pins this).
WORKSPACE = ((-0.23, -0.13), (0.23, 0.15))
CLUTTER_REGION = ((-0.3, -0.17), (0.3, 0.2))
HEAD_CAMERA = dict(pos=(0.0, -0.40, 0.52), target=(0.0, 0.01, 0.0), fovy=42.0)
COLOURS = {"red": (0.85, 0.12, 0.1), "green": (0.15, 0.65, 0.2), "blue": (0.12, 0.3, 0.85),
           "yellow": (0.95, 0.85, 0.1), "orange": (0.95, 0.5, 0.08), "purple": (0.55, 0.22, 0.7),
           "white": (0.92, 0.92, 0.9), "black": (0.1, 0.1, 0.1)}
# category -> (size sampler over full extents (sx, sy, sz), graspable); bodies sit on their base.
# The ball, seen as a bare disc, is the smallest target in the head view: at 7.2 cm it still spans
# 16 px of the 128 px render (14 px at the model's 112) at the far edge of the WORKSPACE.
CATALOGUE = {
    "cube": (lambda r: np.full(3, r.uniform(0.05, 0.065)), True),
    "block": (lambda r: np.array([r.uniform(0.095, 0.13), r.uniform(0.036, 0.048), r.uniform(0.036, 0.048)]), True),
    "can": (lambda r: _round(r.uniform(0.026, 0.036), r.uniform(0.11, 0.14)), True),
    "ball": (lambda r: np.full(3, 2 * r.uniform(0.036, 0.042)), True),
    "bottle": (lambda r: _round(r.uniform(0.025, 0.031), r.uniform(0.15, 0.18)), True),
    "plate": (lambda r: _round(r.uniform(0.06, 0.072), 0.012), False),
    "bowl": (lambda r: _round(r.uniform(0.051, 0.064), r.uniform(0.04, 0.05)), False),
    "mug": (lambda r: np.array([0.1, 0.08, r.uniform(0.08, 0.095)]) * r.uniform(0.85, 1.0), False),
}
TASK_TARGETS = {"pick": ("cube", "block", "can", "ball", "bottle"), "place": ("cube", "can"),
                "push": ("cube", "block", "can"), "handover": ("can", "bottle")}


def _round(radius, height):
    return np.array([2 * radius, 2 * radius, height])


@dataclass
class WorldConfig:
    image_size: int = 128     # square renders; 128 px keeps a control step near 20 ms on a CPU
    shadows: bool = False     # shadow mapping costs ~10x on software GL, so it is opt-in
    n_clean: int = 3          # objects on the table in `clean` (target + 2 language distractors)
    n_randomized: tuple = (4, 6)  # object count range in `randomized` (adds clutter)


@dataclass
class SceneObject:
    name: str          # plain English, unique in the scene: "red cube"
    category: str
    colour: str
    size: np.ndarray   # (3,) full extents along the body axes, metres
    xy: np.ndarray     # (2,) initial position on the table
    yaw: float
    rgba: np.ndarray   # (4,)


# ----------------------------------------------------------------------------- rotations
def mat_to_quat(m):
    """(3, 3) -> (4,) [qw, qx, qy, qz], qw >= 0. Same convention and sign as tokenizer.matrix_to_quat
    (also for `down_quat`'s 180-degree turns, qw = 0), but MuJoCo's arithmetic: the two differ in the
    last bit for many rotations, which contact physics amplifies into different demonstrations."""
    q = np.zeros(4)
    mujoco.mju_mat2Quat(q, np.ascontiguousarray(m, np.float64).reshape(9))
    return q if q[0] >= 0 else -q


def _rz(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def down_quat(yaw):
    """Gripper pointing down (its z = world -z), fingers closing along Rz(yaw) @ world y."""
    return mat_to_quat(_rz(yaw) @ np.diag([-1.0, 1.0, -1.0]))


def look_at(pos, target, up):
    """(3, 3) camera->world rotation in OpenCV axes (x right, y down, z forward) for a camera at
    pos facing target, with world `up` pointing up in the image."""
    z = np.asarray(target, float) - pos
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(z, x), z], 1)


def _lookat_axes(pos, target, up):
    """MuJoCo camera xyaxes (x right, y up; it looks down -z) for a camera at pos facing target."""
    R = look_at(pos, target, up)
    return R[:, 0], np.cross(R[:, 0], R[:, 2])


def _fmt(v):
    return " ".join(f"{float(x):.6g}" for x in np.ravel(v))


# ----------------------------------------------------------------------------- scene sampling
def footprint(obj):
    return 0.5 * float(np.hypot(obj.size[0], obj.size[1]))


def sample_objects(rng, setting, task, cfg):
    """Sample the target, receptacles for `place`, and distractors that force a language choice.

    Returns (objects, receptacle index or None, side); the target is objects[0]. Names are unique in the scene; the
    first distractor shares the target's category and the second its colour, so only the full
    name picks the target out.
    """
    colours = list(COLOURS)
    cat = TASK_TARGETS[task][rng.integers(len(TASK_TARGETS[task]))]
    col = colours[rng.integers(len(colours))]
    picks = [(cat, col), (cat, _other(rng, colours, col))]
    picks.append((_other(rng, list(CATALOGUE), cat), col))
    if task == "place":
        rec = ("plate", "bowl")[rng.integers(2)]
        rcol = colours[rng.integers(len(colours))]
        picks += [(rec, rcol), (rec, _other(rng, colours, rcol))]
    n_task = len(picks)  # the target, its two language distractors and the receptacles
    n = cfg.n_clean if setting == "clean" else int(rng.integers(cfg.n_randomized[0], cfg.n_randomized[1] + 1))
    n = min(n + 2, 7) if task == "place" else n
    while len(picks) < n:
        pair = (list(CATALOGUE)[rng.integers(len(CATALOGUE))], colours[rng.integers(len(colours))])
        if pair not in picks:
            picks.append(pair)
    objects = []
    for category, colour in picks:
        rgba = np.array([*COLOURS[colour], 1.0])
        if setting == "randomized":  # colour jitter stays inside the named colour family
            rgba[:3] = np.clip(rgba[:3] + rng.uniform(-0.06, 0.06, 3), 0, 1)
        size = CATALOGUE[category][0](rng)
        objects.append(SceneObject(f"{colour} {category}", category, colour, size, np.zeros(2),
                                   float(rng.uniform(-np.pi, np.pi)), rgba))
    side = 1.0 if rng.random() < 0.5 else -1.0  # push direction / handover giver side
    _place(rng, objects, task, side, n_task)
    return objects, (3 if task == "place" else None), side


def _other(rng, options, exclude):
    rest = [o for o in options if o != exclude]
    return rest[rng.integers(len(rest))]


def _place(rng, objects, task, side, n_task):
    """Rejection-sample non-overlapping positions; the task fixes where the target may be. The
    first n_task objects start in the WORKSPACE (large in the head view); clutter anywhere in
    CLUTTER_REGION, which may reach past the head camera's view."""
    for _ in range(200):
        ok = True
        for i, obj in enumerate(objects):
            lo, hi = (np.array(r) for r in (WORKSPACE if i < n_task else CLUTTER_REGION))
            if i == 0 and task == "push":
                lo[0], hi[0] = -0.1, 0.1
            if i == 0 and task == "handover":
                lo[0], hi[0] = (0.08, 0.2) if side > 0 else (-0.2, -0.08)
            for _ in range(100):
                obj.xy = rng.uniform(lo, hi)
                if all(_clear(obj, other, objects[0], task, side) for other in objects[:i]):
                    break
            else:
                ok = False
                break
        if ok:
            return
    raise RuntimeError("could not place the objects without overlap")


def _clear(obj, other, target, task, side):
    gap = np.linalg.norm(obj.xy - other.xy) - footprint(obj) - footprint(other)
    if other is target and task in ("push", "handover", "place"):
        # keep the target's surroundings free for the approach, and for `push` its whole lane
        lane = (task == "push" and abs(obj.xy[1] - target.xy[1]) < footprint(obj) + footprint(target) + 0.02
                and (obj.xy[0] - target.xy[0]) * side > -0.15)
        return gap > 0.07 and not lane
    return gap > 0.02


# ----------------------------------------------------------------------------- model XML
def _object_xml(i, obj, z):
    sx, sy, sz = obj.size
    rgba, q = _fmt(obj.rgba), _fmt(mat_to_quat(_rz(obj.yaw)))
    g = f'rgba="{rgba}" density="400"'
    c = obj.category
    if c in ("cube", "block"):
        geoms = f'<geom type="box" size="{_fmt(obj.size / 2)}" {g}/>'
    elif c in ("can", "plate"):
        geoms = f'<geom type="cylinder" size="{sx / 2:.6g} {sz / 2:.6g}" {g}/>'
    elif c == "ball":
        geoms = f'<geom type="sphere" size="{sx / 2:.6g}" condim="6" friction="1 0.01 0.002" {g}/>'
    elif c == "bottle":
        body = 0.72 * sz
        geoms = (f'<geom type="cylinder" size="{sx / 2:.6g} {body / 2:.6g}" pos="0 0 {body / 2 - sz / 2:.6g}" {g}/>'
                 f'<geom type="cylinder" size="0.012 {(sz - body) / 2:.6g}" '
                 f'pos="0 0 {sz / 2 - (sz - body) / 2:.6g}" {g}/>')
    elif c == "bowl":
        geoms = _bowl_geoms(sx / 2, sz, g)
    else:  # mug: cylinder body plus a handle on +x, body origin at the bounding-box centre
        r = sy / 2
        geoms = (f'<geom type="cylinder" size="{r:.6g} {sz / 2:.6g}" pos="{r - sx / 2:.6g} 0 0" {g}/>'
                 f'<geom type="box" size="{(sx - 2 * r) / 2:.6g} 0.006 {sz / 4:.6g}" '
                 f'pos="{sx / 2 - (sx - 2 * r) / 2:.6g} 0 0" {g}/>')
    return (f'<body name="obj{i}" pos="{obj.xy[0]:.6g} {obj.xy[1]:.6g} {z:.6g}" quat="{q}">'
            f'<freejoint name="obj{i}_free"/>{geoms}</body>')


def _bowl_geoms(r, h, g, n=12):
    geoms = [f'<geom type="cylinder" size="{r * 0.6:.6g} 0.004" pos="0 0 {-h / 2 + 0.004:.6g}" {g}/>']
    for k in range(n):
        a = 2 * np.pi * k / n
        w = r * np.tan(np.pi / n) * 1.05
        geoms.append(f'<geom type="box" size="0.004 {w:.6g} {h / 2:.6g}" '
                     f'pos="{(r - 0.004) * np.cos(a):.6g} {(r - 0.004) * np.sin(a):.6g} 0" '
                     f'euler="0 -0.25 {a:.6g}" {g}/>')
    return "".join(geoms)


def _gripper_xml(arm, pos, rgba):
    q = _fmt(down_quat(0.0))
    cx, cy = _lookat_axes(np.array([-0.065, 0, -0.06]), [0, 0, 0.14], np.array([-1.0, 0, 0]))
    fingers = "".join(
        f'<body name="{arm}_finger_{k}" gravcomp="1"><joint name="{arm}_f{k}" type="slide" axis="0 {s} 0" '
        f'range="0 {FINGER_TRAVEL}" damping="2" armature="0.005"/><geom name="{arm}_pad_{k}" type="box" '
        f'size="0.012 0.006 0.025" pos="0 {s * 0.008} -0.01" mass="0.03" condim="4" '
        f'friction="1.5 0.02 0.001" rgba="0.25 0.25 0.28 1"/></body>' for k, s in (("a", 1), ("b", -1)))
    return (f'<body name="{arm}_target" mocap="true" pos="{_fmt(pos)}" quat="{q}"/>'
            f'<body name="{arm}_hand" pos="{_fmt(pos)}" quat="{q}" gravcomp="1"><freejoint name="{arm}_free"/>'
            f'<geom name="{arm}_palm" type="box" size="0.02 0.055 0.012" pos="0 0 -0.047" mass="0.3" rgba="{rgba}"/>'
            f'<geom name="{arm}_wrist" type="cylinder" size="0.02 0.02" pos="0 0 -0.079" mass="0.1" rgba="{rgba}"/>'
            f'<camera name="{arm}_wrist" pos="-0.065 0 -0.06" xyaxes="{_fmt(cx)} {_fmt(cy)}" fovy="75"/>'
            f'{fingers}</body>')


def build_xml(objects, look, cfg):
    """MJCF for one episode: table, lights, head/scan cameras, two grippers and the objects."""
    hx, hy = TABLE_HALF
    hp, ht, hfov = look["head_pos"], look["head_target"], look["head_fovy"]
    ax, ay = _lookat_axes(hp, ht, np.array([0, 0, 1.0]))
    objs = "".join(_object_xml(i, o, o.size[2] / 2 + 0.002) for i, o in enumerate(objects))
    s = cfg.image_size
    return f"""<mujoco model="tabletop">
<compiler angle="radian" autolimits="true"/>
<option timestep="{PHYSICS_DT}" integrator="implicitfast" cone="elliptic" impratio="10"/>
<statistic extent="2" center="0 0 0"/>
<visual><global offwidth="{max(s, 640)}" offheight="{max(s, 640)}"/><map znear="0.005" zfar="5"/>
<quality shadowsize="1024" offsamples="0"/><headlight ambient="{_fmt(look['ambient'])}" \
diffuse="{_fmt(look['head_diffuse'])}" specular="0 0 0"/></visual>
<asset><texture name="tabletex" type="2d" builtin="checker" rgb1="{_fmt(look['table1'])}" \
rgb2="{_fmt(look['table2'])}" width="64" height="64"/>
<material name="table" texture="tabletex" texrepeat="{look['texrepeat']} {look['texrepeat']}"/>
<material name="floor" rgba="{_fmt(look['floor'])}"/></asset>
<worldbody>
<light name="sun" directional="true" pos="0 0 2" dir="{_fmt(look['light_dir'])}" \
diffuse="{_fmt(look['light'])}" castshadow="true"/>
<geom name="floor" type="plane" size="3 3 0.1" pos="0 0 -0.75" material="floor"/>
<geom name="table" type="box" size="{hx} {hy} 0.375" pos="0 0 -0.375" material="table" friction="0.8 0.005 0.0001"/>
<camera name="head" pos="{_fmt(hp)}" xyaxes="{_fmt(ax)} {_fmt(ay)}" fovy="{hfov:.6g}"/>
<camera name="scan" pos="0 -1 1" xyaxes="1 0 0 0 0.7071 0.7071" fovy="55"/>
{_gripper_xml("left", HOME["left"], "0.8 0.45 0.2 1")}{_gripper_xml("right", HOME["right"], "0.2 0.5 0.8 1")}
{objs}
</worldbody>
<equality>{"".join(f'<weld body1="{a}_target" body2="{a}_hand" '
                   f'relpose="0 0 0 1 0 0 0" solref="0.01 1"/>' for a in ARMS)}</equality>
<actuator>{"".join(f'<position joint="{a}_f{k}" kp="300" forcerange="-12 12" '
                   f'ctrlrange="0 {FINGER_TRAVEL}"/>' for a in ARMS for k in "ab")}</actuator>
</mujoco>"""


def sample_look(rng, setting):
    """Lighting, table texture and head-camera pose; `randomized` perturbs all of them."""
    look = dict(head_pos=np.array(HEAD_CAMERA["pos"]), head_target=np.array(HEAD_CAMERA["target"]),
                head_fovy=HEAD_CAMERA["fovy"], ambient=np.full(3, 0.25), head_diffuse=np.full(3, 0.35),
                light_dir=np.array([0.3, 0.4, -1.0]), light=np.full(3, 0.6),
                table1=np.array([0.62, 0.48, 0.33]), table2=np.array([0.6, 0.46, 0.31]),
                texrepeat=4, floor=np.array([0.35, 0.35, 0.38, 1.0]))
    if setting == "randomized":
        look["head_pos"] = look["head_pos"] + rng.uniform(-0.02, 0.02, 3)
        look["head_target"] = look["head_target"] + rng.uniform(-0.02, 0.02, 3)
        look["head_fovy"] += rng.uniform(-2, 2)
        look["ambient"] = np.full(3, rng.uniform(0.1, 0.4))
        look["head_diffuse"] = np.full(3, rng.uniform(0.2, 0.5))
        look["light_dir"] = np.array([*rng.uniform(-0.6, 0.6, 2), -1.0])
        look["light"] = rng.uniform(0.3, 0.8, 3)
        look["table1"], look["table2"] = rng.uniform(0.2, 0.8, 3), rng.uniform(0.2, 0.8, 3)
        look["texrepeat"] = int(rng.integers(1, 9))
        look["floor"] = np.array([*rng.uniform(0.1, 0.7, 3), 1.0])
    return look


# ----------------------------------------------------------------------------- environment
class TabletopEnv:
    """One task in one setting. `reset(seed)` rebuilds the world; `step(action16)` runs 0.1 s.

    obs = {"cameras": {name: {"rgb" (S,S,3) uint8, "depth" (S,S) float32 m (0 = invalid),
    "K" (3,3), "cam2world" (4,4) OpenCV, "seg" (S,S) int16 object index or -1}}, "state" (16,)}.
    With render=False the "cameras" dict is empty (fast expert evaluation).
    """

    def __init__(self, task="pick", setting="clean", seed=0, image_size=128, shadows=False,
                 render=True, cameras=CAMERAS):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r}; expected one of {SETTINGS}")
        bad = [c for c in cameras if c not in CAMERAS + ("scan",)]
        if bad:
            raise ValueError(f"unknown camera(s) {bad}; expected names from {CAMERAS}")
        self.task, self.setting, self.cameras, self.render = task, setting, tuple(cameras), render
        self.cfg = WorldConfig(image_size=image_size, shadows=shadows)
        self._ctx = gl_context(image_size, image_size) if render else None
        self.views = self.model = None
        self.n_sub = round(1.0 / (CONTROL_HZ * PHYSICS_DT))
        self.reset(seed)

    # --- episode setup
    def reset(self, seed=None):
        self.seed = self.seed if seed is None else int(seed)
        rng = np.random.default_rng([self.seed, TASKS.index(self.task), SETTINGS.index(self.setting)])
        self.objects, self.receptacle, self.side = sample_objects(rng, self.setting, self.task, self.cfg)
        self.look = sample_look(rng, self.setting)
        if self.views is not None:
            self.views.close()
        self.model = mujoco.MjModel.from_xml_string(build_xml(self.objects, self.look, self.cfg))
        self.data = mujoco.MjData(self.model)
        m = self.model
        self._obj_body = [m.body(f"obj{i}").id for i in range(len(self.objects))]
        self._geom_obj = np.full(m.ngeom, -1, np.int16)
        for i, b in enumerate(self._obj_body):
            self._geom_obj[m.geom_bodyid == b] = i
        self._mocap = {a: m.body_mocapid[m.body(f"{a}_target").id] for a in ARMS}
        self._hand = {a: m.body(f"{a}_hand").id for a in ARMS}
        self._pads = {a: (m.geom(f"{a}_pad_a").id, m.geom(f"{a}_pad_b").id) for a in ARMS}
        self._fjnt = {a: [m.joint(f"{a}_f{k}").qposadr[0] for k in "ab"] for a in ARMS}
        self.views = Views(m, self.cfg.image_size, self.cfg.shadows, self._ctx) if self.render else None
        mujoco.mj_forward(m, self.data)
        self.data.ctrl[:] = FINGER_TRAVEL
        for _ in range(150):  # let objects settle on the table (0.3 s)
            mujoco.mj_step(m, self.data)
        self.rest_z = np.array([self.data.xpos[b][2] for b in self._obj_body])
        self.t, self.expert = 0, None  # expert.expert_action keeps this episode's expert here
        self._cmd = self.state()
        return self.observe()

    @property
    def instruction(self):
        target = self.objects[0].name
        if self.task == "pick":
            return f"pick up the {target}"
        if self.task == "place":
            return f"put the {target} on the {self.objects[self.receptacle].name}"
        if self.task == "push":
            return f"push the {target} to the {'right' if self.side > 0 else 'left'} edge of the table"
        return f"hand the {target} over to the {'left' if self.side > 0 else 'right'} arm"

    # --- control
    def step(self, action):
        a = np.asarray(action, np.float64)
        if a.shape != (DIM,) or not np.all(np.isfinite(a)):
            raise ValueError(f"action must be {DIM} finite numbers {NAMES} (ee16.py), got shape {a.shape}")
        d, start = self.data, self._cmd
        for s in range(self.n_sub):
            f = min(1.0, (s + 1) / (0.6 * self.n_sub))  # reach the target in 60 ms, then hold
            for k, arm in enumerate(ARMS):
                p, q = position(arm), quaternion(arm)
                d.mocap_pos[self._mocap[arm]] = np.clip((1 - f) * start[p] + f * a[p], [-0.7, -0.6, -0.02],
                                                        [0.7, 0.6, 0.7])
                d.mocap_quat[self._mocap[arm]] = nlerp(start[q] / np.linalg.norm(start[q]),
                                                       a[q] / np.linalg.norm(a[q]), f)
                d.ctrl[2 * k:2 * k + 2] = FINGER_TRAVEL * np.clip(a[gripper(arm)], 0.0, 1.0)
            mujoco.mj_step(self.model, d)
        self._cmd = a.copy()
        self.t += 1
        return self.observe()

    def state(self):
        out = []
        for arm in ARMS:
            b = self._hand[arm]
            grip = np.mean(self.data.qpos[self._fjnt[arm]]) / FINGER_TRAVEL
            out += [*self.data.xpos[b], *self.data.xquat[b], np.clip(grip, 0.0, 1.0)]
        return np.array(out)

    # --- observation
    def observe(self, cameras=None):
        cams = {}
        if self.render:
            for name in cameras or self.cameras:
                cams[name] = self.camera_view(name)
        return {"cameras": cams, "state": self.state().astype(np.float32)}

    def camera_view(self, name):
        cid = self.model.camera(name).id
        self.views.update(self.data, cid)
        rgb, depth = self.views.rgbd()
        gid = self.views.geom_ids()
        seg = np.where(gid >= 0, self._geom_obj[np.maximum(gid, 0)], -1).astype(np.int16)
        K = intrinsics(self.model.cam_fovy[cid], self.cfg.image_size)
        return {"rgb": rgb, "depth": depth, "K": K, "cam2world": cam2world_cv(self.data, cid), "seg": seg}

    def set_scan_camera(self, cam2world, fovy):
        """Place the free `scan` camera (grounding views) at an OpenCV camera->world pose."""
        cid = self.model.camera("scan").id
        self.model.cam_pos[cid] = cam2world[:3, 3]
        self.model.cam_quat[cid] = mat_to_quat(cam2world[:3, :3] @ MJ_TO_CV)
        self.model.cam_fovy[cid] = fovy
        mujoco.mj_forward(self.model, self.data)

    def object_pose(self, i):
        b = self._obj_body[i]
        return self.data.xpos[b].copy(), self.data.xmat[b].reshape(3, 3).copy()

    # --- success
    def _touching(self, i, geoms):
        body, m = self._obj_body[i], self.model
        for c in self.data.contact[:self.data.ncon]:
            g1, g2 = c.geom1, c.geom2
            if (m.geom_bodyid[g1] == body and g2 in geoms) or (m.geom_bodyid[g2] == body and g1 in geoms):
                return True
        return False

    def held_by(self, i, arm):
        return all(self._touching(i, (p,)) for p in self._pads[arm])

    def reach_cm(self):
        """Distance (cm) from the nearer gripper's finger midpoint to the target object's centre:
        how close an episode came, graded (eval_sim records its minimum next to success)."""
        pos, _ = self.object_pose(0)
        return 100 * min(float(np.linalg.norm(self.data.geom_xpos[list(p)].mean(0) - pos)) for p in self._pads.values())

    def touching_target(self):
        return self._touching(0, self._pads["left"] + self._pads["right"])

    def success(self):
        pos, _ = self.object_pose(0)
        lifted = pos[2] - self.rest_z[0]
        table = (self.model.geom("table").id,)
        if self.task == "pick":
            return lifted > 0.08 and any(self.held_by(0, a) for a in ARMS)
        if self.task == "place":
            rec, _ = self.object_pose(self.receptacle)
            r = 0.5 * self.objects[self.receptacle].size[0]
            pads = self._pads["left"] + self._pads["right"]
            return (np.linalg.norm(pos[:2] - rec[:2]) < r - 0.015 and lifted > 0.0
                    and not self._touching(0, pads) and not self._touching(0, table))
        if self.task == "push":
            return pos[0] * self.side > 0.28 and pos[2] > 0.0
        receiver, giver = ("left", "right") if self.side > 0 else ("right", "left")
        return (lifted > 0.05 and self.held_by(0, receiver) and not self._touching(0, self._pads[giver])
                and not self._touching(0, table))

    def close(self):
        if self.views is not None:
            self.views.close()
            self.views = None


if __name__ == "__main__":  # the command line lives with the writers and experts, which import this module
    from errors import cli
    from sim_export import main
    cli(main)
