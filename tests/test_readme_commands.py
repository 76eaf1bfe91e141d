"""The README cannot drift: its runnable blocks run, and print what the README shows.

README.md marks blocks with HTML comments (invisible on GitHub) on the line before them:

- `<!-- runnable -->` before a ```bash block: the block runs as a bash script (`set -e`),
  in README order with the others, in one workspace: cwd and `~` are the workspace, and
  `/tmp/` is its tmp/. A block split by `# terminal N` lines runs its terminals side by
  side, as a user with two terminals would: all but the last in the background, each
  started once the one before it is ready (READY), and stopped at the end (Ctrl-C).
- `<!-- runnable -->` before a plain block: a transcript, `$ command` and what it prints.
- `<!-- output of: COMMAND -->` before a plain block: what COMMAND, run by a runnable
  block, prints.

Small settings: the `fedmodel` on the scripts' PATH is this checkout's CLI with the
flags of SMALL_SETTINGS appended (the later of two values wins), so a README run of 5
rounds runs 1, and `server init` gets free ports. Output is compared by shape, not
numbers: every header of a table shown appears in a printed header with the same
columns, every shown row has a printed row with as many cells, and every other shown
line's words (numbers aside) appear in one printed line. `make` commands are out of scope.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.federation import processes_naming, wait_for_text

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COMMAND_TIMEOUT = 600

# What a long-running command prints once a user would turn to the next terminal.
READY = {"fedmodel server start": "Press Ctrl-C to stop."}


@dataclass(frozen=True)
class Block:
    """A marked fenced block of README.md: its text and the line its fence opens on."""

    kind: str  # "runnable" or "output of: COMMAND"
    language: str
    text: str
    line: int

    @property
    def commands(self) -> list[str]:
        """Its `fedmodel` command lines, continuation lines joined."""
        joined = self.text.replace("\\\n", " ")
        lines = (line.strip().removeprefix("$ ") for line in joined.splitlines())
        return [line for line in lines if re.match(r"(\S+=\S+ )*fedmodel ", line)]


def marked_blocks(markdown: str) -> list[Block]:
    """Every fenced block of `markdown` whose previous line is a marker comment."""
    pattern = re.compile(r"^<!-- (runnable|output of: .+?) -->\n```(\w*)\n(.*?)^```$", re.M | re.S)
    return [
        Block(match[1], match[2], match[3], markdown.count("\n", 0, match.start()) + 2)
        for match in pattern.finditer(markdown)
    ]


# Flags appended to every command that starts with these words (after `fedmodel`).
SMALL_SETTINGS = {
    ("simulate",): ["--rounds", "1", "--local-epochs", "1"],
    ("run",): ["--rounds", "1"],
}

SHIM = """#!{python}
import os, sys
sys.path.insert(0, {root!r})
from fedmodel.runtime.processes import free_port
args = sys.argv[1:]
extra = [flag for words, flags in {small!r}.items()
         if tuple(args[: len(words)]) == words for flag in flags]
if args[:2] == ["server", "init"]:  # ports free now, where the README's defaults may be taken
    extra += ["--fleet-port", str(free_port()), "--control-port", str(free_port())]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), {root!r}]))
os.execv(sys.executable, [sys.executable, "-m", "fedmodel.cli", *args, *extra])
"""


def write_fedmodel_shim(directory: Path) -> None:
    """`fedmodel`: this checkout's CLI, at small settings."""
    directory.mkdir()
    shim = directory / "fedmodel"
    shim.write_text(SHIM.format(python=sys.executable, root=str(ROOT), small=SMALL_SETTINGS))
    shim.chmod(0o755)


