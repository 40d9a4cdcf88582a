"""Architecture rules (import-linter contracts in pyproject.toml) and the lint gates, run as tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else (shutil.which(name) or name)


def test_import_contracts_hold():
    proc = subprocess.run([_tool("lint-imports")], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "broken" not in proc.stdout.split("Contracts:")[-1].replace("0 broken", "")


def test_ruff_is_clean():
    proc = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_mypy_is_clean():
    proc = subprocess.run([_tool("mypy"), "--no-incremental"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]


def _heavy_modules_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; which of torch, faiss, numpy it left in ``sys.modules``."""
    probe = code + "\nimport sys\nprint(','.join(m for m in ('torch', 'faiss', 'numpy') if m in sys.modules))\n"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [m for m in proc.stdout.strip().split(",") if m]


def test_http_layer_loads_no_torch_faiss_or_numpy():
    """The HTTP layer (routes, schemas, dependencies, settings) imports in a fresh interpreter without pulling in
    torch, faiss or numpy, even indirectly: those belong to the engine the lifespan builds."""
    assert _heavy_modules_after(
        "import service.api.deps, service.schemas, service.settings, service.errors\n"
        "from service.api.routes import admin, health, images, pages, search"
    ) == []


def test_encoder_spec_and_settings_are_torch_free():
    """Settings of every app name an encoder through the torch-free spec module."""
    assert _heavy_modules_after(
        "import retrieval.encoders, retrieval.settings\n"
        "from retrieval.encoders import parse_spec\n"
        "parse_spec('default').identity()"
    ) == []


def test_library_leaves_the_environment_alone():
    """Building an offline encoder needs no hub switch in the environment and sets none (the library used to set
    HF_HUB_OFFLINE process-wide). torch and tokenizers set their own variables at import; those are not ours."""
    code = (
        "import os, sys\n"
        "before = dict(os.environ)\n"
        "from retrieval.encoders import build_encoder\n"
        "build_encoder('zero-shot')\n"
        "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))\n"
        "print(','.join(changed))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    changed = (proc.stdout.strip().splitlines() or [""])[-1].split(",")  # an empty last line: nothing changed
    assert not [k for k in changed if k.startswith(("HF_", "TRANSFORMERS_"))], f"environment changed: {changed}"
