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
