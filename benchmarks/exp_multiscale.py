"""Experiment (issue 10): multi-scale pooling of the frozen EfficientNet-Lite0.

Caption heads (``trainer`` defaults, mlp, 256-d) over ``[final 1,280-d mean | block-11 112-d mean | block-11 112-d
max]`` against the final mean alone; same trainer, data and selection (Flickr8k dev), no flip augmentation in either
arm (the activation cache holds the centre view). Block-11 activations come from the trainer's activation cache.

    python benchmarks/exp_multiscale.py
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.exp_common import activation_splits, train_arm  # noqa: E402
from trainer.activations import ActivationSplit  # noqa: E402
from trainer.batches import TensorSplit  # noqa: E402
from trainer.config import TrainerSettings  # noqa: E402

CUT = 11


def multi_scale(a: ActivationSplit) -> np.ndarray:
    """``(n, 1280 + 2 * 112)`` float32: the final pooled features with the mean and max of block-11 activations."""
    acts = np.asarray(a.acts, np.float32)
    return np.concatenate([a.feats.images, acts.mean((2, 3)), acts.max((2, 3))], 1).astype(np.float32)


def final_pooled(a: ActivationSplit) -> np.ndarray:
    return np.asarray(a.feats.images, np.float32)


def main() -> int:
    torch.set_num_threads(2)
    cfg = TrainerSettings(encoder="zero-shot", precision="fp32", head="mlp", flip_aug=False, out="runs/exp-multiscale")
    t0 = time.perf_counter()
    _, a_tr, a_dv = activation_splits(cfg, CUT)
    print(f"activations {time.perf_counter() - t0:.0f} s", flush=True)
    arms: dict[str, Callable[[ActivationSplit], np.ndarray]] = {"final pooled (control)": final_pooled,
                                                                "multi-scale": multi_scale}
    for i, (name, features) in enumerate(arms.items()):
        tr, dv = TensorSplit.of(a_tr.feats), TensorSplit.of(a_dv.feats)
        tr.images, dv.images = torch.from_numpy(features(a_tr)), torch.from_numpy(features(a_dv))
        row = {"dim": int(tr.images.shape[1]), **train_arm(cfg, f"{cfg.out}/{i}", tr, dv)}
        print(name, json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
