"""triage_oom on the real logs of tests/fixtures/real/tracebacks: kind, numbers and stage against what
each text shows (expected.json), with every miss named.

    python bench/triage_corpus.py [--misses]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipefit.tools.triage import triage_oom  # noqa: E402

LOGS = ROOT / "tests" / "fixtures" / "real" / "tracebacks"
_SIZE = re.compile(r"([\d.,]+)\s*([KMGT]i?B|bytes|B)")
_SCALE = {"B": 1, "bytes": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}  # fmt: skip


def pasted(path: Path) -> str:
    """A log as its reporter posted it: the issue's title and body (the source line is the corpus's)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return "\n".join(line.removeprefix("# title: ") for line in lines if not line.startswith("# source:"))


def score() -> tuple[dict[str, tuple[int, int]], list[str]]:
    """{measure: (right, of)} for kind, numbers and stage, and the misses in words."""
    expected = json.loads((LOGS / "expected.json").read_text())
    expected.pop("_about", None)
    tally = {"kind": [0, 0], "numbers": [0, 0], "stage": [0, 0]}
    misses = []
    for name, row in sorted(expected.items()):
        result = triage_oom(pasted(LOGS / name))
        checks = [("kind", result.kind, row["kind"], result.kind == row["kind"])]
        if "stage" in row:
            checks.append(("stage", result.stage, row["stage"], result.stage == row["stage"]))
        for field, text in row.items():
            if field.endswith("_bytes"):
                value, unit = _SIZE.fullmatch(text.strip()).groups()
                want, got = float(value.replace(",", "")) * _SCALE[unit], getattr(result, field)
                checks.append(("numbers", got, text, got is not None and abs(got - want) <= max(0.006 * want, 1)))
        for measure, got, want, right in checks:
            tally[measure][0] += right
            tally[measure][1] += 1
            if not right:
                misses.append(f"{name}: {measure} {got!r}, the text shows {want!r}")
    return {k: (v[0], v[1]) for k, v in tally.items()}, misses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--misses", action="store_true", help="name every miss")
    args = parser.parse_args()
    tally, misses = score()
    for measure, (right, of) in tally.items():
        print(f"{measure:8s} {right}/{of} = {right / of:.0%}")
    if args.misses:
        print("\n".join(misses))


if __name__ == "__main__":
    main()
