"""Print the requirement lines an image installs: pyproject's dependencies plus those of the given extras.

    python docker/requirements.py cpu          # -> one requirement per line (torch/torchvision pins included)

Read by both Dockerfiles (the dependency layer, rebuilt only when pyproject.toml changes) and by
docker/offline/wheelhouse.sh, so the wheelhouse holds exactly what the image installs. Standard library only: it
runs on the bare base image before anything is installed.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """Dependency strings of ``pyproject`` plus those of ``extras``; an unknown extra raises ``KeyError``."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise KeyError(f"no such extra in {pyproject}: {', '.join(unknown)} (known: {', '.join(sorted(optional))})")
    return list(project["dependencies"]) + [d for e in extras for d in optional[e]]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("extras", nargs="?", default="", help="comma-separated extras, e.g. cpu or gpu")
    p.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = p.parse_args(argv)
    try:
        reqs = requirements(args.pyproject, [e for e in args.extras.split(",") if e])
    except (OSError, KeyError) as exc:
        p.error(str(exc))
    print("\n".join(reqs))


if __name__ == "__main__":
    main()
