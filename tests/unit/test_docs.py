"""The documentation site builds without a broken link or anchor, and the README stays a front page."""

import os
import subprocess
import sys

from helpers import ROOT


def test_the_docs_site_builds_strictly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, check=False,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site/reference/config/index.html").is_file()


def test_the_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for command in ("make demo", "make test", "source .venv/bin/activate"):
        assert command in readme
    for page in ("index", "data", "training", "tracking", "evaluation", "clusters", "results", "performance",
                 "troubleshooting", "reference/config"):
        assert f"(docs/{page}.md" in readme, page


def test_the_fault_matrix_names_tests_that_exist():
    """docs/reliability.md cites tests as `file.py::test_name` (or `::test_name` for the file
    named last before it); each must exist, so the page cannot promise a test that was renamed
    or removed."""
    import re

    page = (ROOT / "docs/reliability.md").read_text()
    cited, current = 0, None
    for row in page.splitlines():
        for file_name, test_name in re.findall(r"`(test_\w+\.py)?::(test_\w+)`", row):
            current = file_name or current
            assert current, f"a test cited without its file: {test_name}"
            source = (ROOT / "tests/integration" / current).read_text()
            assert f"def {test_name}(" in source, f"{current} has no {test_name}"
            cited += 1
    assert cited >= 10
