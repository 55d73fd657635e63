"""README speaks to users: every path it names is inside the repository or the user's own."""
from __future__ import annotations

import re

from conftest import ROOT


def test_readme_names_no_path_outside_the_repository():
    text = (ROOT / "README.md").read_text()
    assert "../" not in text, "README points outside the repository"
    for forbidden in ("/work/", "shared/", "issue ", "this repository's"):
        assert forbidden not in text, forbidden
    # Every repository file it names in backquotes exists.
    for name in re.findall(r"`((?:benchmarks|configs|docs|scripts|models|datamodules|run|cli|callbacks|base|lit_modules)/[\w./-]+)`", text):
        assert (ROOT / name.rstrip("/")).exists(), name


def test_every_recipe_of_where_to_add_things_names_a_test_that_exists():
    """README's "Where to add things": each recipe names the test that carries it out, and it exists."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("Where to add things"):]
    named = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", section)
    bullets = [line for line in section.splitlines() if line.startswith("- **")]
    assert len(named) >= len(bullets) >= 4, (named, bullets)
    for path, test in named:
        source = (ROOT / path).read_text()
        assert test == "" or f"def {test}(" in source, f"{path}::{test}"
