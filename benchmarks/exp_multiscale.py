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
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrieval.encoders.factory import build_torch_encoder  # noqa: E402
from trainer.activations import ActivationSplit, activation_split  # noqa: E402
from trainer.batches import TensorSplit  # noqa: E402
from trainer.config import TrainerSettings  # noqa: E402
from trainer.evaluate import load_split  # noqa: E402
from trainer.features import FeatureCache  # noqa: E402
from trainer.train import SCORE_KEYS, Trainer  # noqa: E402

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
    spec = cfg.spec()
    enc = build_torch_encoder(spec)
    cache = FeatureCache(cfg.cache_dir)
    t0 = time.perf_counter()
    a_tr = activation_split(enc, load_split(cfg.data, cfg.captions, cfg.train_split), cache, CUT)
    a_dv = activation_split(enc, load_split(cfg.data, cfg.captions, cfg.dev_split), cache, CUT)
    print(f"activations {time.perf_counter() - t0:.0f} s", flush=True)
    identity = {k: v for k, v in spec.identity().items() if k != "heads_sha256"}
    arms: dict[str, Callable[[ActivationSplit], np.ndarray]] = {"final pooled (control)": final_pooled,
                                                                "multi-scale": multi_scale}
    for i, (name, features) in enumerate(arms.items()):
        tr, dv = TensorSplit.of(a_tr.feats), TensorSplit.of(a_dv.feats)
        tr.images, dv.images = torch.from_numpy(features(a_tr)), torch.from_numpy(features(a_dv))
        result = Trainer(cfg.model_copy(update={"out": f"{cfg.out}/{i}"}), tr, dv, identity=identity).fit()
        m: Any = result.best_metrics
        row = {"dim": int(tr.images.shape[1]), "best_epoch": result.best_epoch, "score": round(result.best_score, 2),
               **{f"dev_{d}_{k}": round(m[d][k], 2) for d in ("t2i", "i2t") for k in SCORE_KEYS},
               "train_s": round(result.seconds, 1)}
        print(name, json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
