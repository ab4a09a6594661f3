"""What a command's ``--help`` leaves unexplained: options without help, defaults not said."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator


def parsers(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    """Every action of ``parser`` and of its subcommands (recursively), with the command line
    that reaches it; the subcommands themselves included, the -h actions not."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield path, choice
            for name, subparser in action.choices.items():
                yield from parsers(subparser, f"{path} {name}")
            continue
        yield path, action


def help_problems(parser: argparse.ArgumentParser) -> list[str]:
    """``COMMAND OPTION: why`` for each option, positional or subcommand without help, and
    each option whose default (when it has one worth saying) its help does not show."""
    problems = []
    for path, action in parsers(parser, parser.prog):
        name = "/".join(action.option_strings) or action.dest
        if not (action.help or "").strip():
            problems.append(f"{path} {name}: no help")
            continue
        default = action.default
        if not action.option_strings or default in (None, False, [], argparse.SUPPRESS):
            continue
        sub = _subparser(parser, path)
        # argparse wraps lines at spaces and after hyphens ("/etc/edge-" "agent/agent.toml").
        text = re.sub(r"-\s+", "-", " ".join(sub.format_help().split()))
        if not re.search(rf"default:? {re.escape(str(default))}\b", text):
            problems.append(f"{path} {name}: its default {default} is not said")
    return problems


def _subparser(parser: argparse.ArgumentParser, path: str) -> argparse.ArgumentParser:
    for name in path.split()[1:]:
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = sub.choices[name]
    return parser
