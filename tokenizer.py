"""Pose tuples <-> target text, and the pose tokens of the text tokenizer (method.md §3).

Reading order:
  1. rotation helpers (Euler R = Rz(yaw) Ry(pitch) Rx(roll), quaternions [qw, qx, qy, qz]);
  2. PoseBins: non-uniform translation/size bins fitted as percentiles of the training annotations;
  3. the token strings;
  4. PoseTokenizer: ObjectPose / Waypoint -> text, and text -> Decoded (never raises);
  5. extend_tokenizer / build_tiny_tokenizer: the Hugging Face side.

Target text, exactly (one view shown; views follow each other with nothing in between):
    <image0> red mug<loc0412><loc0530><transXY0812><transXY1030><transZ0400><size0101><size0090>
    <size0101><rot180><rot175><rot270>; blue bowl<loc...>...<rot...>;</image0><image1></image1>
(without the line break). Spacing rule: exactly one space before every name (after `<image{i}>` and
after each `;`) and no other whitespace. The space makes a name split into the same word pieces as
in the prompt "detect the red mug" (SentencePiece `▁red ▁mug`, byte-level BPE `Ġred Ġmug`), so the
model can copy the class name from the prompt. Every tuple ends with `;`. An empty view is
`<image{i}></image{i}>`, a negative view `<image{i}> red mug<no_object></image{i}>`. Trajectory
tuples (`left arm 0`, ...) have a 2-token (u, v) anchor and no size tokens.
"""
import json
import re
from dataclasses import dataclass, field

import numpy as np

from errors import read_json

