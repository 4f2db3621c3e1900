"""Build the wheelhouse the GPU check installs offline (``make gpu-wheelhouse``).

The GPU machine has Python 3.12 with torch and transformers, and reaches no
package index. This gathers, as wheels for that Python: Commutator's packages
(built from this checkout), the rest of its runtime dependencies at the versions
of uv.lock, and the ``openai`` client the check drives the API with. Packages
the machine's torch/transformers stack brings (numpy, tokenizers, safetensors,
huggingface-hub, jinja2, ...) are fetched too but only installed there when
missing (see gpu_check.sh). matplotlib (plots of ``commutator bench``) is left out.

``python tests/gpu/make_wheelhouse.py OUT [--python-version 3.12]``
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UV = str(ROOT / "build" / "tools" / "bin" / "uv")
LEAVE_OUT = {"matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver", "pillow", "pyparsing", "python-dateutil"}
CLIENT = "openai==3.51.0"


def pins(text: str, python_version: str) -> list[str]:
    """``name==version`` lines of a requirements text whose markers hold for Linux x86_64 CPython ``python_version``."""
    from packaging.markers import Marker

    env = {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
    }
    out = []
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)(\s*;\s*(.+))?$", line.strip())
        if not m or m.group(1).lower() in LEAVE_OUT:
            continue
        if m.group(4) and not Marker(m.group(4)).evaluate(env):
            continue
        out.append(f"{m.group(1)}=={m.group(2)}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--python-version", default="3.12")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    subprocess.run([UV, "build", "--all-packages", "--wheel", "-o", str(out), "-q"], cwd=ROOT, check=True)
    runtime = subprocess.run(
        [UV, "export", "--frozen", "--no-dev", "--all-packages", "--no-emit-workspace", "--no-hashes"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    client = subprocess.run(
        [UV, "pip", "compile", "-", "--python-version", args.python_version, "--no-header", "-q"],
        input=CLIENT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    reqs = sorted(set(pins(runtime, args.python_version)) | set(pins(client, args.python_version)), key=str.lower)
    (out / "requirements-gpu.txt").write_text("\n".join(reqs) + "\n")
    subprocess.run(
        [
            str(ROOT / "build" / "tools" / "bin" / "python"),  # the tools venv has pip (.venv, made by uv, has not)
            "-m",
            "pip",
            "download",
            "-q",
            "--disable-pip-version-check",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            args.python_version,
            "--implementation",
            "cp",
            "--platform",
            "manylinux_2_28_x86_64",
            "--platform",
            "manylinux_2_17_x86_64",
            "--platform",
            "manylinux2014_x86_64",
            "--platform",
            "any",
            "-d",
            str(out),
            "-r",
            str(out / "requirements-gpu.txt"),
        ],
        check=True,
    )
    size = sum(p.stat().st_size for p in out.glob("*.whl"))
    print(f"{out}: {len(list(out.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB, for Python {args.python_version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
