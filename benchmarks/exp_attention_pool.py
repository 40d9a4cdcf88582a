"""Experiment (issue 10): attention pooling over the frozen EfficientNet-Lite0's final 7 x 7 x 1,280 map.

Caption heads (``trainer`` defaults, mlp, 256-d) over a learned single-query attention pooling of the final feature
map (the query starts at zero: uniform weights, exactly the backbone's mean pooling) against the mean pooling alone;
same trainer, data and selection (Flickr8k dev), no flip augmentation in either arm. The maps are computed once from
the trainer's cached block-11 activations through the frozen last blocks + head convolution.

    python benchmarks/exp_attention_pool.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.exp_common import activation_splits, train_arm  # noqa: E402
from trainer.activations import effnet_of  # noqa: E402
from trainer.batches import TensorSplit  # noqa: E402
from trainer.config import TrainerSettings  # noqa: E402

CUT = 11


class AttentionPool(nn.Module):
    """``(n, C, H, W)`` map -> ``(n, C)``: softmax(q . x / sqrt(C)) over the H*W positions; q = 0 is mean pooling."""

    cut = -1  # the Trainer's checkpoint records a tail's cut and state

    def __init__(self, channels: int):
        super().__init__()
        self.q = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.float().flatten(2)  # (n, C, HW)
        w = F.softmax(torch.einsum("c,nck->nk", self.q, t) / t.shape[1] ** 0.5, dim=-1)
        return (t * w[:, None, :]).sum(-1)

    def state(self) -> dict[str, torch.Tensor]:
        return {"q": self.q.detach().clone()}


@torch.no_grad()
def final_maps(encoder: Any, acts: np.ndarray, chunk: int = 128) -> np.ndarray:
    """Block-11 activations -> ``(n, 1280, 7, 7)`` float16 maps (last blocks + head convolution, before pooling)."""
    backbone: Any = effnet_of(encoder)
    net = backbone.net
    out = []
    for i in range(0, len(acts), chunk):
        x = torch.from_numpy(np.asarray(acts[i:i + chunk], np.float32)).contiguous(memory_format=torch.channels_last)
        for block in net._blocks[CUT:]:
            x = block(x)
        out.append(net._swish(net._bn1(net._conv_head(x))).half().numpy())
    return np.concatenate(out)


def main() -> int:
    torch.set_num_threads(2)
    cfg = TrainerSettings(encoder="zero-shot", precision="fp32", head="mlp", flip_aug=False, tail_lr=1e-3,
                          out="runs/exp-attention-pool")
    t0 = time.perf_counter()
    enc, a_tr, a_dv = activation_splits(cfg, CUT)
    m_tr, m_dv = final_maps(enc, a_tr.acts), final_maps(enc, a_dv.acts)
    check = np.abs(m_dv.astype(np.float32).mean((2, 3)) - a_dv.feats.images).max()
    print(f"maps {time.perf_counter() - t0:.0f} s; mean of the map vs cached pooled features: max abs diff {check:.4f}",
          flush=True)
    for i, name in enumerate(("mean pooling (control)", "attention pooling")):
        tr, dv = TensorSplit.of(a_tr.feats), TensorSplit.of(a_dv.feats)
        tail = None
        if name == "attention pooling":
            tr.pooled = tr.images  # frozen mean-pooled features: the standardisation statistics
            tr.images, dv.images = torch.from_numpy(m_tr), torch.from_numpy(m_dv)
            tail = AttentionPool(m_tr.shape[1])
        print(name, json.dumps(train_arm(cfg, f"{cfg.out}/{i}", tr, dv, tail)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
