"""`fedmodel run` and `fedmodel simulate` take their options from RunConfig, so they agree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer

from fedmodel.cli.main import app, main
from fedmodel.cli.options import CLI_DEFAULTS, SHARED_KEYS, dp_mode
from fedmodel.cli.simulate import with_dataset_defaults
from fedmodel.config import RunConfig
from fedmodel.errors import ConfigError

COMMAND = typer.main.get_command(app)
assert isinstance(COMMAND, click.Group)
RUN = COMMAND.commands["run"]
SIMULATE = COMMAND.commands["simulate"]
assert isinstance(SIMULATE, click.Group)
SCENARIOS = {name: SIMULATE.commands[name] for name in ("medical", "financial", "digits", "csv")}
EVERY_SCENARIO = list(SIMULATE.commands.values())  # task too
# Differ on purpose: where each command writes, and whose log lines --verbose shows.
PER_COMMAND = {"output", "verbose"}
# The digits scenario trains logistic regression at lr 2 on label-skewed devices (dirichlet);
# medical and financial leave --model and --lr to each dataset (DATASET_DEFAULTS).
SCENARIO_DEFAULTS = {
    "digits": {"partition", "model", "lr"},
    "medical": {"model", "lr", "local_epochs", "max_grad_norm"},
    "financial": {"model", "lr", "local_epochs", "max_grad_norm"},
    "csv": {"model"},
}
CHOICE_KEYS = sorted(name for name, spec in RunConfig.config_keys().items() if spec.choices)


def options(command: click.Command) -> dict[str, click.Option]:
    return {p.name: p for p in command.params if isinstance(p, click.Option) and p.name}


def describe(option: click.Option) -> tuple[object, ...]:
    return (option.opts, option.secondary_opts, option.default, option.help, option.metavar)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_run_and_simulate_give_a_shared_option_the_same_name_default_help_and_choices(
    scenario: str,
) -> None:
    run, simulate = options(RUN), options(SCENARIOS[scenario])
    shared = (run.keys() & simulate.keys()) - PER_COMMAND - SCENARIO_DEFAULTS.get(scenario, set())
    assert {*SHARED_KEYS, "no_dp", "resume"} - SCENARIO_DEFAULTS.get(scenario, set()) <= shared
    for name in sorted(shared):
        assert describe(run[name]) == describe(simulate[name]), name


def test_shared_options_take_help_choices_and_default_from_run_config() -> None:
    run = options(RUN)
    for name in SHARED_KEYS:
        spec = RunConfig.config_keys()[name]
        assert run[name].opts == [spec.flag] and run[name].help == spec.help
        assert run[name].default == CLI_DEFAULTS.get(name, spec.default)
        if spec.choices:
            assert run[name].metavar == f"[{'|'.join(spec.choices)}]"


def test_min_clients_defaults_to_two_in_run_and_simulate() -> None:
    assert options(RUN)["min_clients"].default == 2
    assert options(SCENARIOS["medical"])["min_clients"].default == 2


def test_digits_defaults_to_label_skewed_devices_and_logistic_regression_at_lr_2() -> None:
    """The configuration that met issue 20's bar under DP-SGD (docs/simulation.md)."""
    digits = options(SCENARIOS["digits"])
    defaults = (digits["partition"].default, digits["model"].default, digits["lr"].default)
    assert defaults == ("dirichlet", "logreg", 2.0)
    assert options(SCENARIOS["medical"])["partition"].default == RunConfig().partition


def test_a_users_table_trains_the_linear_model_by_default() -> None:
    """Issue 20's measurements on seven tables (docs/sweep.md)."""
    csv = options(SCENARIOS["csv"])
    assert (csv["model"].default, csv["lr"].default) == ("logreg", RunConfig().lr)


def test_a_dataset_tuned_by_issue_20_defaults_to_its_settings_and_a_given_option_wins() -> None:
    left_out = dict.fromkeys(("model", "lr", "local_epochs", "max_grad_norm", "clients"))
    for dataset, expected in (
        ("flchain", ("logreg", 0.5, 1, 1.0, 8)),  # the shared defaults but the model
        ("covid-clinics", ("mlp", 0.5, 1, 0.5, 8)),
        ("breast-cancer", ("logreg", 0.25, 2, 0.5, 8)),
        ("lending-club", ("logreg", 0.5, 1, 1.0, 8)),
        ("synthetic-ehr", ("logreg", 2.0, 1, 1.0, 25)),
        ("synthetic-fraud", ("logreg", 1.0, 1, 1.0, 100)),
    ):
        resolved = with_dataset_defaults({"dataset": dataset, **left_out})
        assert tuple(resolved[key] for key in left_out) == expected, dataset
    given = with_dataset_defaults({**left_out, "dataset": "breast-cancer", "model": "mlp",
                                   "max_grad_norm": 2.0})  # fmt: skip
    assert (given["model"], given["lr"], given["max_grad_norm"]) == ("mlp", 0.25, 2.0)
    assert RunConfig().model == "mlp" and RunConfig().lr == 0.5 and RunConfig().clients == 8


