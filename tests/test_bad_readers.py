"""Bad input at the readers and the statistics (issue: bad input never trains silently, never
crashes bare): READER_CASES calls a reader (formats.py, lerobot.py, robotwin.py), a dataset item or
Stats.compute on a broken copy of a fixture; each must raise a clear exception naming the file and
what was wrong, or, with --skip-bad, warn what it left out.

Catches: NaN centres or non-positive sizes in Omni3D read in silence, a BOP image that cannot be
read aborting the whole dataset under --skip-bad, NaN LeRobot states or RoboTwin intrinsics that
reach a sample, a sample with infinite rays (zero intrinsics) that is not refused or, with
--skip-bad, not replaced by the next good one and counted, and statistics of NaN.
The command-line cases are in test_bad_input.py, whose broken-copy helpers these share.
"""
import os
import re
import shutil
import sys
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import RobotDataset  # noqa: E402
from formats import read_bop, read_omni3d  # noqa: E402
from robot_formats import open_source  # noqa: E402
from robotwin import RoboTwinSource  # noqa: E402
from stats import Stats  # noqa: E402
from test_bad_input import CASES, bad_input_lerobot, edit_json, lerobot_with, set_row  # noqa: E402
from test_formats import write_bop, write_omni3d  # noqa: E402
from test_robot_formats import write_robotwin  # noqa: E402

BEFORE = {}  # case name -> what the code did with it before this test existed (`python tests/test_bad_readers.py`)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return SimpleNamespace(lerobot=bad_input_lerobot(tmp_path_factory.mktemp("bad_readers")))


def nan_centre(tmp):
    path = write_omni3d(os.path.join(tmp, "omni"))
    edit_json(path, lambda d: d["annotations"][2]["center_cam"].__setitem__(0, float("nan")))
    return path


def negative_dimension(tmp):
    path = write_omni3d(os.path.join(tmp, "omni"))
    edit_json(path, lambda d: d["annotations"][3]["dimensions"].__setitem__(1, -0.1))
    return path


def bop_two_images_first_missing(tmp):
    """The BOP fixture with its image '1' copied as '2', then image 1's rgb file deleted."""
    root, _ = write_bop(os.path.join(tmp, "bop"))
    scene = os.path.join(root, "train_pbr", "000000")
    for name in ("scene_gt", "scene_gt_info", "scene_camera"):
        edit_json(os.path.join(scene, f"{name}.json"), lambda d: d.update({"2": d["1"]}))
    for folder, ext in (("rgb", "jpg"), ("depth", "png")):
        shutil.copy(os.path.join(scene, folder, f"000001.{ext}"), os.path.join(scene, folder, f"000002.{ext}"))
    os.remove(os.path.join(scene, "rgb", "000001.jpg"))
    return root


def zero_intrinsics(fx, tmp):
    """The head camera's K is all zeros in episode 0 (rays divide by fx = 0); episode 1 is intact."""
    def change(rows):
        for r in range(12):
            rows[r] = [0.0] * 9
    return lerobot_with(fx, tmp, "observation.intrinsics.head", change)


def nan_robotwin_intrinsics(tmp):
    root, _ = write_robotwin(os.path.join(tmp, "rt"), "release")
    with h5py.File(os.path.join(root, "data", "episode0.hdf5"), "a") as f:
        K = f["observation/head_camera/intrinsic_cv"][()]
        K[2, 0, 0] = np.nan
        f["observation/head_camera/intrinsic_cv"][...] = K
    return root


def reader(name, call, error, *text, before):
    """A reader case: call(fx, tmp) must raise `error` (or warn, for a Warning) with every regex `text`."""
    BEFORE[name] = before
    return pytest.param(call, error, text, id=name)


READER_CASES = [
    reader("Omni3D NaN centre", lambda fx, t: read_omni3d(nan_centre(t)), ValueError, r"annotations\[2\]",
           "center_cam", "NaN", before="the same ValueError (unchanged)"),
    reader("Omni3D NaN centre, --skip-bad", lambda fx, t: read_omni3d(nan_centre(t), skip_bad=True), UserWarning,
           "left out one annotation", r"annotations\[2\]", before="no skip in the reader: the whole file raised"),
    reader("Omni3D negative dimension", lambda fx, t: read_omni3d(negative_dimension(t)), UserWarning,
           "kept 3 objects", "1 annotations with a dimension <= 0", before="dropped without a word"),
    reader("BOP rgb missing", lambda fx, t: read_bop(bop_two_images_first_missing(t)), FileNotFoundError,
           "rgb/000001.png", before="the same error (unchanged)"),
    reader("BOP rgb missing, --skip-bad", lambda fx, t: read_bop(bop_two_images_first_missing(t), skip_bad=True),
           UserWarning, "1 unreadable images", "kept 1 objects in 1 images",
           before="--skip-bad did not reach the reader: the dataset aborted"),
    reader("LeRobot NaN state, --skip-bad", lambda fx, t: open_source(lerobot_with(
        fx, t, "observation.state", set_row(15, 2, float("nan"))), skip_bad=True), UserWarning,
        "kept 1 episodes, 12 frames", "1 unreadable episodes", before="trained silently on NaN"),
    reader("RoboTwin NaN intrinsics at frame 2", lambda fx, t: RoboTwinSource(nan_robotwin_intrinsics(t)).frame(
        0, 2, "head_camera"), ValueError, "intrinsic_cv' holds NaN/inf at frame 2",
        before="not checked: NaN rays in the sample"),
    reader("sample with infinite rays", lambda fx, t: RobotDataset(zero_intrinsics(fx, t), 32, chunk=4)[0],
           ValueError, "episode 0 frame 0", "'rays'", before="not checked: inf rays reached the batch"),
    reader("Stats of NaN", lambda fx, t: Stats.compute(np.array([[0.0, np.nan], [1.0, 2.0]]), np.zeros((2, 3)),
           "demo.parquet"), ValueError, r"demo.parquet: state dims \[1\]", before="NaN mean and std, every sample NaN"),
]


@pytest.mark.parametrize("call,error,text", READER_CASES)
def test_readers_refuse_or_report(fx, tmp_path, call, error, text):
    if issubclass(error, Warning):
        with pytest.warns(error) as caught:
            call(fx, str(tmp_path))
        message = "\n".join(str(w.message) for w in caught)
    else:
        with pytest.raises(error) as e:
            call(fx, str(tmp_path))
        message = str(e.value)
    for t in text:
        assert re.search(t, message), f"{t!r} not in {message!r}"


def test_skip_bad_replaces_a_non_finite_sample_and_counts_it(fx, tmp_path):
    ds = RobotDataset(zero_intrinsics(fx, str(tmp_path)), 32, chunk=4, skip_bad=True)
    with pytest.warns(UserWarning, match="skipping sample 0"):
        item = ds[0]
    assert item["skipped"] == 12 and np.isfinite(item["rays"]).all()  # the 12 frames of episode 0, then episode 1


def test_the_table_is_large_enough():
    assert len(CASES) + len(READER_CASES) >= 30


if __name__ == "__main__":  # the table of reader cases, for an issue's closing note (with test_bad_input.py's)
    for name, before in BEFORE.items():
        print(f"| {name} | {before} |")
