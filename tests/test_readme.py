"""README's two commands are the ones CI runs, so they keep working on a fresh machine."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.+?)\n```", quick_start, flags=re.S)
    assert len(commands) == 2, "Quick start keeps two commands: set up and run, then test"
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and line[0] not in "#"]
    assert [line for line in ci_lines if line not in ("set -euo pipefail", 'cd "$(dirname "$0")/.."')] == commands
