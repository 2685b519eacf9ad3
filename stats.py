"""State/action statistics: per-dimension z-scoring with a std floor and a state clip (method.md §7).

Stats holds mean, std, q01 and q99 of a robot dataset's states and actions; training
(data.RobotDataset) and inference (policy.Policy) both normalise through it, and every checkpoint
carries its stats.json. source_stats() computes one dataset's Stats once and caches it as JSON.
"""
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from errors import read_json


STD_FLOOR = 1e-2  # in the raw data's units (metres, quaternion components, gripper fraction): a
# 1 cm or 0.01 quaternion-component change is at most one normalised unit. Without it a dim that
# barely varies in the demos (hand quaternions: std 1e-5..5e-3) turns a small closed-loop tilt into
# |z| ~ 1e4, and unit sampling noise on a near-constant action dim into tens of degrees
STATE_CLIP = 5.0  # normalised states are clipped to +-5: off-distribution inputs stay bounded
# (actions are regression targets and are never clipped)


@dataclass
class Stats:
    """Per-dimension mean, std, q01, q99 of state and action (lists of floats, JSON friendly).
    Both directions scale by max(std, STD_FLOOR); normalize clips the state to +-STATE_CLIP.
    Training (RobotDataset) and inference (policy.Policy) both go through them."""
    state: dict
    action: dict

    @classmethod
    def compute(cls, states, actions, where="Stats.compute"):
        """From (N, Ds) states and (N, Da) actions; `where` (the data they came from) names them in errors."""
        def one(x, key):
            x = np.asarray(x, np.float64)
            if x.ndim != 2 or not len(x):
                raise ValueError(f"{where}: {key} has shape {x.shape}; expected (frames >= 1, dims)")
            bad = np.flatnonzero(~np.isfinite(x).all(0))
            if len(bad):
                raise ValueError(f"{where}: {key} dims {bad.tolist()} hold NaN/inf; statistics need finite values")
            return {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(),
                    "q01": np.quantile(x, 0.01, axis=0).tolist(), "q99": np.quantile(x, 0.99, axis=0).tolist()}
        return cls(one(states, "state"), one(actions, "action"))

    def _check(self, where):
        """self when every statistic is a list of finite numbers, as long as the part's mean; else
        an error naming `where`, the part and the statistic."""
        for key in ("state", "action"):
            part = getattr(self, key)
            if not isinstance(part, dict) or not {"mean", "std", "q01", "q99"} <= set(part):
                raise ValueError(f"{where}: '{key}' needs the lists mean, std, q01 and q99")
            width = np.shape(part["mean"])
            for name in ("mean", "std", "q01", "q99"):
                try:
                    values = np.asarray(part[name], np.float64)
                except (TypeError, ValueError):
                    values = None
                if values is None or values.ndim != 1 or values.shape != width or not np.isfinite(values).all():
                    raise ValueError(f"{where}: '{key}.{name}' must be a list of finite numbers as long as "
                                     f"'{key}.mean', got {str(part[name])[:80]}")
        return self

    def _ms(self, key, x, where):
        s = getattr(self, key)
        if np.shape(x)[-1] != len(s["mean"]):
            raise ValueError(f"{where}: {key} has width {np.shape(x)[-1]}; the statistics expect "
                             f"{len(s['mean'])}")
        return np.asarray(s["mean"]), np.maximum(np.asarray(s["std"]), STD_FLOOR)

    def normalize(self, x, key, where="normalize"):
        mean, std = self._ms(key, x, where)
        z = (np.asarray(x, np.float64) - mean) / std
        return (np.clip(z, -STATE_CLIP, STATE_CLIP) if key == "state" else z).astype(np.float32)

    def unnormalize(self, x, key, where="unnormalize"):
        mean, std = self._ms(key, x, where)
        return (np.asarray(x, np.float64) * std + mean).astype(np.float32)

    def save(self, path):
        tmp = path + ".tmp"  # written aside, then renamed: an interrupted save leaves no truncated file
        with open(tmp, "w") as f:
            json.dump({"state": self.state, "action": self.action}, f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        d = read_json(path, "state/action statistics (stats.Stats)")
        if not isinstance(d, dict) or set(d) != {"state", "action"}:
            raise ValueError(f"{path}: expected keys 'state' and 'action', got "
                             f"{sorted(d) if isinstance(d, dict) else type(d).__name__}")
        return cls(d["state"], d["action"])._check(path)


def source_stats(source, cache_dir=None):
    """Stats of one robot dataset, cached as JSON keyed by a hash of its state/action values: next
    to the data when that folder is writable, else in `cache_dir` (default ~/.cache/posevla)."""
    states = np.concatenate([e.state for e in source.episodes])
    actions = np.concatenate([e.action for e in source.episodes])
    digest = hashlib.sha1(states.tobytes() + actions.tobytes()).hexdigest()[:16]
    folder = source.path if os.path.isdir(source.path) else os.path.dirname(source.path)
    if cache_dir is None and not os.access(folder, os.W_OK):
        cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "posevla")
    path = os.path.join(cache_dir or folder, f"posevla_stats_{digest}.json")
    if os.path.exists(path):
        return Stats.load(path)
    stats = Stats.compute(states, actions, source.path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    stats.save(path)
    return stats