@dataclass
class Workspace:
    """Where the README's commands run, and the terminals opened in it."""

    path: Path
    environment: dict[str, str]
    terminals: list[subprocess.Popen[str]]

    def open_terminal(self, text: str, log: Path) -> subprocess.Popen[str]:
        """`text` as a bash script in its own terminal (process group), printing to `log`;
        what it leaves running (`command &`) stops when the workspace closes."""
        script = "set -e\n" + text.replace("/tmp/", f"{self.path}/tmp/")
        with log.open("w") as handle:
            terminal = subprocess.Popen(
                ["bash", "-c", script],
                cwd=self.path,
                env=self.environment,
                stdout=handle,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        self.terminals.append(terminal)
        return terminal

    def run(self, text: str) -> tuple[int, str]:
        """Run `text` to its end: its exit status and what it printed."""
        log = self.path / f"terminal-{len(self.terminals)}.log"
        status = self.open_terminal(text, log).wait(timeout=COMMAND_TIMEOUT)
        return status, log.read_text()

    def run_terminals(self, text: str) -> tuple[int, str]:
        """A block of `# terminal N` sections: the last runs in front, each other one behind
        it, started in turn once the one before is ready."""
        *behind, front = re.split(r"^# terminal \d+\n", text, flags=re.M)[1:]
        for section in behind:
            log = self.path / f"terminal-{len(self.terminals)}.log"
            terminal = self.open_terminal(section, log)
            last = section.strip().splitlines()[-1]
            for command, ready in READY.items():
                if last.startswith(command):
                    wait_for_text(log, ready, terminal, timeout=COMMAND_TIMEOUT)
        return self.run(front)


@contextlib.contextmanager
def workspace(path: Path) -> Iterator[Workspace]:
    """A workspace whose terminals stop at the end: Ctrl-C to one still running its command,
    SIGTERM to what a finished one left behind (`command &` ignores Ctrl-C), then a wait
    until no process names the workspace; as a last resort, those left are killed (only
    this test's)."""
    (path / "tmp").mkdir()
    (path / "examples").symlink_to(ROOT / "examples")
    write_fedmodel_shim(path / "bin")
    environment = {
        **os.environ,
        "HOME": str(path),
        "PATH": os.pathsep.join(
            [str(path / "bin"), str(Path(sys.executable).parent), "/usr/bin", "/bin"]
        ),
        "PYTHONPATH": str(ROOT),
        "COLUMNS": "200",  # tables print their header on one line, as in the README
    }
    space = Workspace(path, environment, [])
    try:
        yield space
    finally:
        for terminal in space.terminals:
            running = terminal.poll() is None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(terminal.pid, signal.SIGINT if running else signal.SIGTERM)
        deadline = time.monotonic() + 30
        while processes_naming(path) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in processes_naming(path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def shape(line: str) -> list[str]:
    """A line's words, each number as "#", a word after a number singular ("1 round")."""
    tokens = re.findall(r"\d[\d.eE+-]*%?|[A-Za-z][A-Za-z'-]*:?", line)
    words: list[str] = []
    for token in tokens:
        if token[0].isdigit():
            words.append("#")
        elif words and words[-1] == "#":
            words.append(re.sub(r"ies$", "y", token).removesuffix("s"))
        else:
            words.append(token)
    return words


def cells(line: str, separator: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip(separator).split(separator)]


def assert_same_shape(shown: str, printed: str, where: str) -> None:
    """Every line the README shows has a printed counterpart: see the module docstring."""
    printed_lines = printed.splitlines()
    for line in shown.splitlines():
        if not line.strip() or line.startswith("$ ") or line.strip() == "...":
            continue
        if line.startswith("┃"):
            headers = [cells(p, "┃") for p in printed_lines if p.startswith("┃")]
            assert cells(line, "┃") in headers, f"{where}: no printed header {line!r}"
        elif line.startswith("│"):
            widths = {len(cells(p, "│")) for p in printed_lines if p.startswith("│")}
            assert len(cells(line, "│")) in widths, f"{where}: no printed row like {line!r}"
        else:
            words = " ".join(shape(line))
            assert any(words in " ".join(shape(p)) for p in printed_lines), (
                f"{where}: no printed line like {line!r} in:\n{printed}"
            )


def test_every_readme_output_block_names_a_command_a_runnable_block_runs() -> None:
    blocks = marked_blocks(README.read_text(encoding="utf-8"))
    commands = {c for block in blocks if block.kind == "runnable" for c in block.commands}
    shown = [block.kind.removeprefix("output of: ") for block in blocks if block.kind != "runnable"]
    assert shown and set(shown) <= commands


def test_the_shape_check_catches_a_sample_without_the_columns_printed_now() -> None:
    """Issue 21's stale README: its round line lacked the AUPRC and recall columns."""
    printed = (
        "round 1/1  AUROC 0.8092  AUPRC 0.6363  recall at 1% FPR 0.1267  accuracy 0.7251  "
        "loss 0.5229  max epsilon 0.999  43 s elapsed\n"
        "┃ client ┃ records ┃ epsilon ┃ delta ┃ noise multiplier ┃ sample rate ┃ steps ┃\n"
        "│ 0      │     788 │   0.999 │ 1e-05 │            1.748 │      0.0769 │    13 │\n"
    )
    current = (
        "round 5/5  AUROC 0.8365  AUPRC 0.6936  recall at 1% FPR 0.2074  accuracy 0.8133  "
        "loss 0.5234  max epsilon 0.995  10 s elapsed\n"
        "┃ client ┃ records ┃ epsilon ┃ delta ┃ noise multiplier ┃ sample rate ┃ steps ┃\n"
        "│ north  │     788 │   0.995 │ 1e-05 │            2.832 │      0.0769 │    65 │\n"
        "...\n"
    )
    assert_same_shape(current, printed, "README")
    stale_line = "round 5/5  AUROC 0.8365  accuracy 0.8133  loss 0.5234  max epsilon 0.995  (10 s)"
    stale_header = "┃ client ┃ epsilon ┃ delta ┃ noise multiplier ┃ sample rate ┃ steps ┃"
    for stale in (stale_line, stale_header):
        with pytest.raises(AssertionError, match="no printed"):
            assert_same_shape(stale, printed, "README")


@pytest.mark.slow
def test_every_runnable_readme_command_runs_and_prints_what_the_readme_shows(
    tmp_path: Path,
) -> None:
    blocks = marked_blocks(README.read_text(encoding="utf-8"))
    runnable = [block for block in blocks if block.kind == "runnable"]
    assert len(runnable) >= 5 and all(block.commands for block in runnable)
    printed: dict[str, str] = {}  # each command's block's output
    with workspace(tmp_path) as space:
        # the data owner's node is the first node of the one-machine federation
        (tmp_path / "fedmodel-node").symlink_to(tmp_path / "tmp" / "node-a")
        for block in runnable:
            where = f"README.md line {block.line}"
            if block.language == "bash":
                terminals = "# terminal" in block.text
                run = space.run_terminals if terminals else space.run
                status, output = run(block.text)
                assert status == 0, f"{where} failed:\n{output}"
            else:
                (command,) = block.commands
                status, output = space.run(command)
                fails = any(line.startswith("error:") for line in block.text.splitlines())
                assert (status != 0) == fails, f"{where}: exit {status}:\n{output}"
                assert_same_shape(block.text, output, where)
            printed.update(dict.fromkeys(block.commands, output))
    for block in blocks:
        if block.kind.startswith("output of: "):
            command = block.kind.removeprefix("output of: ")
            assert command in printed, f"README.md line {block.line}: {command!r} never ran"
            assert_same_shape(block.text, printed[command], f"README.md line {block.line}")
