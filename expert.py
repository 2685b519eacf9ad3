"""Scripted experts for the built-in tabletop world (method.md §11): demonstrations and a check
that every task is solvable.

An expert is a fixed plan per task, a list of phases (target_fn, n_steps). Each phase computes its
end-effector target from *privileged* simulator state (true object poses and sizes from
`TabletopEnv.object_pose`, the task's hidden `side`, the receptacle index) when it starts, and the
command then moves there by linear interpolation (nlerp for quaternions) over n_steps control
steps. A policy never sees this state; only the demonstrations it produces.

- pick: the arm on the target's side goes above it with the jaw across its short side, descends
  until the jaw is 3 cm below the object's top, closes, lifts 15 cm and holds.
- place: pick, then carry the object above the receptacle (plate or bowl), lower it onto the
  receptacle's surface, open and rise.
- push: the arm behind the target (opposite to the push direction) lowers its closed jaw beside it
  and pushes it in three segments of at most 15 cm, re-centred on the object's current y, towards
  the table edge, then retreats up.
- handover: the giver (the arm on the target's side) picks the object, lifts it above everything
  on the table and brings it in front of the middle while the receiver turns sideways; the
  receiver grasps the free lower part, the giver opens and rises, and the receiver moves away
  with it.

`rollout` runs one episode, `expert_action` gives the next action for an env's current episode,
`max_steps` is the benchmark's step limit derived from the plan lengths, and `show` writes a PNG and
GIF of an expert rollout (the `show` command of `sim.py`).
"""
import os

import numpy as np
from PIL import Image

import ee16
from sim import CAMERAS, CONTROL_HZ, TabletopEnv, down_quat, mat_to_quat
from tokenizer import nlerp


# ----------------------------------------------------------------------------- plan phases
# Each phase maps (env, current command (16,)) -> target command (16,).
def _arm(env):
    """Which arm acts: the one on the target's side; for push the one behind it; for handover
    the giver (the target's side)."""
    if env.task == "push":
        return "left" if env.side > 0 else "right"
    if env.task == "handover":
        return "right" if env.side > 0 else "left"
    return "left" if env.objects[0].xy[0] < 0 else "right"


def _other_arm(arm):
    return "right" if arm == "left" else "left"


def _set(cmd, arm, pos=None, quat=None, grip=None):
    out = cmd.copy()
    if pos is not None:
        out[ee16.position(arm)] = pos
    if quat is not None:
        out[ee16.quaternion(arm)] = quat
    if grip is not None:
        out[ee16.gripper(arm)] = grip
    return out


def side_quat(sign):
    """Gripper pointing horizontally towards -sign*x, fingers closing along world y."""
    z = np.array([-sign, 0.0, 0.0])
    y = np.array([0.0, 1.0, 0.0])
    return mat_to_quat(np.stack([np.cross(y, z), y, z], 1))


def _tcp(cmd, arm):
    return cmd[ee16.position(arm)].copy()


def _geometry(env, i):
    """(centre, base z, height, half extent along world x, grasp yaw) of object i now."""
    pos, R = env.object_pose(i)
    size = env.objects[i].size
    half_x = 0.5 * (abs(R[0, 0]) * size[0] + abs(R[0, 1]) * size[1])
    yaw = np.arctan2(R[1, 0], R[0, 0]) + (0.0 if size[0] >= size[1] else np.pi / 2)
    if env.objects[i].category not in ("cube", "block"):
        yaw = 0.0
    yaw = (yaw + np.pi / 2) % np.pi - np.pi / 2  # a parallel jaw is symmetric under 180 degrees
    return pos, pos[2] - size[2] / 2, size[2], half_x, yaw


def _above(env, cmd):
    pos, base, h, _, yaw = _geometry(env, 0)
    return _set(cmd, _arm(env), [pos[0], pos[1], base + h + 0.08], down_quat(yaw), 1.0)