def test_the_help_names_each_datasets_defaults_where_the_option_is() -> None:
    medical, financial = options(SCENARIOS["medical"]), options(SCENARIOS["financial"])
    shown = financial["dataset"].help
    assert shown is not None and "credit-default: --model logreg;" in shown
    medical_shown = medical["dataset"].help
    assert medical_shown is not None
    assert "breast-cancer: --model logreg --lr 0.25 --local-epochs 2 --max-grad-norm 0.5;" in (
        medical_shown
    )
    assert "synthetic-fraud: --model logreg --lr 1 --clients 100." in shown
    assert "lending-club, credit-default: --model logreg;" in shown  # grouped: equal
    assert financial["model"].help.endswith("(default logreg).")  # every financial dataset's
    assert medical["model"].help.endswith("(default set by --dataset).")
    assert medical["lr"].help.endswith("(default 0.5, or set by --dataset).")


def test_every_option_of_run_and_simulate_sits_in_a_help_panel() -> None:
    """Forty-odd options in one flat list are unreadable: each sits under its section."""
    for command in (RUN, *EVERY_SCENARIO):
        for name, option in options(command).items():
            if name != "help":
                assert getattr(option, "rich_help_panel", None), (command.name, name)


def test_model_choices_and_help_name_every_model_of_the_registry() -> None:
    from fedmodel.config.keys import MODEL_USES
    from fedmodel.models import MODELS

    assert set(RunConfig.config_keys()["model"].choices) == set(MODELS) == set(MODEL_USES)
    for command in (RUN, *SCENARIOS.values()):
        model = options(command)["model"]
        assert model.help is not None
        assert [name for name in MODELS if f"{name} (" in model.help] == list(MODELS)


@pytest.mark.parametrize("name", [*CHOICE_KEYS, "device"])
def test_a_choice_field_rejects_a_bad_value_naming_its_option(name: str) -> None:
    flag = RunConfig.config_keys()[name].flag
    with pytest.raises(ConfigError) as raised:
        RunConfig(**{name: "bogus"})  # type: ignore[arg-type]
    assert str(raised.value).startswith(f"{flag} must be") and "\n" not in str(raised.value)


def cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Run `fedmodel ARGS` in this process: its exit code and its stderr lines."""
    saved = sys.argv
    sys.argv = ["fedmodel", *args]
    try:
        with pytest.raises(SystemExit) as exited:
            main()
    finally:
        sys.argv = saved
    return int(exited.value.code or 0), capsys.readouterr().err.strip().splitlines()


CSV = ["simulate", "csv", "--data", "table.csv", "--label", "outcome"]


@pytest.mark.parametrize(
    "command",
    [["run", "--dir", "federation"], ["simulate", "medical"], CSV],
    ids=["run", "simulate", "simulate-csv"],
)
def test_a_bad_choice_on_the_command_line_is_one_line_naming_the_option(
    command: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    offered = options(RUN if command[0] == "run" else SCENARIOS[command[1]])
    names = [name for name in (*CHOICE_KEYS, "device") if name in offered]
    assert names
    for name in names:
        flag = RunConfig.config_keys()[name].flag
        code, lines = cli_error([*command, flag, "bogus"], capsys)
        assert code == 2 and len(lines) == 1, (flag, lines)
        assert lines[0].startswith(f"error: {flag} must be"), lines
    assert list(tmp_path.iterdir()) == []  # rejected before anything was written


def test_no_dp_means_dp_off_and_contradicts_any_other_mode() -> None:
    assert dp_mode("sample", no_dp=True) == "off"
    assert dp_mode("client", no_dp=False) == "client"
    with pytest.raises(ConfigError, match="--no-dp means --dp off"):
        dp_mode("client", no_dp=True)


def test_min_clients_above_the_clients_of_a_round_is_refused() -> None:
    with pytest.raises(ConfigError, match="--min-clients must be at most the 1 clients"):
        RunConfig(clients=8, fraction=0.1, min_clients=2)
    RunConfig(dataset="covid-clinics", clients=8, fraction=0.1, min_clients=2)  # data decides


def test_help_imports_no_heavy_library() -> None:
    """`fedmodel --help` stays fast: torch, flwr, opacus and pandas load in the commands."""
    code = (
        "import sys, fedmodel.cli.main; "
        "print(sorted({'torch', 'flwr', 'opacus', 'pandas', 'ray'} & sys.modules.keys()))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert loaded.stdout.strip() == "[]"
