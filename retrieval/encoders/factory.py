"""The one door: :func:`build_encoder` turns an :class:`EncoderSpec` (or a spec string) into an :class:`Encoder`.

Backends
- ``open_clip``: both towers of an open_clip model (:mod:`retrieval.encoders.open_clip_backbone`).
- ``dual``: a separately pretrained image backbone (EfficientNet-Lite, :mod:`retrieval.encoders.effnet`) and text
  backbone (a sentence-transformers model, :mod:`retrieval.encoders.sentence`), joined either by trained projection
  heads (``heads=`` a checkpoint from the trainer) or, with no heads, by the zero-shot label bridge
  (:mod:`retrieval.encoders.label_bridge`).
"""

from __future__ import annotations

import copy
import logging

import torch

from retrieval.calibration import Calibration
from retrieval.encoders.backbones import ImageBackbone, TextBackbone
from retrieval.encoders.bundle import load_bundle, save_bundle
from retrieval.encoders.device import resolve_device
from retrieval.encoders.effnet import EffnetImage, build_effnet
from retrieval.encoders.encoder import Encoder
from retrieval.encoders.label_bridge import LABEL_TEMPLATES, LabelBridgeHead, class_embeddings, imagenet_classnames
from retrieval.encoders.open_clip_backbone import build_open_clip, register_open_clip_config
from retrieval.encoders.runtime import setup_runtime
from retrieval.encoders.sentence import build_sentence
from retrieval.encoders.spec import DEFAULT_TEXT_MODEL, EncoderSpec, parse_spec, weights_id
from retrieval.errors import EncoderUnavailable
from retrieval.heads import HeadPair, load_heads

__all__ = ["build_encoder", "build_torch_encoder", "class_prompt_table", "register_open_clip_config"]

log = logging.getLogger("retrieval.encoders")


def class_prompt_table() -> tuple[list[str], tuple[str, ...]]:
    """The ImageNet class names the EfficientNet classifiers predict and the prompt templates of the label bridge
    (what the trainer's class prior encodes)."""
    return imagenet_classnames(), LABEL_TEMPLATES


def build_encoder(spec: EncoderSpec | str) -> Encoder:
    """Build the encoder a spec (or a spec string, see :func:`~retrieval.encoders.spec.parse_spec`) describes, with
    each tower on the engine and precision :func:`~retrieval.encoders.runtime.setup_runtime` chooses."""
    if isinstance(spec, str):
        spec = parse_spec(spec)
    loaded = load_bundle(spec, build_torch_encoder)  # the ONNX export of an encoder built here before: ~1 s
    if loaded is not None:
        log.info("encoder %s loaded from its ONNX export: %s — image: %s; text: %s", spec.label(),
                 loaded.runtime_label(), loaded.reasons["image"], loaded.reasons["text"])
        return loaded
    encoder = setup_runtime(build_torch_encoder(spec))
    try:
        save_bundle(encoder)
    except OSError as exc:  # a read-only cache costs a full build next time, nothing more
        log.warning("cannot record the encoder for a fast load: %s", exc)
    return encoder


def build_torch_encoder(spec: EncoderSpec) -> Encoder:
    """The encoder's torch modules, float32 on the spec's device, before any engine or precision is applied."""
    device = resolve_device(spec.device)
    dtype = torch.float32
    heads: HeadPair | None = load_heads(spec.heads)[0] if spec.heads else None

    image: ImageBackbone
    text: TextBackbone
    if spec.backend == "open_clip":
        image, text = build_open_clip(spec)
        if heads is None:
            return Encoder(spec, image, text, None, None, image.out_dim, device, dtype)
    else:
        effnet = build_effnet(spec)
        sentence = build_sentence(spec)
        image, text = effnet, sentence
        if heads is None:
            sentence.to(device=device, dtype=dtype).eval()
            key = f"{spec.text_model or DEFAULT_TEXT_MODEL}|{weights_id(spec.text_model)}"
            bridge = LabelBridgeHead(copy.deepcopy(effnet.fc), class_embeddings(sentence, key))
            return Encoder(spec, effnet, sentence, bridge, None, sentence.out_dim, device, dtype)
    cfg = heads.config
    if (cfg.image_in, cfg.text_in) != (image.out_dim, text.out_dim):
        raise EncoderUnavailable(
            f"head checkpoint {spec.heads} expects features of {cfg.image_in}/{cfg.text_in} dims, "
            f"the backbones give {image.out_dim}/{text.out_dim}: it was trained for another encoder"
        )
    tail = heads.extra.get("image_tail")
    if tail is not None:  # partial unfreezing: the checkpoint carries tuned weights of the last backbone blocks
        if not isinstance(image, EffnetImage):
            raise EncoderUnavailable(f"{spec.heads} carries tuned EfficientNet blocks; the backbone is {spec.model}")
        try:
            image.load_tail(int(tail["cut"]), tail["state"])
        except (KeyError, RuntimeError) as exc:
            raise EncoderUnavailable(f"{spec.heads}: its tuned blocks do not fit {spec.model} ({exc})") from exc
    calibration = heads.extra.get("calibration")
    encoder = Encoder(spec, image, text, heads.image, heads.text, cfg.out_dim, device, dtype,
                      Calibration.from_dict(calibration) if calibration else None)
    encoder.image_tuned = tail is not None
    return encoder