def _descend(env, cmd):
    """Jaw `depth` below the object's top (at least 2 cm above its base): the palm sits 3.5 cm above
    the TCP, so a deeper grasp would press a tall object (can, bottle) into the table."""
    pos, base, h, _, _ = _geometry(env, 0)
    depth = 0.02 if env.task == "handover" else 0.03  # handover leaves the lower part free
    return _set(cmd, _arm(env), [pos[0], pos[1], base + max(0.02, h - depth)])


def _close(env, cmd):
    return _set(cmd, _arm(env), grip=0.0)


def _open(env, cmd):
    return _set(cmd, _arm(env), grip=1.0)


def _lift(env, cmd):
    return _set(cmd, _arm(env), _tcp(cmd, _arm(env)) + [0, 0, 0.15])


def _hold(env, cmd):
    return cmd


def _carry_up(env, cmd):
    arm, (_, base, _, _, _) = _arm(env), _geometry(env, 0)
    _, rbase, rh, _, _ = _geometry(env, env.receptacle)
    tcp = _tcp(cmd, arm)
    return _set(cmd, arm, [tcp[0], tcp[1], tcp[2] + (rbase + rh + 0.06 - base)])


def _carry_over(env, cmd):
    arm, (pos, _, _, _, _) = _arm(env), _geometry(env, 0)
    rec, _, _, _, _ = _geometry(env, env.receptacle)
    tcp = _tcp(cmd, arm)
    return _set(cmd, arm, [rec[0] + tcp[0] - pos[0], rec[1] + tcp[1] - pos[1], tcp[2]])


def _lower_onto(env, cmd):
    arm, (_, base, _, _, _) = _arm(env), _geometry(env, 0)
    _, rbase, rh, _, _ = _geometry(env, env.receptacle)
    surface = rbase + (0.008 if env.objects[env.receptacle].category == "bowl" else rh)
    tcp = _tcp(cmd, arm)
    return _set(cmd, arm, [tcp[0], tcp[1], tcp[2] + surface + 0.01 - base])


def _rise(env, cmd):
    return _set(cmd, _arm(env), _tcp(cmd, _arm(env)) + [0, 0, 0.1])


def _behind(env, cmd):
    pos, _, _, half_x, _ = _geometry(env, 0)
    return _set(cmd, _arm(env), [pos[0] - env.side * (half_x + 0.035), pos[1], 0.15], down_quat(0.0), 0.0)


def _lower_push(env, cmd):
    _, base, h, _, _ = _geometry(env, 0)
    return _set(cmd, _arm(env), [*_tcp(cmd, _arm(env))[:2], base + max(0.02, min(h / 2, 0.03))])


def _push(env, cmd):
    """One push segment of at most 15 cm, re-centred on the object's current y."""
    pos, _, _, half_x, _ = _geometry(env, 0)
    tcp = _tcp(cmd, _arm(env))
    goal = env.side * 0.34 - env.side * (half_x + 0.012)
    x = tcp[0] + np.clip(goal - tcp[0], -0.15, 0.15)
    return _set(cmd, _arm(env), [x, pos[1], tcp[2]])


def _retreat_up(env, cmd):
    return _set(cmd, _arm(env), [*_tcp(cmd, _arm(env))[:2], 0.15])


# Where the giver brings the object's base (x towards the giver's side, y, z). 20 cm up, the receiver
# (TCP 2 cm above the base, palm reaching 2 cm below its TCP) passes over the tallest object on the
# table (bottles up to 18 cm); 5 cm in front of the middle keeps the raised object in the head view.
HANDOVER_BASE = (0.03, -0.05, 0.2)


def _to_centre(env, cmd):
    """Giver lifts the object to HANDOVER_BASE in front of the middle; receiver turns sideways."""
    arm, rec = _arm(env), _other_arm(_arm(env))
    pos, base, _, _, _ = _geometry(env, 0)
    x, y, z = HANDOVER_BASE
    out = _set(cmd, arm, _tcp(cmd, arm) + [env.side * x - pos[0], y - pos[1], z - base])
    return _set(out, rec, [-env.side * 0.22, y, z + 0.02], side_quat(-env.side), 1.0)


