"""The encoder: backbones + optional heads. Every public ``encode_*`` returns L2-normalised float32 ``(n, dim)``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from retrieval.calibration import Calibration
from retrieval.encoders.backbones import ImageBackbone, TextBackbone
from retrieval.encoders.cpu import usable_cores
from retrieval.encoders.device import ConcretePrecision, TowerPlan
from retrieval.encoders.spec import EncoderSpec
from retrieval.errors import BadInput

if TYPE_CHECKING:
    from retrieval.encoders.onnx_engine import OnnxTower


class Encoder:
    """Backbones + optional heads. All public ``encode_*`` return L2-normalised float32 ``(n, dim)`` arrays.

    The trainer uses the two halves separately: ``image_features``/``text_features`` give raw backbone features
    (float32 tensors), ``project_image``/``project_text`` apply the heads and normalise.
    """

    def __init__(
        self,
        spec: EncoderSpec,
        image: ImageBackbone,
        text: TextBackbone,
        image_head: torch.nn.Module | None,
        text_head: torch.nn.Module | None,
        dim: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        calibration: Calibration | None = None,
    ):
        self.spec = spec
        #: score -> probability of relevance, shipped with the heads (None: the encoder has no calibration)
        self.calibration = calibration
        # set by from_runtime: the transform and tokenizer of an encoder loaded without its torch modules, and how
        # to build those modules when something first needs them
        self._transform: Callable[[Image.Image], torch.Tensor] | None = None
        self._tokenizer: Callable[[Sequence[str]], Any] | None = None
        self._build_modules: Callable[[], Encoder] | None = None
        self._modules_lock = threading.Lock()
        self.image_tuned = False
        self.image_backbone = image.to(device=device, dtype=dtype).eval()
        self.text_backbone = text.to(device=device, dtype=dtype).eval()
        # Heads are small: keep them in float32 for exactness.
        self.image_head = image_head.to(device).float().eval() if image_head is not None else None
        self.text_head = text_head.to(device).float().eval() if text_head is not None else None
        self.dim = dim
        self.device = device
        #: torch dtype of each backbone (what ``image_features``/``text_features`` compute in)
        self.image_dtype = dtype
        self.text_dtype = dtype
        #: ONNX Runtime runners of ``head(backbone(x))`` per tower (None: that tower runs in torch); set by
        #: :func:`retrieval.encoders.runtime.setup_runtime`
        self.image_runner: OnnxTower | None = None
        self.text_runner: OnnxTower | None = None
        #: how each tower runs, and why (see :meth:`runtime_info`)
        self.plans: dict[str, TowerPlan] = {"image": TowerPlan("torch", _precision_of(dtype)),
                                            "text": TowerPlan("torch", _precision_of(dtype))}
        self.reasons: dict[str, str] = {"image": "built directly", "text": "built directly"}
        self._lock = threading.Lock()  # torch modules are not safe to call from several threads at once
        self._tokenize_lock = threading.Lock()
        self._input_size: tuple[int, int] | None = None

    @classmethod
    def from_runtime(
        cls,
        spec: EncoderSpec,
        dim: int,
        device: torch.device,
        calibration: Calibration | None,
        transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[Sequence[str]], Any],
        image_runner: OnnxTower,
        text_runner: OnnxTower,
        plans: dict[str, TowerPlan],
        reasons: dict[str, str],
        build_modules: Callable[[], Encoder],
    ) -> Encoder:
        """An encoder whose towers are ONNX Runtime runners, loaded without its torch modules (see
        :mod:`retrieval.encoders.bundle`); ``build_modules()`` returns a torch-built encoder of the same spec when
        a torch module is first needed (``image_features``, ``text_features``, the heads...)."""
        enc = cls.__new__(cls)
        enc.spec, enc.calibration, enc.dim, enc.device = spec, calibration, dim, device
        enc._transform, enc._tokenizer, enc._build_modules = transform, tokenizer, build_modules
        enc._modules_lock = threading.Lock()
        enc._image_backbone, enc._text_backbone = None, None  # type: ignore[assignment]
        enc._image_head, enc._text_head = None, None
        enc._image_tuned = False  # read from the torch modules once built (see image_tuned)
        enc.image_dtype = enc.text_dtype = torch.float32
        enc.image_runner, enc.text_runner = image_runner, text_runner
        enc.plans, enc.reasons = dict(plans), dict(reasons)
        enc._lock, enc._tokenize_lock = threading.Lock(), threading.Lock()
        enc._input_size = None
        return enc

    # -- torch modules (built on first use for an encoder loaded from its ONNX export) --------------------------
    def _modules(self) -> None:
        with self._modules_lock:
            if self._build_modules is None:
                return
            full = self._build_modules()
            self._image_backbone, self._text_backbone = full.image_backbone, full.text_backbone
            self._image_head, self._text_head = full.image_head, full.text_head
            self._image_tuned = full.image_tuned
            self._build_modules = None

    @property
    def image_tuned(self) -> bool:
        """True when the head checkpoint replaced backbone weights (partial unfreezing): raw image features then
        depend on the heads file, and feature caches must key on it. Builds the torch modules of an encoder loaded
        from its ONNX export (only they can tell)."""
        if self._build_modules is not None:
            self._modules()
        return self._image_tuned

    @image_tuned.setter
    def image_tuned(self, value: bool) -> None:
        self._image_tuned = value

    @property
    def image_backbone(self) -> ImageBackbone:
        if self._build_modules is not None:
            self._modules()
        return self._image_backbone  # type: ignore[return-value]

    @image_backbone.setter
    def image_backbone(self, module: ImageBackbone) -> None:
        self._image_backbone = module

    @property
    def text_backbone(self) -> TextBackbone:
        if self._build_modules is not None:
            self._modules()
        return self._text_backbone  # type: ignore[return-value]

    @text_backbone.setter
    def text_backbone(self, module: TextBackbone) -> None:
        self._text_backbone = module

    @property
    def image_head(self) -> torch.nn.Module | None:
        if self._build_modules is not None:
            self._modules()
        return self._image_head

    @image_head.setter
    def image_head(self, module: torch.nn.Module | None) -> None:
        self._image_head = module

    @property
    def text_head(self) -> torch.nn.Module | None:
        if self._build_modules is not None:
            self._modules()
        return self._text_head

    @text_head.setter
    def text_head(self, module: torch.nn.Module | None) -> None:
        self._text_head = module

    def tokenize(self, texts: Sequence[str]) -> Any:
        """The text tower's input for ``texts`` (the backbone's tokenizer, or its fast equivalent)."""
        if self._tokenizer is not None:
            return self._tokenizer(texts)
        return self.text_backbone.tokenize(texts)

    @property
    def dtype(self) -> torch.dtype:
        """The image backbone's torch dtype (the trainer's feature cache records it)."""
        return self.image_dtype

    def allow_parallel_calls(self, n: int, lone_threads: int | None = None) -> None:
        """Prepare for up to ``n`` encoder calls at once (a server running several batches): ONNX Runtime towers
        get ``n`` sessions each, and with ``lone_threads`` above the spec's intra-op threads one more session with
        that many, which a call takes when it runs alone (a server's lone query then uses every core). Torch
        towers stay serialised by a lock."""
        for runner in (self.image_runner, self.text_runner):
            if runner is not None:
                runner.ensure_sessions(n)
                if lone_threads is not None and lone_threads > (self.spec.threads or usable_cores()):
                    runner.ensure_lone_session(lone_threads)

    def runtime_info(self) -> dict[str, Any]:
        """``{"image": {"engine", "precision", "reason"}, "text": {...}}``: what the index manifest records."""
        return {kind: {"engine": plan.engine, "precision": plan.precision, "reason": self.reasons.get(kind, "")}
                for kind, plan in self.plans.items()}

    def runtime_label(self) -> str:
        """``image onnx fp32, text onnx fp32`` (for logs)."""
        return ", ".join(f"{kind} {plan.label()}" for kind, plan in self.plans.items())

    # -- identity ------------------------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What the manifest stores and the searcher compares (see :meth:`EncoderSpec.identity`), plus ``dim``."""
        return {**self.spec.identity(), "dim": self.dim}

    @property
    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> pixel tensor; picklable, for DataLoader workers."""
        return self._transform if self._transform is not None else self.image_backbone.transform

    @property
    def input_size(self) -> tuple[int, int]:
        """``(height, width)`` of the pixels ``image_transform`` produces (found once by transforming a blank
        image)."""
        if self._input_size is None:
            pixels = self.image_transform(Image.new("RGB", (64, 48)))
            self._input_size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
        return self._input_size

    def decode_draft(self) -> tuple[int, int]:
        """``(width, height)`` to give :func:`~retrieval.images.load_image` as ``draft``: twice the input size, so
        the JPEG decoder's downscaling never costs detail the resize would keep."""
        h, w = self.input_size
        return (2 * w, 2 * h)

    # -- raw features --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(n, 3, H, W)`` pixels -> ``(n, d_img_raw)`` float32 backbone features (no head, not normalised)."""
        with self._lock:
            return self.image_backbone(pixels.to(self.device, self.image_dtype)).float()

    @torch.inference_mode()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """``n`` strings -> ``(n, d_txt_raw)`` float32 backbone features."""
        check_texts(texts)
        with self._lock:
            return self.text_backbone(self.text_backbone.tokenize(texts)).float()

    # -- heads ---------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def project_image(self, feats: torch.Tensor) -> np.ndarray:
        """Raw image features -> normalised ``(n, dim)`` float32 array."""
        out = self.image_head(feats.to(self.device).float()) if self.image_head is not None else feats
        return F.normalize(out.float(), dim=-1).cpu().numpy().astype(np.float32, copy=False)

    @torch.inference_mode()
    def project_text(self, feats: torch.Tensor) -> np.ndarray:
        """Raw text features -> normalised ``(n, dim)`` float32 array."""
        out = self.text_head(feats.to(self.device).float()) if self.text_head is not None else feats
        return F.normalize(out.float(), dim=-1).cpu().numpy().astype(np.float32, copy=False)

    # -- end to end ----------------------------------------------------------------------------------------------
    def encode_pixels(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        """``(n, 3, H, W)`` preprocessed float32 pixels -> ``(n, dim)`` float32, L2-normalised."""
        if pixels.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        if self.image_runner is not None:
            return l2_normalize(self.image_runner(pixels))
        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(pixels)
        return self.project_image(self.image_features(pixels))

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> ``(n, dim)`` float32, L2-normalised."""
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.encode_pixels(torch.stack([self.image_transform(im) for im in images]))

    def text_truncation(self, texts: Sequence[str]) -> list[int | None]:
        """For each text: the model's token limit when the text is longer than that (only that many tokens are
        encoded, the rest is cut off), else None. Texts too short to reach the limit are not tokenised: every
        token covers at least one UTF-8 byte, and the special tokens are fewer than :data:`SPECIAL_TOKEN_ALLOWANCE`."""
        check_texts(texts)
        fast: Any = self._tokenizer
        from_export = fast is not None and hasattr(fast, "truncated")  # no torch modules needed
        limit = int(fast.max_length) if from_export else self.text_backbone.token_limit()
        if limit is None:
            return [None] * len(texts)
        long = [i for i, t in enumerate(texts) if len(t.encode("utf-8")) + SPECIAL_TOKEN_ALLOWANCE > limit]
        out: list[int | None] = [None] * len(texts)
        if not long:
            return out
        if from_export:
            with self._tokenize_lock:
                cut = fast.truncated([texts[i] for i in long])
        else:
            with self._lock:  # tokenizers are not all safe to call from several threads at once
                counts = [self.text_backbone.token_count(texts[i]) for i in long]
            cut = [n is not None and n > limit for n in counts]
        for i, c in zip(long, cut, strict=True):
            out[i] = limit if c else None
        return out

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> ``(n, dim)`` float32, L2-normalised."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        if self.text_runner is not None:
            check_texts(texts)
            with self._tokenize_lock:  # Hugging Face fast tokenizers raise "Already borrowed" when shared by threads
                tokens = self.tokenize(texts)
            return l2_normalize(self.text_runner(tokens))
        return self.project_text(self.text_features(texts))


#: More than the special tokens any supported tokenizer adds to a text ([CLS]/[SEP], <start>/<end>).
SPECIAL_TOKEN_ALLOWANCE = 8


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``(n, d)`` scaled to unit length (float32; an all-zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _precision_of(dtype: torch.dtype) -> ConcretePrecision:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")  # type: ignore[return-value]


def check_texts(texts: Sequence[str]) -> None:
    """:class:`BadInput` unless ``texts`` is a list of strings (a bare string is refused)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise BadInput("texts must be a list of strings")
