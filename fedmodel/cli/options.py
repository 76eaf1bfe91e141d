"""Typer options generated from `RunConfig`'s keys, so `run` and `simulate` cannot drift.

Each option takes its flag, type, default, help, choices and help panel from the key's
declaration (fedmodel/config/run_keys.py). A command selects the keys it takes by name;
`SHARED_KEYS` are the ones both `fedmodel run` and `fedmodel simulate` take.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from click.core import ParameterSource

from fedmodel.config import ConfigKey, RunConfig, Section
from fedmodel.errors import ConfigError

SHARED_KEYS = (
    "rounds",
    "min_clients",
    "round_timeout",
    "local_epochs",
    "batch_size",
    "lr",
    "model",
    "seed",
    "dp",
    "epsilon",
    "delta",
    "max_grad_norm",
    "central_noise",
    "central_clipping_norm",
    "central_epsilon",
    "aggregator",
    "server_lr",
    "server_momentum",
    "byzantine",
    "max_update_norm",
    "stop_after_round",
    "save_round_models",
)
# --dp distributed's parameters, which both take too (beside their SecAgg+ options)
DISTRIBUTED_DP_KEYS = (
    "distributed_clip",
    "distributed_noise",
    "distributed_bits",
    "distributed_epsilon",
)

CLI_DEFAULTS: dict[str, Any] = {"min_clients": 2}
"""Where the command line is stricter than the library (and pyproject's run config):
a round aggregated from one client releases that client's own update."""

_KEY_DEFAULT: Any = object()


def config_option(
    name: str, default: Any = _KEY_DEFAULT, shown_default: Any = None
) -> inspect.Parameter:
    """The option for RunConfig field `name`: `--name-with-dashes`, in its section's panel.

    `default` replaces the key's default for one command (a scenario's own); None makes
    the option optional and its help names the default the run then uses: the key's, or
    `shown_default` where the command chooses another.
    """
    spec = RunConfig.config_keys()[name]
    value = CLI_DEFAULTS.get(name, spec.default) if default is _KEY_DEFAULT else default
    text = spec.help
    shown = spec.default if shown_default is None else shown_default
    if value is None and shown:
        text = f"{text.rstrip('.')} (default {shown})."
    option = typer.Option(
        _flag(spec),
        help=text,
        rich_help_panel=spec.section.value,
        metavar=f"[{'|'.join(spec.choices)}]" if spec.choices else None,
    )
    kind: Any = spec.kind if value is not None else spec.kind | None
    return parameter(name, Annotated[kind, option], value)


def config_options(names: Sequence[str], **defaults: Any) -> list[inspect.Parameter]:
    """The options for these RunConfig fields, in this order; `defaults` as in config_option."""
    return [config_option(name, defaults.get(name, _KEY_DEFAULT)) for name in names]


def parameter(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    """A keyword-only command parameter (`...` as default: a required option)."""
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default
    )


def command(
    name: str,
    summary: str,
    parameters: Sequence[inspect.Parameter],
    body: Callable[[dict[str, Any]], None],
) -> Callable[..., None]:
    """A Typer command function with these options; `body` gets them as one dict."""

    def function(**options: Any) -> None:
        body(options)

    function.__signature__ = inspect.Signature(list(parameters))  # type: ignore[attr-defined]
    function.__doc__ = summary
    function.__name__ = name
    return function


NO_DP = parameter(
    "no_dp",
    Annotated[
        bool,
        typer.Option(
            "--no-dp", help="Train without DP: --dp off.", rich_help_panel=Section.PRIVACY
        ),
    ],
    False,
)
RESUME = parameter(
    "resume",
    Annotated[
        Path | None,
        typer.Option(
            help="Continue this run directory from its last checkpoint, with its own config "
            "(its training options are kept; yours are ignored).",
            rich_help_panel=Section.OUTPUT,
        ),
    ],
    None,
)


SAMPLE_DP_KEYS = ("epsilon", "max_grad_norm")
"""Options that only DP-SGD on the clients reads: set without it, they would do nothing."""


def dp_mode(dp: str, no_dp: bool) -> str:
    """--dp, or `off` with --no-dp; both at once must agree, and an option that only
    DP-SGD reads (--epsilon, --max-grad-norm) typed without it is refused, not ignored."""
    if no_dp and dp not in (RunConfig.config_keys()["dp"].default, "off"):
        raise ConfigError(f"--no-dp means --dp off; drop one of --no-dp and --dp {dp}")
    mode = "off" if no_dp else dp
    if mode in ("off", "client", "distributed"):
        without = "--no-dp" if no_dp else f"--dp {mode}"
        for name in SAMPLE_DP_KEYS:
            if _typed(name):
                flag = RunConfig.config_keys()[name].flag
                raise ConfigError(
                    f"{flag} sets DP-SGD on the clients, which {without} turns off; "
                    f"drop one of {flag} and {without}"
                )
    return mode


def _typed(name: str) -> bool:
    """Whether option `name` was typed on this command line (not left at its default)."""
    context = click.get_current_context(silent=True)
    return context is not None and context.get_parameter_source(name) == ParameterSource.COMMANDLINE


def _flag(spec: ConfigKey) -> str:
    """`--name`, and for a boolean with an off switch `--name/--off-switch`."""
    return f"{spec.flag}/{spec.off_switch}" if spec.off_switch else spec.flag
