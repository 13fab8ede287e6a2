"""The README is a front door: short, every relative link and image resolves (anchors included), its pictures are
real PNGs, and it speaks to users."""

import re
from pathlib import Path

from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    return {slugify(line.lstrip("#").strip(), "-") for line in path.read_text().splitlines() if line.startswith("#")}


def broken_links(text: str, base: Path) -> list[str]:
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # a URL, not a file of the repository
        name, _, anchor = target.partition("#")
        path = (base / name).resolve() if name else base / "README.md"
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(target)
    return broken


def test_every_relative_link_and_image_resolves():
    assert len(LINK.findall(README)) >= 20
    assert not broken_links(README, ROOT)


def test_the_link_check_catches_a_broken_link_and_anchor():
    assert broken_links("[x](docs/NOPE.md) ![y](docs/nope.png) [z](docs/FINDINGS.md#no-such-section)", ROOT) == [
        "docs/NOPE.md", "docs/nope.png", "docs/FINDINGS.md#no-such-section"]
    assert broken_links("[ok](docs/FINDINGS.md#retrieval-heads) [web](https://example.org/x)", ROOT) == []


def test_the_screenshot_is_a_png_of_a_report():
    images = [t for t in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", README)]
    assert "docs/img/report-top.png" in images
    data = (ROOT / "docs" / "img" / "report-top.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_short_and_for_users():
    assert len(README.splitlines()) <= 220
    words = re.findall(r"\b(wave|issue|lent|status: done)\b", README, flags=re.IGNORECASE)
    assert not words
    for command in ("make scan", "make test", "pip install .", "pip install '.[all]'"):
        assert command in README
