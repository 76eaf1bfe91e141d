"""User mistakes end in one clear line and a non-zero exit, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

FEDMODEL = str(Path(sys.executable).parent / "fedmodel")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FEDMODEL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate", "oncology"], "unknown scenario 'oncology'; choose one of: medical"),
        (["simulate", "medical", "--epsilon", "0"], "--epsilon must be a positive number"),
        (["simulate", "medical", "--epsilon", "-2"], "--epsilon must be a positive number"),
        (["simulate", "medical", "--delta", "1"], "--delta must be between 0 and 1"),
        (["simulate", "medical", "--delta", "0"], "--delta must be between 0 and 1"),
        (["simulate", "medical", "--clients", "7000"], "use --clients 314 or fewer"),
        (["simulate", "medical", "--partition", "random"], "--partition must be one of"),
        (["simulate", "medical", "--clients", "many"], "'many' is not a valid integer"),
        (
            ["simulate", "medical", "--epsilon", "2", "--no-dp"],
            "--epsilon sets DP-SGD on the clients, which --no-dp turns off",
        ),
        (
            ["simulate", "medical", "--max-grad-norm", "2", "--dp", "client"],
            "drop one of --max-grad-norm and --dp client",
        ),
    ],
)
def test_user_mistakes_print_one_line_and_fail(
    args: list[str], message: str, tmp_path: Path
) -> None:
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_existing_run_directory_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "summary.json").write_text("{}")
    result = run_cli("simulate", "medical", "--output", "taken", cwd=tmp_path)
    assert result.returncode != 0
    assert "already exists" in result.stderr
    assert (tmp_path / "taken" / "summary.json").read_text() == "{}"


def test_help_lists_the_medical_scenario(tmp_path: Path) -> None:
    result = run_cli("simulate", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "medical" in result.stdout
