"""The 16-number end-effector layout every robot in this project acts in and reports its state in
(method.md §2): per arm [x, y, z, qw, qx, qy, qz, gripper], the left arm first. Positions are
world-frame metres, quaternions unit length with w first, the gripper opening in [0, 1] (1 = open).
The readers convert a robot's own layout to it (lerobot.py, robotwin.py), the tabletop world acts in it
(sim.py, expert.py), trajectory targets read the hands' poses from it (data.py) and the policy
makes predicted chunks valid in it (policy.py)."""

ARMS = ("left", "right")
PER_ARM = 8
DIM = PER_ARM * len(ARMS)
NAMES = [f"{arm}_{k}" for arm in ARMS for k in ("x", "y", "z", "qw", "qx", "qy", "qz", "gripper")]


def position(arm):
    k = PER_ARM * ARMS.index(arm)
    return slice(k, k + 3)


def quaternion(arm):
    k = PER_ARM * ARMS.index(arm)
    return slice(k + 3, k + 7)


def gripper(arm):
    return PER_ARM * ARMS.index(arm) + 7


POSITIONS = tuple(position(a) for a in ARMS)
QUATERNIONS = tuple(quaternion(a) for a in ARMS)
GRIPPERS = [gripper(a) for a in ARMS]
