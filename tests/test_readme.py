"""The README's two set-up commands and .ci/run stay in sync."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", setup, re.S)
    assert block, "README's Set-up section needs a ```bash block"
    return [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


def test_readme_has_two_setup_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert "pip install" in cmds[0] and "torch==2.13.0" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == _readme_commands()[1]