def _receive(env, cmd):
    pos, base, _, _, _ = _geometry(env, 0)
    return _set(cmd, _other_arm(_arm(env)), [pos[0], pos[1], base + 0.02])


def _receiver_close(env, cmd):
    return _set(cmd, _other_arm(_arm(env)), grip=0.0)


def _receiver_away(env, cmd):
    rec = _other_arm(_arm(env))
    return _set(cmd, rec, _tcp(cmd, rec) + [-env.side * 0.1, 0, 0.02])


_PICK = [(_above, 8), (_descend, 5), (_close, 5)]
_PLANS = {
    "pick": _PICK + [(_lift, 6), (_hold, 3)],
    "place": _PICK + [(_carry_up, 5), (_carry_over, 8), (_lower_onto, 5), (_open, 4), (_rise, 4)],
    "push": [(_behind, 8), (_lower_push, 4), (_push, 6), (_push, 6), (_push, 6), (_retreat_up, 4)],
    "handover": _PICK + [(_to_centre, 10), (_receive, 6), (_receiver_close, 5), (_open, 4),
                         (_rise, 4), (_receiver_away, 5), (_hold, 2)],
}


class ScriptedExpert:
    """Follows the task's plan from the simulator's true state; `act()` gives the next action."""

    def __init__(self, env):
        self.env, self.phase, self.i = env, 0, 0
        self.start = self.goal = env._cmd.copy()

    @property
    def done(self):
        return self.phase >= len(_PLANS[self.env.task])

    def act(self):
        plan = _PLANS[self.env.task]
        if self.done:
            return self.goal.copy()
        fn, n = plan[self.phase]
        if self.i == 0:
            self.start, self.goal = self.env._cmd.copy(), fn(self.env, self.env._cmd.copy())
        self.i += 1
        f = self.i / n
        out = (1 - f) * self.start + f * self.goal
        for q in ee16.QUATERNIONS:  # keep quaternions unit length
            out[q] = nlerp(self.start[q], self.goal[q], f)
        if self.i == n:
            self.phase, self.i = self.phase + 1, 0
        return out


def expert_action(env):
    """Next scripted-expert action for env's current episode (the expert restarts on reset)."""
    if env.expert is None:
        env.expert = ScriptedExpert(env)
    return env.expert.act()


def rollout(env, seed, on_step=None):
    """Run the expert for one episode; returns success. `on_step(obs, action)` sees every step."""
    obs = env.reset(seed)
    expert = ScriptedExpert(env)
    while not expert.done:
        action = expert.act()
        if on_step is not None:
            on_step(obs, action)
        obs = env.step(action)
    return env.success()


def max_steps(task):
    """Step limit: 1.5x the scripted expert's plan length, as RoboTwin budgets its tasks."""
    return int(1.5 * sum(n for _, n in _PLANS[task]))


# ----------------------------------------------------------------------------- visualisation
def show(task, setting="clean", seed=0, out="outputs/sim_show", image_size=256):
    """Write a PNG of the three views at reset and a GIF of an expert rollout (all three views)."""
    os.makedirs(out, exist_ok=True)
    env = TabletopEnv(task, setting, seed, image_size)
    frames = []
    ok = rollout(env, seed, on_step=lambda obs, a: frames.append(
        np.concatenate([obs["cameras"][c]["rgb"] for c in CAMERAS], 1)))
    frames.append(np.concatenate([env.observe()["cameras"][c]["rgb"] for c in CAMERAS], 1))
    png, gif = os.path.join(out, f"{task}_{setting}_{seed}.png"), os.path.join(out, f"{task}_{setting}_{seed}.gif")
    Image.fromarray(frames[0]).save(png)
    Image.fromarray(frames[0]).save(gif, save_all=True, append_images=[Image.fromarray(f) for f in frames[1:]],
                                    duration=1000 // CONTROL_HZ, loop=0)
    print(f"{env.instruction!r}: expert {'succeeded' if ok else 'failed'}; wrote {png} and {gif}")
    env.close()

