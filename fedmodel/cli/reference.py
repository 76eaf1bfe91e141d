"""Write the CLI reference (docs/cli.md) from the Typer app, so the docs cannot drift.

Run `python -m fedmodel.cli.reference > docs/cli.md` after changing a command or option;
tests/test_docs.py regenerates the page and fails on any difference. The output depends
only on the command tree: no terminal width, no colours, no machine-specific values.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from enum import Enum

import click
import typer

from fedmodel import errors
from fedmodel.cli.main import app

REGENERATE = "python -m fedmodel.cli.reference > docs/cli.md"
_ROOT_NAME = "fedmodel"


def render_reference() -> str:
    """The whole reference page as Markdown."""
    root = typer.main.get_command(app)
    contexts = list(_walk(click.Context(root, info_name=_ROOT_NAME)))
    lines = [
        "# CLI reference",
        "",
        f"Generated from the Typer app by `{REGENERATE}`; do not edit by hand.",
        "`tests/test_docs.py` fails when this page and the code disagree.",
        "",
        *(f"- [{ctx.command_path}](#{_anchor(ctx.command_path)})" for ctx in contexts),
        "",
    ]
    for ctx in contexts:
        lines += _render_command(ctx)
    lines += _render_exit_codes()
    return "\n".join(lines).rstrip() + "\n"


def _walk(ctx: click.Context) -> Iterator[click.Context]:
    """Every visible command, depth first, in the order the app registers them."""
    yield ctx
    command = ctx.command
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from _walk(click.Context(sub, info_name=name, parent=ctx))


def _render_command(ctx: click.Context) -> list[str]:
    command = ctx.command
    usage = " ".join([ctx.command_path, *command.collect_usage_pieces(ctx)])
    lines = [f"## {ctx.command_path}", "", "```", usage, "```", ""]
    if command.help:
        lines += [_escape(inspect.cleandoc(command.help)), ""]
    if isinstance(command, click.Group):
        lines += ["| command | what it does |", "|---|---|"]
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                path = f"{ctx.command_path} {name}"
                summary = _cell(sub.get_short_help_str(limit=1000))
                lines.append(f"| [`{name}`](#{_anchor(path)}) | {summary} |")
        lines.append("")
    params = [p for p in command.params if not getattr(p, "hidden", False)]
    if params:
        lines += ["| option | value | default | meaning |", "|---|---|---|---|"]
        lines += [_param_row(p) for p in params]
        lines.append("")
    return lines


def _param_row(param: click.Parameter) -> str:
    if isinstance(param, click.Argument):
        name = param.human_readable_name
    else:
        name = " / ".join(param.opts + param.secondary_opts)
    help_text = getattr(param, "help", None) or ""
    return f"| `{name}` | {_value(param)} | {_default(param)} | {_cell(help_text)} |"


def _value(param: click.Parameter) -> str:
    if isinstance(param, click.Option) and param.is_flag:
        return "flag"
    if isinstance(param.type, click.Choice):
        return _cell("|".join(str(choice) for choice in param.type.choices))
    return param.type.name


def _default(param: click.Parameter) -> str:
    """The default as a user types it; no value means the command decides (see its help)."""
    if param.required:
        return "required"
    default = param.default
    if callable(default):
        return "computed"
    if default is None or (isinstance(param, click.Option) and param.is_flag and not default):
        return "-" if default is None else "off"
    if default is True:
        return "on"
    if isinstance(default, Enum):
        default = default.value
    return f"`{default}`" if str(default) else '`""`'


def _render_exit_codes() -> list[str]:
    """The exit-code table, once `fedmodel.errors` defines one `ExitCode` enum."""
    exit_codes = getattr(errors, "ExitCode", None)
    if exit_codes is None:
        return []
    lines = ["## Exit codes", "", "| code | name | meaning |", "|---|---|---|"]
    for member in exit_codes:
        meaning = getattr(member, "description", "")
        lines.append(f"| {int(member)} | `{member.name}` | {_cell(str(meaning))} |")
    return [*lines, ""]


def _cell(text: str) -> str:
    """One Markdown table cell: a single line with its pipes escaped."""
    return _escape(" ".join(text.split())).replace("|", "\\|")


def _escape(text: str) -> str:
    """Angle brackets as entities, so `<timestamp>` is shown rather than taken for HTML."""
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _anchor(heading: str) -> str:
    """The anchor a code forge gives a heading: lower case, spaces to hyphens."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-")


if __name__ == "__main__":
    print(render_reference(), end="")
