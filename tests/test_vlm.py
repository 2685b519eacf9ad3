"""vlm.py: the tiny VLM's dense vision targets and objective."""
import numpy as np
import torch

import vlm
from tokenizer import ObjectPose


def obj(name, box, z):
    return ObjectPose(name, box, np.array([0.0, 0.0, z]), np.full(3, 0.05), np.eye(3))


def test_patch_targets_hand_computed():
    # 28 px image, 14 px patches: centres at 6.5 and 20.5. A far box over the left column and a near
    # box over the top row: the top-left patch belongs to the near one.
    far, near = obj("red cube", (0, 0, 10, 27), 2.0), obj("blue can", (0, 0, 27, 10), 1.0)
    cls, offset, log_depth = vlm.patch_targets([far, near], 28, 14)
    assert cls.tolist() == [2, 2, 1, 0]  # row-major: (0,0) near, (0,1) near, (1,0) far, (1,1) none
    np.testing.assert_allclose(offset[0], [(13.5 - 6.5) / 28, (5 - 6.5) / 28], atol=1e-6)
    np.testing.assert_allclose(offset[1], [(13.5 - 20.5) / 28, (5 - 6.5) / 28], atol=1e-6)
    np.testing.assert_allclose(offset[2], [(5 - 6.5) / 28, (13.5 - 20.5) / 28], atol=1e-6)
    np.testing.assert_allclose(log_depth, [0.0, 0.0, np.log(2.0), 0.0], atol=1e-6)
    assert not offset[3].any()


def test_dense_loss_rewards_the_right_words():
    cfg = vlm.VisionConfig()
    words = torch.zeros(1, 2, 3)
    words[0, 0, [0, 2]] = 1.0                                                    # patch 0: words 0 and 2
    feats = torch.eye(2)[None]                                                   # (1, 2, 2) one-hot patches
    head = torch.nn.Linear(2, 3 + 3, bias=False)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[[0, 2], 0] = 9.0                                             # patch 0 -> words 0, 2
        head.weight[:3, 1] = -9.0                                                # patch 1 -> no word
    zeros = torch.zeros(1, 2, 2), torch.zeros(1, 2)
    good, recall, false_bg = vlm.dense_loss(head, feats, words, *zeros, cfg)
    assert recall.item() == 1.0 and false_bg.item() == 0.0
    with torch.no_grad():
        head.weight[[0, 2], 0] = -9.0                                            # now wrong on patch 0
    bad, recall, _ = vlm.dense_loss(head, feats, words, *zeros, cfg)
    assert recall.item() == 0.0 and bad.item() > good.item() + 5
