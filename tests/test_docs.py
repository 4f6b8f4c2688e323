"""The docs say what works: every `python ...` command in README.md and docs/*.md names a script that exists and
flags that script takes, every config key they name exists in configs/defaults.yaml, and the cheap commands (config
printing, dry runs, cost reports) run."""

from __future__ import annotations

import glob
import importlib.util
import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest

from cnnlab import config
from tests.conftest import REPO, run_cli_in_process

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SECTIONS = tuple(config.load_defaults())
# A dotted config key: `training.time_budget`, `training.time_budget: 10`, `--set model.transfer.weights=PATH`
# (not `cnnlab/runtime.py` or `data.py`).
KEY = re.compile(r"(?<![\w/.-])((?:%s)(?:\.[a-z_0-9]+)+)(?![\w/])" % "|".join(SECTIONS))
FILE_SUFFIXES = (".py", ".md", ".yaml", ".json", ".csv", ".keras", ".txt")


def config_keys_in(text: str) -> set[str]:
    """The dotted config keys named in a Markdown text's inline code spans."""
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return {key for span in spans for key in KEY.findall(span) if not key.endswith(FILE_SUFFIXES)}


def commands_in(text: str) -> list[str]:
    """The `python <script>` commands of a Markdown text: lines of code blocks (continuation lines joined, comments
    dropped) and inline code."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if re.search(r"(^|\s)python \S+\.py", line):
                found.append(line[line.index("python "):])
    text_only = re.sub(r"```.*?```", "", text, flags=re.S)
    for inline in re.findall(r"`(python [^`]+)`", text_only):
        found.append(" ".join(inline.split()))
    return found


def all_commands() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        out += [(doc.name, c) for c in commands_in(doc.read_text())]
    return out


@lru_cache(maxsize=None)
def flags_of(script: str) -> frozenset[str]:
    """The flags a script's --help lists, read from its own argument parser (in this process)."""
    import contextlib
    import io

    path = REPO / script
    spec = importlib.util.spec_from_file_location(f"doc_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.main(["--help"])
    return frozenset(re.findall(r"(--[a-z][a-z0-9-]*)", out.getvalue()))


def problems_of(command: str) -> list[str]:
    tokens = shlex.split(command)
    script = tokens[1]
    if not (REPO / script).is_file():
        return [f"no script {script}"]
    problems = []
    known = flags_of(script)
    for i, token in enumerate(tokens[2:], start=2):
        if token.startswith("--"):
            flag = token.split("=")[0]
            if flag not in known:
                problems.append(f"{script} takes no {flag}")
            if flag == "--set" and i + 1 < len(tokens):
                problems += key_problems(tokens[i + 1].split("=")[0])
    return problems


def key_problems(dotted: str) -> list[str]:
    node = config.load_defaults()
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return [f"no config key {dotted}"]
        node = node[part]
    return []


def test_the_docs_hold_commands_of_every_tool():
    scripts = {shlex.split(c)[1] for _, c in all_commands()}
    assert {"train.py", "evaluate.py", "predict.py", "visualize_filters.py", "report.py", "gradcam.py",
            "export.py"} <= scripts


@pytest.mark.parametrize("doc, command", all_commands())
def test_every_documented_command_names_a_script_and_flags_it_takes(doc, command):
    assert problems_of(command) == [], (doc, command)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_config_key_the_docs_name_exists(doc):
    names = sorted(config_keys_in(doc.read_text()))
    assert [p for name in names for p in key_problems(name)] == [], doc.name


def cheap(command: str) -> bool:
    tokens = shlex.split(command)
    placeholders = any(c in command for c in "<>") or any(t in ("X", "CONFIG", "FILE", "PATH") for t in tokens)
    return not placeholders and ("--print-config" in tokens or "--dry-run" in tokens or tokens[1] == "report.py")


@pytest.mark.parametrize("doc, command", [(d, c) for d, c in all_commands() if cheap(c)])
def test_the_cheap_documented_commands_run(doc, command, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    tokens = shlex.split(command)
    args = [match for t in tokens[2:] for match in (sorted(glob.glob(t)) if "*" in t else [t])]
    proc = run_cli_in_process(capsys, tokens[1], *args)
    assert proc.returncode == 0, (doc, command, proc.stderr[-2000:])


def test_the_checker_catches_a_renamed_flag_and_key():
    # The same checks on commands that are wrong, so a green run means the docs were checked, not skipped.
    assert problems_of("python train.py --config configs/smoke.yaml --show-config") == [
        "train.py takes no --show-config"]
    assert problems_of("python train.py --config configs/smoke.yaml --set training.epoch=3") == [
        "no config key training.epoch"]
    assert problems_of("python trainer.py --config x.yaml") == ["no script trainer.py"]
    assert config_keys_in("`training.time_budget: 10`, `--set data.path=DIR`, `cnnlab/runtime.py`, `data.py`") == {
        "training.time_budget", "data.path"}
    assert commands_in("text `python report.py\nconfigs/smoke.yaml --layers` more") == [
        "python report.py configs/smoke.yaml --layers"]
    assert Path(REPO / "README.md") in DOCS


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_contents_link_to_its_sections_and_stay_a_guide():
    text = (REPO / "README.md").read_text()
    anchors = re.findall(r"\]\(#([^)]+)\)", text)
    headings = {slug(h) for h in re.findall(r"^#{2,3} (.+)$", text, re.M)}
    assert anchors and [a for a in anchors if a not in headings] == []
    for section in ("install-and-test", "try-it-in-a-minute", "your-own-folder-of-images",
                    "transfer-learning-vgg16-and-resnet50", "evaluate-and-predict", "see-the-filters",
                    "use-your-model-elsewhere", "watch-training-in-tensorboard", "gpus-and-several-machines"):
        assert section in anchors
    assert len(text.splitlines()) <= 300