N_LOC = 1024     # PaliGemma's <loc0000>..<loc1023>
N_ROT = 360      # 1 degree per bin over [-pi, pi)
NO_OBJECT = "<no_object>"  # a negative view's answer; the tiny VLM's background patches become its row
MAX_VIEWS = 16   # decode ignores view indices beyond this (guards against garbage like <image999>)
# Used only when fitting without sizes (trajectory-only data never emits size tokens): tabletop range.
DEFAULT_SIZE_RANGE = (0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Rotations (vectorised over leading axes; model/data/eval code reuses these)

def euler_to_matrix(euler):
    """(..., 3) [roll, pitch, yaw] -> (..., 3, 3) R = Rz(yaw) @ Ry(pitch) @ Rx(roll)."""
    e = np.asarray(euler, dtype=np.float64)
    cr, cp, cy = np.cos(e[..., 0]), np.cos(e[..., 1]), np.cos(e[..., 2])
    sr, sp, sy = np.sin(e[..., 0]), np.sin(e[..., 1]), np.sin(e[..., 2])
    R = np.stack([cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr,
                  sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr,
                  -sp, cp * sr, cp * cr], axis=-1)
    return R.reshape(e.shape[:-1] + (3, 3))


def matrix_to_euler(R):
    """(..., 3, 3) -> (..., 3) [roll, pitch, yaw], pitch in [-pi/2, pi/2].

    At gimbal lock (cos(pitch) ~ 0) only yaw -/+ roll is defined: roll is set to 0 and yaw carries
    the whole in-plane angle, so euler_to_matrix(matrix_to_euler(R)) == R there too.
    """
    R = np.asarray(R, dtype=np.float64)
    cp = np.hypot(R[..., 0, 0], R[..., 1, 0])
    pitch = np.arctan2(-R[..., 2, 0], cp)
    locked = cp < 1e-9
    roll = np.where(locked, 0.0, np.arctan2(R[..., 2, 1], R[..., 2, 2]))
    yaw = np.where(locked, np.arctan2(-R[..., 0, 1], R[..., 1, 1]), np.arctan2(R[..., 1, 0], R[..., 0, 0]))
    return np.stack([roll, pitch, yaw], axis=-1)


def quat_to_matrix(q):
    """(..., 4) [qw, qx, qy, qz] (normalised here) -> (..., 3, 3)."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    R = np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                  2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                  2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], axis=-1)
    return R.reshape(q.shape[:-1] + (3, 3))


def matrix_to_quat(R):
    """(..., 3, 3) -> (..., 4) [qw, qx, qy, qz] with qw >= 0 (Shepperd: uses the largest of
    4w^2, 4x^2, 4y^2, 4z^2 so it stays accurate for every rotation, including 180 degrees)."""
    R = np.asarray(R, dtype=np.float64)
    m = lambda i, j: R[..., i, j]
    cands = np.stack([  # row k is proportional to q, scaled by 4 * q_k
        np.stack([1 + m(0, 0) + m(1, 1) + m(2, 2), m(2, 1) - m(1, 2), m(0, 2) - m(2, 0), m(1, 0) - m(0, 1)], -1),
        np.stack([m(2, 1) - m(1, 2), 1 + m(0, 0) - m(1, 1) - m(2, 2), m(0, 1) + m(1, 0), m(0, 2) + m(2, 0)], -1),
        np.stack([m(0, 2) - m(2, 0), m(0, 1) + m(1, 0), 1 - m(0, 0) + m(1, 1) - m(2, 2), m(1, 2) + m(2, 1)], -1),
        np.stack([m(1, 0) - m(0, 1), m(0, 2) + m(2, 0), m(1, 2) + m(2, 1), 1 - m(0, 0) - m(1, 1) + m(2, 2)], -1),
    ], axis=-2)                                                                        # (..., 4, 4)
    best = np.argmax(np.diagonal(cands, axis1=-2, axis2=-1), axis=-1)                  # (...,)
    q = np.take_along_axis(cands, best[..., None, None], axis=-2)[..., 0, :]           # (..., 4)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    return np.where(q[..., :1] < 0, -q, q)



def nlerp(q0, q1, f):
    """Normalised lerp from q0 to q1 over (..., 4), q1 flipped into q0's hemisphere so either sign
    works. Every interpolation of commanded poses uses it (simulator sub-steps, the scripted expert,
    the policy's chunk expansion), so demonstrations and policy move between poses the same way."""
    q1 = np.where(np.sum(q0 * q1, -1, keepdims=True) < 0, -q1, q1)
    q = (1 - f) * q0 + f * q1
    return q / np.linalg.norm(q, axis=-1, keepdims=True)

# ----------------------------------------------------------------------------------------------
# Non-uniform translation / size bins

def _percentile_edges(values, n_bins, what):
    """n_bins + 1 strictly increasing edges at the 0..100 percentiles of `values`.

    Repeated values give repeated percentiles; those edges are pushed up by a tiny step so every
    bin has positive width (such bins then hold just that one value, which is what the data says).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError(f"PoseBins.fit: no {what} values to fit bin edges on")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"PoseBins.fit: {what} values contain NaN/inf (filter missing annotations first)")
    edges = np.percentile(v, np.linspace(0.0, 100.0, n_bins + 1))
    step = 1e-9 * max(edges[-1] - edges[0], 1.0)
    for i in range(1, len(edges)):
        if edges[i] <= edges[i - 1]:
            edges[i] = edges[i - 1] + step
    return edges


@dataclass(eq=False)
class PoseBins:
    """Bin edges (n_bins + 1 each): tx and ty pooled ("xy"), tz ("z"), the three sizes pooled ("size")."""
    xy: np.ndarray
    z: np.ndarray
    size: np.ndarray

    KINDS = ("xy", "z", "size")

    def __post_init__(self):
        for kind in self.KINDS:
            e = np.asarray(getattr(self, kind), dtype=np.float64)
            if e.ndim != 1 or len(e) != len(self.xy) or len(e) < 2:
                raise ValueError(f"PoseBins.{kind}: expected {len(self.xy)} edges (1-D), got shape {e.shape}")
            if not (np.all(np.isfinite(e)) and np.all(np.diff(e) > 0)):
                raise ValueError(f"PoseBins.{kind}: edges must be finite and strictly increasing")
            setattr(self, kind, e)
        if self.n_bins > 10000:
            raise ValueError(f"PoseBins: {self.n_bins} bins do not fit the 4-digit token names")

    @property
    def n_bins(self):
        return len(self.xy) - 1

    @classmethod
    def fit(cls, translations, sizes=None, n_bins=2048):
        """translations (N, 3) and sizes (N, 3) metres (camera frame); 2048 bins in the full model."""
        t = np.asarray(translations, dtype=np.float64)
        if t.ndim != 2 or t.shape[1] != 3:
            raise ValueError(f"PoseBins.fit: translations must be (N, 3), got {t.shape}")
        if n_bins < 1:
            raise ValueError(f"PoseBins.fit: n_bins must be >= 1, got {n_bins}")
        if sizes is None:
            size = np.linspace(*DEFAULT_SIZE_RANGE, n_bins + 1)
        else:
            s = np.asarray(sizes, dtype=np.float64)
            if s.ndim != 2 or s.shape[1] != 3:
                raise ValueError(f"PoseBins.fit: sizes must be (N, 3), got {s.shape}")
            size = _percentile_edges(s, n_bins, "size")
        return cls(_percentile_edges(t[:, :2], n_bins, "tx/ty"), _percentile_edges(t[:, 2], n_bins, "tz"), size)

    def encode(self, kind, values):
        """Values -> bin indices; values outside the fitted range go to the end bins."""
        e = getattr(self, kind)
        return np.clip(np.searchsorted(e, np.asarray(values, dtype=np.float64), side="right") - 1, 0, self.n_bins - 1)

    def decode(self, kind, index):
        """Bin indices -> bin midpoints."""
        e = getattr(self, kind)
        i = np.asarray(index)
        return (e[i] + e[i + 1]) / 2

    def save(self, path):
        # json writes floats with repr(), which reads back to the identical float64.
        with open(path, "w") as f:
            json.dump({"n_bins": self.n_bins, **{k: getattr(self, k).tolist() for k in self.KINDS}}, f)

    @classmethod
    def load(cls, path):
        d = read_json(path, "pose bin edges (PoseBins.save, next to every checkpoint)")
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object with 'xy', 'z', 'size' edge lists")
        missing = [k for k in cls.KINDS if k not in d]
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}; expected 'xy', 'z', 'size' edge lists")
        try:
            return cls(*(np.asarray(d[k], dtype=np.float64) for k in cls.KINDS))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: bad bin edges: {err}") from None


# ----------------------------------------------------------------------------------------------
# Token strings

def loc_tokens():
    return [f"<loc{i:04d}>" for i in range(N_LOC)]


def value_token_groups(bins):
    """The token groups that each stand for one quantized value: <loc>, then each pose quantity's
    bins. model.decode_step lets a group compete as one token."""
    n = bins.n_bins
    return [loc_tokens()] + [[f"<{kind}{i:04d}>" for i in range(n)] for kind in ("transXY", "transZ", "size")] + [
        [f"<rot{i:03d}>" for i in range(N_ROT)]]


def pose_tokens(bins, n_views):
    """Every token the pose text needs beyond PaliGemma's vocabulary (which has the <loc> tokens), in
    a fixed order: the view marks, <no_object>, then the pose bins of value_token_groups."""
    return ([f"<image{i}>" for i in range(n_views)] + [f"</image{i}>" for i in range(n_views)]
            + [NO_OBJECT] + [t for group in value_token_groups(bins)[1:] for t in group])


# ----------------------------------------------------------------------------------------------
# Encoding and decoding

@dataclass
class ObjectPose:
    name: str          # plain English category, e.g. "red mug"
    box2d: tuple       # (x1, y1, x2, y2) pixels in the (letterboxed) view
    t: np.ndarray      # (3,) metres, camera frame
    size: np.ndarray   # (3,) full extents along the object's axes, metres
    R: np.ndarray      # (3, 3) object -> camera


@dataclass
class Waypoint:
    name: str          # "left arm 0", ...
    uv: np.ndarray     # (2,) projected pixel in the (letterboxed) view
    t: np.ndarray      # (3,) metres, camera frame
    R: np.ndarray      # (3, 3) end effector -> camera


@dataclass
class DecodedTuple:
    """An object (size given), a trajectory waypoint (size None) or a 2D box (t None: encode_boxes)."""
    name: str
    anchor: np.ndarray        # (2,) (u, v) or (4,) (x1, y1, x2, y2) pixels
    t: np.ndarray | None      # (3,); None for 2D box tuples
    size: np.ndarray | None   # (3,); None for trajectory and 2D box tuples
    quat: np.ndarray | None   # (4,) [qw, qx, qy, qz]; None for 2D box tuples
    euler: np.ndarray | None  # (3,) roll, pitch, yaw (bin centres); None for 2D box tuples


@dataclass
class Decoded:
    views: list = field(default_factory=list)      # per view: list[DecodedTuple]
    negative: list = field(default_factory=list)   # per view: True if the view said <no_object>
    n_rejected: int = 0                            # fragments that did not parse


_MARK = re.compile(r"<(/?)image(\d{1,3})>")
_TOKEN = re.compile(r"<(loc|transXY|transZ|size|rot)(\d+)>")
_FRAGMENT = re.compile(r"([^<>]*?)((?:<[A-Za-z]+\d+>)+)")
_NEGATIVE = re.compile(r"([^<>]*?)" + NO_OBJECT)
_DIGITS = {"loc": 4, "transXY": 4, "transZ": 4, "size": 4, "rot": 3}


class PoseTokenizer:
    """`anchor` is how object tuples are written (§3.2: "center", the paper's; "box", the released
    code's). Decoding reads either, since the number of <loc> tokens says which."""

    def __init__(self, bins: PoseBins, image_size: int, anchor: str = "center"):
        if anchor not in ("center", "box"):
            raise ValueError(f"anchor must be 'center' or 'box', got {anchor!r}")
        self.bins, self.image_size, self.anchor = bins, int(image_size), anchor

    # --- encoding ------------------------------------------------------------------------------
    @staticmethod
    def _name(name):
        clean = " ".join(str(name).split())
        if not clean or any(c in clean for c in "<>;"):
            raise ValueError(f"name {name!r}: must be non-empty plain text without '<', '>' or ';'")
        return clean

    def _locs(self, pixels):
        idx = np.clip(np.floor(np.asarray(pixels, dtype=np.float64) / self.image_size * N_LOC), 0, N_LOC - 1)
        return "".join(f"<loc{int(i):04d}>" for i in idx)

    def _pose(self, t, R, size=None):
        t = np.asarray(t, dtype=np.float64)
        R = np.asarray(R, dtype=np.float64)
        if t.shape != (3,) or R.shape != (3, 3) or not (np.all(np.isfinite(t)) and np.all(np.isfinite(R))):
            raise ValueError(f"pose: expected finite t (3,) and R (3, 3), got {t.shape} and {R.shape}")
        if abs(np.linalg.det(R) - 1) > 1e-3:
            raise ValueError(f"pose: R is not a rotation (det {np.linalg.det(R):.4f})")
        xy, z = self.bins.encode("xy", t[:2]), self.bins.encode("z", t[2])
        text = f"<transXY{xy[0]:04d}><transXY{xy[1]:04d}><transZ{int(z):04d}>"
        if size is not None:
            s = np.asarray(size, dtype=np.float64)
            if s.shape != (3,) or not np.all(np.isfinite(s)):
                raise ValueError(f"pose: expected a finite size (3,), got {s.shape}")
            text += "".join(f"<size{i:04d}>" for i in self.bins.encode("size", s))
        rot = np.floor((matrix_to_euler(R) + np.pi) / (2 * np.pi) * N_ROT).astype(int) % N_ROT
        return text + "".join(f"<rot{i:03d}>" for i in rot)

    def _object(self, obj: ObjectPose):
        x1, y1, x2, y2 = (float(v) for v in obj.box2d)
        anchor = [(x1 + x2) / 2, (y1 + y2) / 2] if self.anchor == "center" else [x1, y1, x2, y2]
        return f" {self._name(obj.name)}{self._locs(anchor)}{self._pose(obj.t, obj.R, obj.size)};"

    def encode_objects(self, views):
        """views: list (per camera) of lists of ObjectPose -> target text; objects sorted near to far."""
        return self._near_to_far(views, self._object)

    def encode_boxes(self, views):
        """The semantic baseline's target: names and 2D boxes (x1, y1, x2, y2 as <loc> tokens) with
        no pose, the "VQA-style" knowledge of a detection-trained VLM; same views and order as
        encode_objects, so only the pose information differs."""
        return self._near_to_far(views, lambda o: f" {self._name(o.name)}{self._locs(o.box2d)};")

    @staticmethod
    def _near_to_far(views, tuple_text):
        return "".join(f"<image{i}>" + "".join(tuple_text(o) for o in sorted(objs, key=lambda o: float(o.t[2])))
                       + f"</image{i}>" for i, objs in enumerate(views))

    def encode_negative(self, class_name, n_views):
        name = self._name(class_name)
        return "".join(f"<image{i}> {name}{NO_OBJECT}</image{i}>" for i in range(n_views))

    def encode_trajectory(self, views):
        """views: list (per camera) of lists of Waypoint, kept in the given (temporal) order."""
        return "".join(f"<image{i}>" + "".join(f" {self._name(w.name)}{self._locs(w.uv)}{self._pose(w.t, w.R)};"
                                               for w in wps) + f"</image{i}>" for i, wps in enumerate(views))

    # --- decoding ------------------------------------------------------------------------------
    def decode(self, text, n_views=None) -> Decoded:
        """Parse target text; never raises. n_views fixes len(views) (else 1 + the largest index seen)."""
        limit = MAX_VIEWS if n_views is None else min(int(n_views), MAX_VIEWS)
        tuples, negative, seen = {}, set(), set()
        out = Decoded()
        current, pos = None, 0
        text = text if isinstance(text, str) else ""
        for m in _MARK.finditer(text):
            self._parse_span(text[pos:m.start()], current, tuples, negative, out)
            pos, idx = m.end(), int(m.group(2))
            if m.group(1):  # closing marker; a stray or mismatched one is one rejection
                out.n_rejected += current is None or 0 <= current != idx
                current = None
            elif idx < limit:
                current = idx
                seen.add(idx)
            else:  # a view we cannot hold: one rejection, and its content counts as rejected
                out.n_rejected += 1
                current = -1
        self._parse_span(text[pos:], current, tuples, negative, out)
        n = n_views if n_views is not None else (max(seen) + 1 if seen else 0)
        out.views = [tuples.get(i, []) for i in range(n)]
        out.negative = [i in negative for i in range(n)]
        return out

    def _parse_span(self, span, view, tuples, negative, out):
        for frag in span.split(";"):
            frag = frag.strip()
            if not frag:
                continue
            if view is None or view < 0:
                out.n_rejected += 1
            elif (neg := _NEGATIVE.fullmatch(frag)) and neg.group(1).strip():
                negative.add(view)
            elif (tup := self._parse_tuple(frag)) is not None:
                tuples.setdefault(view, []).append(tup)
            else:
                out.n_rejected += 1

    def _parse_tuple(self, frag):
        m = _FRAGMENT.fullmatch(frag)
        if m is None or not m.group(1).strip():
            return None
        toks = _TOKEN.findall(m.group(2))
        if "".join(f"<{k}{d}>" for k, d in toks) != m.group(2):
            return None  # an unknown token in the run
        if any(len(d) != _DIGITS[k] for k, d in toks):
            return None
        kinds, idx = [k for k, _ in toks], [int(d) for _, d in toks]
        if kinds == ["loc"] * 4:  # a 2D box (encode_boxes)
            box = (np.array(idx, dtype=np.float64) + 0.5) / N_LOC * self.image_size
            return DecodedTuple(m.group(1).strip(), box, None, None, None, None)
        n_loc = next((i for i, k in enumerate(kinds) if k != "loc"), len(kinds))  # the text says which anchor
        if n_loc not in ((2, 4) if "size" in kinds else (2,)):
            return None
        body = ["transXY", "transXY", "transZ"] + (["size"] * 3 if "size" in kinds else []) + ["rot"] * 3
        if kinds != ["loc"] * n_loc + body:
            return None
        limits = {"loc": N_LOC, "rot": N_ROT, "transXY": self.bins.n_bins, "transZ": self.bins.n_bins,
                  "size": self.bins.n_bins}
        if any(i >= limits[k] for k, i in zip(kinds, idx)):
            return None
        anchor = (np.array(idx[:n_loc], dtype=np.float64) + 0.5) / N_LOC * self.image_size
        rest = idx[n_loc:]
        t = np.concatenate([self.bins.decode("xy", rest[:2]), self.bins.decode("z", rest[2:3])])
        size = self.bins.decode("size", rest[3:6]) if "size" in kinds else None
        euler = -np.pi + (np.array(rest[-3:], dtype=np.float64) + 0.5) * (2 * np.pi / N_ROT)
        return DecodedTuple(m.group(1).strip(), anchor, t, size, matrix_to_quat(euler_to_matrix(euler)), euler)


# ----------------------------------------------------------------------------------------------
# Hugging Face tokenizers

def extend_tokenizer(hf_tokenizer, bins, n_views):
    """Add the pose tokens (and PaliGemma's <loc> tokens if missing) to any HF tokenizer; returns
    how many were added. They are atomic added tokens (never split, matched on the raw text) but
    not "special", so `decode(ids, skip_special_tokens=True)` drops only pad/bos/eos and keeps the
    pose text intact."""
    from tokenizers import AddedToken

    vocab = hf_tokenizer.get_vocab()
    new = [t for t in loc_tokens() + pose_tokens(bins, n_views) if t not in vocab]
    if not new:
        return 0
    return hf_tokenizer.add_tokens([AddedToken(t, special=False, normalized=False, lstrip=False, rstrip=False,
                                               single_word=False) for t in new])


def build_tiny_tokenizer(save_dir=None, vocab_size=2048):
    """Offline byte-level BPE text tokenizer for the tiny configuration.

    Ids 0-3 are <pad>, <eos>, <bos>, <unk> (Gemma's order), then the BPE vocabulary (at most
    vocab_size ids in all; the built-in corpus gives about 1600), then PaliGemma's
    <loc0000>..<loc1023> as added tokens (like PaliGemma: after the text vocabulary). No
    post-processor: nothing is added automatically; model/data code places <bos>/<eos> itself.
    Byte-level without a prefix space, so any text round-trips exactly.
    Returns a transformers.PreTrainedTokenizerFast; with save_dir it is also saved there
    (save_pretrained layout, reloadable with AutoTokenizer.from_pretrained).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from corpus import tiny_corpus

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in loc_tokens()])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                 unk_token="<unk>", clean_up_tokenization_spaces=False)
    if save_dir is not None:
        hf.save_pretrained(save_dir)
    return hf
