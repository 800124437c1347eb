"""The README's own code blocks: every `isereid` command in them parses with today's command line,
and the quickstart runs as written (its training shortened to one short epoch).

A block is tagged by an HTML comment on the line before its opening fence:
``<!-- readme-test: quickstart -->`` (run by test_quickstart_runs_as_written) or
``<!-- readme-test: skip (why) -->`` (commands that this checkout does not have).
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from isereid.cli import build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"
# The quickstart's training, cut to one short epoch; everything else runs exactly as written.
SHORT_TRAIN = ["optim.epochs=1", "optim.iters=2", "data.workers=0", "train.progress=false", "train.tensorboard=false"]


def code_blocks(text: str) -> list[tuple[str, str, str]]:
    """(tag, language, body) of every fenced block; tag from a ``<!-- readme-test: TAG -->`` line before it."""
    blocks = []
    pattern = re.compile(r"(?:<!-- readme-test: ([^>]*?) -->\n)?```(\w*)\n(.*?)\n```", re.S)
    for match in pattern.finditer(text):
        blocks.append(((match.group(1) or "").strip(), match.group(2), match.group(3)))
    return blocks


def shell_commands(body: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, split like a shell."""
    joined = body.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words:
                commands.append(words)
    return commands


def isereid_commands(tag_filter=lambda tag: not tag.startswith("skip")):
    text = README.read_text()
    for tag, lang, body in code_blocks(text):
        if lang == "bash" and tag_filter(tag):
            for words in shell_commands(body):
                if words[0] == "isereid":
                    yield tag, words[1:]


def test_the_readme_has_the_tagged_blocks():
    tags = [tag for tag, _, _ in code_blocks(README.read_text())]
    assert "quickstart" in tags and "own-crops" in tags
    assert "<!-- results-table -->" in README.read_text()


def test_every_isereid_command_in_the_readme_parses():
    parser = build_parser()
    seen = set()
    for _, argv in isereid_commands():
        try:
            parser.parse_args(argv)
        except SystemExit as e:  # argparse's usage error
            pytest.fail(f"README command does not parse (exit {e.code}): isereid {' '.join(argv)}")
        seen.add(argv[0])
    assert {"demo-data", "train", "test", "search", "extract", "export", "plot", "weights", "index", "serve"} <= seen


def test_quickstart_install_and_test_commands_are_the_ci_ones():
    quick = next(body for tag, _, body in code_blocks(README.read_text()) if tag == "quickstart")
    commands = [" ".join(shlex.quote(w) for w in words) for words in shell_commands(quick)]
    assert "python -m pip install -e '.[dev]'" in commands and "python -m pytest -q" in commands


@pytest.mark.slow
def test_quickstart_runs_as_written(capsys):
    """demo-data, train (shortened), test and search exactly as the quickstart writes them, in a
    fresh folder; the search's query image must be one that demo-data wrote."""
    commands = [argv for tag, argv in isereid_commands(lambda tag: tag == "quickstart")]
    assert [argv[0] for argv in commands] == ["demo-data", "train", "test", "search"]
    for argv in commands:
        extra = SHORT_TRAIN if argv[0] == "train" else []
        assert main(argv + extra) == 0, " ".join(argv)
        out = capsys.readouterr().out
        if argv[0] == "train":
            assert out.startswith("done: best mAP")
    assert Path("out/model_best.pt").is_file() and Path("out/test.json").is_file() and Path("ranks.png").is_file()
