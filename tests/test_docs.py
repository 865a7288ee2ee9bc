"""The documentation stays true: links resolve, the README's opening commands parse, measured numbers have a source.

- every relative link and image of README.md and docs/*.md names a file or folder of the repository, and every
  #anchor names a heading of its target page (GitHub's heading slugs);
- each command of the README's code blocks before its first architecture section parses: `mmbytes` commands through
  the CLI in-process, `pip install` and `pytest` against pyproject.toml;
- docs/measurements.md is what bench/render_measurements.py renders, and every number the README quotes from a
  measurement appears there.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from bench_script import load_bench

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text())) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_relative_link_resolves_to_a_file_and_heading(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_link_checker_finds_links_and_headings():
    readme = ROOT / "README.md"
    assert "docs/architectures.md" in links(readme)
    assert "two-commands" in anchors(readme)
    assert slug("Training throughput at T = 8,192") == "training-throughput-at-t--8192"
    assert slug("`small` against MEGABYTE-pytorch") == "small-against-megabyte-pytorch"


def opening_commands() -> list[str]:
    """Shell commands of the README's code blocks before its '## Architectures' section, split at '&&'."""
    text = (ROOT / "README.md").read_text()
    head = text[:text.index("\n## Architectures")]
    blocks = re.findall(r"^```(?:bash|sh)?\n(.*?)^```", head, flags=re.S | re.M)
    lines = [line.split(" #")[0].strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [part.strip() for line in lines if line for part in line.split("&&")]


def test_readme_opens_with_install_quickstart_and_test_commands():
    commands = opening_commands()
    assert commands[:2] == ["pip install -e .", "mmbytes fit --config recipes/quickstart.yaml"]
    assert ['pip install -e ".[test]"', "pytest"] == commands[2:4]


def table(toml: str, name: str) -> str:
    """The lines of one [table] of a TOML file (tomllib is not in Python 3.10, the oldest this project supports)."""
    start = toml.index(f"[{name}]\n") + len(name) + 3
    end = toml.find("\n[", start)
    return toml[start:end if end > 0 else None]


@pytest.mark.parametrize("command", opening_commands())
def test_readme_opening_command_parses(command, tmp_path, monkeypatch):
    words = shlex.split(command)
    project = (ROOT / "pyproject.toml").read_text()
    if words[:2] == ["pip", "install"]:
        target = words[words.index("-e") + 1]
        extras = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", target)
        assert extras, f"{command}: installs {target!r}, not this project"
        declared = set(re.findall(r"^([\w-]+)\s*=", table(project, "project.optional-dependencies"), flags=re.M))
        missing = set((extras.group(1) or "").split(",")) - {""} - declared
        assert not missing, f"{command}: no extra {missing} in pyproject.toml"
        return
    if words == ["pytest"]:
        assert "[tool.pytest.ini_options]" in project, "pyproject.toml has no [tool.pytest.ini_options]"
        return
    assert words[0] == "mmbytes", f"unexpected command in the README's opening: {command}"
    assert re.search(r'^mmbytes\s*=\s*"mmbytes\.cli:main"', table(project, "project.scripts"), flags=re.M)
    from mmbytes import cli

    monkeypatch.chdir(ROOT)
    args = words[1:]
    if args[0] in ("fit", "validate", "test", "predict"):
        with pytest.raises(SystemExit) as done:  # the recipe and every option parse; nothing is trained
            cli.main([*args, "--print_config"])
        assert done.value.code in (0, None)
        return
    # other commands: their options parse, then the missing checkpoint is refused before anything is written
    missing = tmp_path / "missing.ckpt"
    for flag, value in (("--ckpt", missing), ("--out", tmp_path / "out")):
        if flag in args:
            args[args.index(flag) + 1] = str(value)
    with pytest.raises(Exception) as refused:  # a parser error is a SystemExit, which this does not catch
        cli.main(args)
    assert "missing.ckpt" in str(refused.value)
    assert not (tmp_path / "out").exists()


def renderer():
    return load_bench("render_measurements")


def test_measurements_page_is_what_the_renderer_writes():
    assert renderer().main(["--check"]) == 0, "run: python bench/render_measurements.py"


def test_renderer_check_fails_on_a_stale_page(tmp_path):
    import re

    page = (ROOT / "docs" / "measurements.md").read_text()
    figure = re.search(r"\| (\d+\.\d{3}) ", page)  # the first measured figure in a table
    stale = tmp_path / "measurements.md"
    stale.write_text(page[: figure.start(1)] + "9" + page[figure.start(1) + 1 :])
    assert renderer().main(["--check", "--out", str(stale)]) == 1


def readme_section(title: str) -> str:
    text = prose((ROOT / "README.md").read_text())
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


@pytest.mark.parametrize("section", ["Two commands", "Results"])
def test_every_number_the_readme_quotes_is_in_the_measurements(section):
    page = (ROOT / "docs" / "measurements.md").read_text()
    text = readme_section(section)
    text = re.sub(r"torch \d+\.\d+\.\d+|CUDA \d+\.\d+", "", text)  # versions, not measurements
    numbers = re.findall(r"(?<![\w.])\d[\d,]*\.\d+(?:M|x)?", text)
    assert numbers, f"no numbers found in README section {section!r}"
    missing = [n for n in numbers if n not in page]
    assert not missing, f"README section {section!r} quotes numbers not in docs/measurements.md: {missing}"
