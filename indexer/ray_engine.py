"""Distributed indexing on a Ray cluster: ``python -m indexer build SRC --out DIR --engine ray``.

An :class:`~indexer.pipeline.Engine` for the one pipeline (:mod:`indexer.pipeline`), spread over a cluster with
Ray Data::

    records (driver) ─► from_items ─► map_batches(decode)  ─► map_batches(EncodeActor) ─► EncodedBatch ─► shards
                                       CPU tasks, any node     actor pool: one per GPU       (driver, in input order)
                                       read + decode + resize  (num_gpus=1), else CPU actors

- Decoding (the CPU-heavy half) runs as stateless tasks on every CPU of the cluster; the encoder lives in a pool of
  actors that each build it once: one actor per GPU (``num_gpus=1``, fp16 with ``--precision auto``) when the
  cluster has GPUs, else CPU actors (bf16). Unreadable images are recorded as skipped, never fatal.
- The driver streams the results in input order into the pipeline's shard store, so a Ray build is resumable
  exactly like a local one (rerun the command: committed shards are kept), and one FAISS index is built from all
  shards (IVF-PQ for large counts, chosen by :func:`~retrieval.index.choose_index_key`). The result equals a
  single-process build: same ids in the same order, same vectors within float tolerance.
- On a real cluster every node needs the package installed (or a ``runtime_env``) and must see the image files
  and any local weights/head files at the same paths (shared storage); the driver writes the index.

Encoder specs are sent to the workers as data (a resolved :class:`~retrieval.encoders.spec.EncoderSpec`), so named
configs of the driver need no registration there; open_clip *model* configs that exist only in the driver process
(tests, plugins) are passed along with ``open_clip_configs`` and registered in each worker.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.pipeline import EncodedBatch
from indexer.settings import IndexerSettings
from retrieval.encoders.spec import EncoderSpec
from retrieval.errors import EncoderUnavailable

if TYPE_CHECKING:
    from retrieval.datasets import ImageRecord
    from retrieval.encoders import Encoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayPlan:
    """How the job is laid out on the cluster."""

    use_gpu: bool
    actors: int
    cpus_per_actor: float
    decode_cpus: float


# ----------------------------------------------------------------------------------------------------------------
# Worker side (runs inside Ray worker processes)
# ----------------------------------------------------------------------------------------------------------------


def _register_configs(configs: dict[str, dict[str, Any]] | None) -> None:
    """Register driver-only open_clip model configs in this worker process (idempotent)."""
    if not configs:
        return
    from retrieval.encoders.factory import register_open_clip_config

    folder = Path(tempfile.mkdtemp(prefix="openclip-cfg-"))
    for name, cfg in configs.items():
        register_open_clip_config(name, cfg, folder)


def _build(spec_data: dict[str, Any], configs: dict[str, dict[str, Any]] | None) -> Encoder:
    from retrieval.encoders import build_encoder

    _register_configs(configs)
    return build_encoder(EncoderSpec(**spec_data))


def probe_encoder(spec_data: dict[str, Any], configs: dict[str, dict[str, Any]] | None) -> tuple[dict[str, Any], bytes]:
    """Build the encoder once: its identity (for the shard writer) and its image transform, pickled.

    The transform travels as bytes because unpickling it imports torchvision, which must come after
    :mod:`retrieval._torch_compat` (see :func:`_load_transform`).
    """
    import ray.cloudpickle

    from retrieval.encoders.factory import build_torch_encoder

    _register_configs(configs)
    encoder = build_torch_encoder(EncoderSpec(**spec_data))  # identity and transform only: no export, no timing
    return encoder.identity(), ray.cloudpickle.dumps(encoder.image_transform)


@functools.lru_cache(maxsize=4)
def _load_transform(blob: bytes) -> Any:
    import pickle

    from retrieval import _torch_compat  # noqa: F401  (before torchvision is imported by unpickling)

    return pickle.loads(blob)


def decode_batch(batch: dict[str, np.ndarray], transform: bytes, max_pixels: int) -> dict[str, np.ndarray]:
    """Ray Data task: ``{idx, path}`` -> ``{idx, pixels (n, 3, H, W) float32, error}``; never raises for a bad image.

    Failed images keep their row (``error`` set, pixels zero) so the driver can record them as skipped.
    """
    from retrieval.errors import BadImage
    from retrieval.images import load_image

    fn = _load_transform(transform)
    pixels: list[np.ndarray | None] = []
    errors: list[str] = []
    for path in batch["path"]:
        try:
            tensor = fn(load_image(str(path), max_pixels=max_pixels))
            pixels.append(tensor.float().numpy())
            errors.append("")
        except BadImage as exc:
            pixels.append(None)
            errors.append(str(exc) or "unreadable image")
    shape = next((p.shape for p in pixels if p is not None), (3, 1, 1))
    stacked = np.stack([p if p is not None else np.zeros(shape, np.float32) for p in pixels]).astype(np.float32)
    return {"idx": batch["idx"], "pixels": stacked, "error": np.asarray(errors, dtype=object)}


class EncodeActor:
    """Ray Data actor UDF: builds the encoder once, then ``{idx, pixels, error}`` -> ``{idx, vector, error}``."""

    def __init__(
        self,
        spec_data: dict[str, Any],
        configs: dict[str, dict[str, Any]] | None,
        threads: int,
        expected_identity: dict[str, Any] | None = None,
    ):
        import socket

        import torch

        from retrieval.errors import IndexEncoderMismatch

        if threads > 0:
            torch.set_num_threads(threads)
            spec_data = {**spec_data, "threads": spec_data.get("threads") or threads}  # ONNX Runtime's too
        self.encoder = _build(spec_data, configs)
        # A node with another version of the package (or other weight files) would encode into another space.
        if expected_identity is not None and self.encoder.identity() != expected_identity:
            raise IndexEncoderMismatch(
                f"the encoder built on {socket.gethostname()} has identity {self.encoder.identity()}, the driver's is "
                f"{expected_identity}: install the same package version and weight files on every node"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        errors = batch["error"]
        ok = np.asarray([not e for e in errors], dtype=bool)
        vectors = np.zeros((len(errors), self.encoder.dim), np.float32)
        if ok.any():
            vectors[ok] = self.encoder.encode_pixels(torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])))
        return {"idx": batch["idx"], "vector": vectors, "error": errors}


# ----------------------------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------------------------


def plan_cluster(
    resources: dict[str, float],
    spec: EncoderSpec,
    *,
    actors: int | None = None,
    cpus_per_actor: float | None = None,
) -> RayPlan:
    """Lay the job out on the cluster's ``resources`` (``ray.cluster_resources()``): a pure function, tested.

    GPUs (and a spec that allows them: device ``auto`` or ``cuda...``): one actor per GPU, one CPU each, the rest of
    the CPUs decode. No GPUs: CPU actors of ``cpus_per_actor`` CPUs (default: half the cluster, at most 8 each)
    and at least one CPU left for decoding.
    """
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    wants_gpu = spec.device == "auto" or spec.device.startswith("cuda")
    if spec.device.startswith("cuda") and gpus == 0:
        raise EncoderUnavailable(f"device {spec.device!r} was asked for but the Ray cluster has no GPU")
    if gpus and wants_gpu:
        n = actors or gpus
        return RayPlan(True, n, cpus_per_actor or 1.0, max(1.0, cpus - n * (cpus_per_actor or 1.0)))
    per = cpus_per_actor or max(1.0, min(8.0, cpus // 2))
    n = actors or max(1, int((cpus - 1) // per) if cpus > per else 1)
    return RayPlan(False, n, per, max(1.0, cpus - n * per))


def _init_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect to ``address`` or start a local instance; True when this call started Ray (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        return True
    # A local instance: workers must import this package the way the driver does (source checkout or install).
    pkg_root = str(Path(__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
    )
    return True


class RayEngine:
    """The Ray engine, used as a context manager (it connects to or starts Ray, and stops what it started)::

        with RayEngine(settings) as engine:
            build_index(src, out, settings, engine=engine)

    ``address``: a Ray cluster (``ray://...`` or ``auto``); None starts a local instance of ``num_cpus`` CPUs
    (default: all), or uses the one already initialised in this process. ``actors``/``cpus_per_actor`` override
    :func:`plan_cluster`. ``open_clip_configs``: model configs to register in every worker (name -> config).
    """

    def __init__(
        self,
        settings: IndexerSettings,
        *,
        address: str | None = None,
        actors: int | None = None,
        cpus_per_actor: float | None = None,
        num_cpus: int | None = None,
        open_clip_configs: dict[str, dict[str, Any]] | None = None,
    ):
        self.settings = settings
        self.spec: EncoderSpec = settings.encoder.spec()
        self.address = address
        self.actors = actors
        self.cpus_per_actor = cpus_per_actor
        self.num_cpus = num_cpus
        self.open_clip_configs = open_clip_configs
        self.build_info: dict[str, Any] = {"engine": "ray"}
        self._started = False
        self._plan: RayPlan | None = None
        self._identity: dict[str, Any] | None = None
        self._transform: bytes | None = None

    def __enter__(self) -> RayEngine:
        import ray

        self._started = _init_ray(self.address, self.num_cpus)
        try:
            self._plan = plan_cluster(ray.cluster_resources(), self.spec, actors=self.actors,
                                      cpus_per_actor=self.cpus_per_actor)
            log.info("ray plan: %s", self._plan)
            # The driver builds the encoder once, on its CPU, for the identity the shards are checked against and
            # for the image transform the decode tasks apply (device and precision change neither).
            self._identity, self._transform = probe_encoder(
                {**self.spec.model_dump(), "device": "cpu"}, self.open_clip_configs
            )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.build_info = {"engine": "ray", "ray_actors": self._plan.actors, "ray_gpu": self._plan.use_gpu}
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            raise RuntimeError("use RayEngine as a context manager: `with RayEngine(settings) as engine: ...`")
        return self._identity

    def encode(self, records: Sequence[ImageRecord]) -> Iterator[EncodedBatch]:
        """Decode and encode ``records`` on the cluster; batches come back in input order."""
        import ray.data

        if not records:
            return
        plan, transform = self._plan, self._transform
        if plan is None or transform is None:
            raise RuntimeError("use RayEngine as a context manager: `with RayEngine(settings) as engine: ...`")
        settings = self.settings
        batch_size = settings.batch_for("cuda" if plan.use_gpu else "cpu")
        items = [{"idx": i, "path": str(r.path)} for i, r in enumerate(records)]
        n_blocks = max(1, min(-(-len(items) // batch_size), 256))  # about one decode task per batch
        ds: Any = ray.data.from_items(items, override_num_blocks=n_blocks)
        ds.context.execution_options.preserve_order = True  # shards in input order: same rows as the local engine
        ds = ds.map_batches(
            decode_batch,
            fn_kwargs={"transform": transform, "max_pixels": settings.max_image_pixels},
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=1,
        )
        ds = ds.map_batches(
            EncodeActor,
            fn_constructor_kwargs={
                "spec_data": self.spec.model_dump(), "configs": self.open_clip_configs,
                "threads": int(plan.cpus_per_actor), "expected_identity": self._identity,
            },
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=plan.cpus_per_actor,
            num_gpus=1 if plan.use_gpu else 0,
            compute=ray.data.ActorPoolStrategy(size=plan.actors),
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            ok = [(int(i), v) for i, v, e in zip(batch["idx"], batch["vector"], batch["error"], strict=True) if not e]
            failed = [(int(i), str(e)) for i, e in zip(batch["idx"], batch["error"], strict=True) if e]
            vectors = np.stack([v for _, v in ok]).astype(np.float32) if ok else np.zeros((0, 0), np.float32)
            yield EncodedBatch([i for i, _ in ok], vectors, failed)
