"""MkDocs hook: adds the files that live at the repository root to the site.

The reports (BENCHMARKS.md, ...) are written by benchmarks/ scripts at the root, and CONTRIBUTING.md,
TESTING.md and CHANGELOG.md sit where people look for them; copying them into docs/ would leave two
versions to drift. Their links to pictures (``docs/x.png``) are made relative to the page's place in the site.
"""

import os

from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORTS = ("BENCHMARKS.md", "COVERAGE.md", "DEPLOYMENT.md", "EVALUATION.md", "RELIABILITY.md", "SCALE.md")
# site path -> file at the root
ROOT_PAGES = {**{f"results/{name}": name for name in REPORTS}, "CONTRIBUTING.md": "CONTRIBUTING.md",
              "TESTING.md": "TESTING.md", "CHANGELOG.md": "CHANGELOG.md"}


def on_files(files, config):
    for uri, name in ROOT_PAGES.items():
        files.append(File.generated(config, uri, abs_src_path=os.path.join(ROOT, name)))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri in ROOT_PAGES:
        # a root file links pictures as docs/x.png; in the site they are at the top, beside index.md
        prefix = "../" * page.file.src_uri.count("/")
        markdown = markdown.replace("](docs/", f"]({prefix}")
    return markdown
