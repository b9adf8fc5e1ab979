"""CI runs exactly the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_cmd = next(c for c in commands if "pytest" in c).split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in [line.strip() for line in ci]


def test_readme_is_a_product_page_of_at_most_200_lines():
    """The README stays a product page (measurement history lives in docs/): at most 200 lines,
    opening with what tileflow does before the first command."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines (at most 200: move detail to docs/)"
    first_command = next(i for i, line in enumerate(lines) if line.startswith("```"))
    assert any("tileflow" in line.lower() for line in lines[:first_command])
