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
