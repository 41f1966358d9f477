"""Every `poise` command in README.md's shell blocks parses, with valid flags and its required settings."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from poise.cli import COMMANDS, SPECIAL, build_config, build_parser

README = Path(__file__).parent.parent / "README.md"


def readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip().lstrip("#").strip()
            if line.startswith("poise ") and not line.startswith("poise.") and "..." not in line:
                commands.append(line)
    return commands


def test_the_readme_has_a_full_pipeline() -> None:
    names = {shlex.split(c)[1] for c in readme_commands()}
    assert {"warmup", "features", "attribute", "select", "report"} <= names


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command: str) -> None:
    words = shlex.split(command.replace("$D", "examples/quickstart").replace("$R", "runs/quickstart")
                        .replace("$k", "1"))[1:]
    args, extras = build_parser().parse_known_args(words)
    assert not extras, f"unknown flags {extras} in: {command}"
    if args.command in SPECIAL:  # run, data: their own arguments, parsed above
        if args.command == "run" and args.config == "demo":
            from poise.pipeline import config_path, load_config

            load_config(config_path("demo"), args.overrides)  # the shipped config with the README's overrides
        return
    cls = COMMANDS[args.command][0]
    build_config(cls, args, args.command)  # required settings present, values of the right type


def test_the_readme_run_config_example_is_a_valid_run_config() -> None:
    import yaml

    from poise.pipeline import parse_config

    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
              if "validation:" in b and "select:" in b]
    assert blocks, "README has no run config example"
    for block in blocks:
        config = parse_config(yaml.safe_load(block), "README.md")  # keys, types and method names
        assert config.section("train")["seeds"] == [0, 1, 2]
