"""Rounds of a deployed federation: FedModel's node executor beside Flower's default executor.

One TLS federation on 127.0.0.1, made with the fedmodel CLI as README's "Try it on one
machine" does it: `fedmodel server init/start/enroll`, `fedmodel client init/start` per
node (400 flchain rows each, label `death`, owner budget epsilon 100), `fedmodel run`.
Then the same federation, the same enrolled keys and data, with the nodes' SuperNodes
started directly as `flower-supernode` in Flower's default subprocess isolation (its
SuperExec starts one `flwr-clientapp` per message, which installs the run's FAB and
imports the ClientApp), and the same `fedmodel run` again. With --repeats the two
variants alternate; every run starts with empty privacy ledgers, so no budget stops one.

A deployed round is one train message per node: the node scores the model it receives
on its held-out rows, then trains, so round t's train replies carry round t-1's
evaluation, and `fedmodel run` prints round t-1's progress line when they are in.
Per train round t = 3..R (round 1 also holds start-up and the query round; round 2's
cycle starts before round 1's line):
- round s: time between the progress lines of rounds t-2 and t-1 (stamped on arrival),
  which is round t's train cycle;
- from each SuperNode's log lines, stamped as they are written, max over nodes for
  round t's train message: idle s, from its previous reply "Sent successfully" to
  "Receiving" the message (Flower's polling of the SuperLink, and the wait for the
  slowest node), and at node s, from "Receiving" it to its reply "Sent successfully"
  (pulling it, the executor, the ClientApp, pushing the reply);
- ClientApp s (FedModel only): max over nodes of the executor's "answered in" for the
  message (NODE/executor.log); overhead = round s - ClientApp s.
Medians over rounds, then over repeats; ratio baseline / FedModel. With --keep the
working directory stays, with every run's logs stamped on one clock (runs/*.stamped.*).

Usage: python -m benchmarks.deployment [--rounds 10] [--nodes 2] [--repeats 1]
       [--csv PATH] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import statistics
import sys
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.deployment_federation import (
    ROWS_PER_NODE,
    RUN_EPSILON,
    STARTED,
    Federation,
    federation_on_loopback,
    make_federation,
    reset_ledgers,
    run_federation,
    say,
    start_fedmodel_nodes,
    start_flower_nodes,
    stop_fedmodel_nodes,
    stop_flower_nodes,
    wait_for_online,
    wait_until_offline,
)
from benchmarks.output import write_csv

OURS = "FedModel executor"
BASELINE = "Flower default executor"
SUPERNODE_IDLE_SLEEP_S = 3.0  # flwr/supernode/start_client_internal.py, after an empty pull
ANSWERED = re.compile(r"run (\d+) ([\w.]+): answered in ([\d.]+) s")
RECEIVING = re.compile(r"Receiving: ([\w.]+) message")
SENDING = re.compile(r"Sending: ([\w.]+) message")
SENT = "Sent successfully"


@dataclass(frozen=True)
class RoundTime:
    """One round of one run: wall time and where the nodes spent theirs."""

    variant: str
    repeat: int
    round: int
    round_s: float
    idle_s: float  # nan when a SuperNode log lacked the round's messages
    node_s: float
    clientapp_s: float  # nan for the baseline: its ClientApp runs in a process of its own


class LogClock:
    """Follows a log file from its current end and stamps each new line on arrival."""

    def __init__(self, path: Path, interval: float = 0.05) -> None:
        self.path = path
        self.lines: list[tuple[float, str]] = []
        self._interval = interval
        self._offset = path.stat().st_size if path.exists() else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> LogClock:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def write(self, path: Path) -> None:
        """The stamped lines, in seconds since the benchmark started (to merge logs by)."""
        path.write_text("".join(f"{at - STARTED:9.2f} {line}\n" for at, line in self.lines))

    def _follow(self) -> None:
        pending = b""
        while True:
            stopping = self._stop.is_set()  # one last read after the stop request
            with contextlib.suppress(FileNotFoundError), self.path.open("rb") as log:
                log.seek(self._offset)
                pending += log.read()
                self._offset = log.tell()
            now = time.monotonic()
            *complete, pending = pending.split(b"\n")
            self.lines += [(now, line.decode(errors="replace")) for line in complete]
            if stopping:
                return
            time.sleep(self._interval)


def message_times(
    lines: list[tuple[float, str]],
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per message type, in order, from a SuperNode's stamped log: seconds it spent on the
    message (Receiving -> its reply Sent), and seconds it sat idle before the message
    arrived (the previous reply Sent -> Receiving; Flower's polling of the SuperLink)."""
    received: dict[str, float] = {}
    busy: dict[str, list[float]] = defaultdict(list)
    idle: dict[str, list[float]] = defaultdict(list)
    sending: str | None = None
    last_sent: float | None = None
    for at, line in lines:
        if match := RECEIVING.search(line):
            received[match[1]] = at
            if last_sent is not None:
                idle[match[1]].append(at - last_sent)
        elif match := SENDING.search(line):
            sending = match[1]
        elif SENT in line and sending in received:
            busy[sending].append(at - received.pop(sending))
            last_sent, sending = at, None
    return busy, idle


def executor_times(log: Path, offset: int) -> dict[str, list[float]]:
    """Per message type, in order: FedModel executor's 'answered in' seconds after `offset`."""
    with log.open(errors="replace") as file:
        file.seek(offset)
        text = file.read()
    durations: dict[str, list[float]] = defaultdict(list)
    for match in ANSWERED.finditer(text):
        durations[match[2]].append(float(match[3]))
    return durations


def per_round(times: list[dict[str, list[float]]], train_round: int) -> float:
    """Max over nodes of the time of round `train_round`'s train message (nan if not logged)."""
    index = train_round - 1
    if any(len(node["train"]) <= index for node in times):
        return float("nan")
    return max(node["train"][index] for node in times)


def measure(federation: Federation, variant: str, repeat: int, rounds: int) -> list[RoundTime]:
    """Start the variant's nodes, run `rounds`, stop the nodes; the rounds' times."""
    nodes = federation.nodes
    reset_ledgers(federation)
    say(f"{variant}, repeat {repeat}: starting {len(nodes)} nodes")
    if variant == OURS:
        start_fedmodel_nodes(federation)
        log_name = "supernode.log"
    else:
        start_flower_nodes(federation)
        log_name = "baseline-supernode.log"
    try:
        wait_for_online(federation, len(nodes))
        say(
            f"{variant}, repeat {repeat}: {len(nodes)} nodes online; fedmodel run ({rounds} rounds)"
        )
        executor_logs = [federation.node_dir(node) / "executor.log" for node in nodes]
        offsets = [log.stat().st_size if log.exists() else 0 for log in executor_logs]
        output = federation.root / "runs" / f"{'ours' if variant == OURS else 'flower'}-{repeat}"
        output.parent.mkdir(exist_ok=True)
        with contextlib.ExitStack() as stack:
            clocks = [
                stack.enter_context(LogClock(federation.node_dir(node) / log_name))
                for node in nodes
            ]
            others = [stack.enter_context(LogClock(log)) for log in executor_logs]
            others.append(stack.enter_context(LogClock(federation.server / "superlink.log")))
            arrived = run_federation(federation, rounds, output)
        for clock in [*clocks, *others]:  # kept with --keep, to see where a round's time goes
            name = f"{clock.path.parent.name}-{clock.path.stem}.stamped.log"
            clock.write(output.parent / f"{output.name}-{name}")
    finally:
        say(f"{variant}, repeat {repeat}: stopping the nodes")
        if variant == OURS:
            stop_fedmodel_nodes(federation)
        else:
            stop_flower_nodes(federation)
        wait_until_offline(federation)
    at_node, idle = zip(*(message_times(clock.lines) for clock in clocks), strict=True)
    in_app = [
        executor_times(log, offset) for log, offset in zip(executor_logs, offsets, strict=True)
    ]
    return [
        RoundTime(
            variant=variant,
            repeat=repeat,
            round=train_round,
            round_s=arrived[train_round - 1] - arrived[train_round - 2],
            idle_s=per_round(list(idle), train_round),
            node_s=per_round(list(at_node), train_round),
            clientapp_s=per_round(in_app, train_round) if variant == OURS else float("nan"),
        )
        for train_round in range(3, rounds + 1)
    ]


@dataclass(frozen=True)
class Summary:
    """One variant: medians over train rounds 3..R, then over repeats."""

    variant: str
    round_s: float
    idle_s: float
    node_s: float
    clientapp_s: float

    @property
    def overhead_s(self) -> float:
        return self.round_s - self.clientapp_s


def summarize(times: list[RoundTime], variant: str) -> Summary:
    def median_of(name: str) -> float:
        per_repeat: dict[int, list[float]] = defaultdict(list)
        for row in times:
            if row.variant == variant:
                per_repeat[row.repeat].append(getattr(row, name))
        medians = [statistics.median(values) for values in per_repeat.values()]
        return statistics.median(medians) if medians else float("nan")

    names = ("round_s", "idle_s", "node_s", "clientapp_s")
    return Summary(variant, *(median_of(name) for name in names))


def print_table(times: list[RoundTime], args: argparse.Namespace) -> None:
    ours, baseline = summarize(times, OURS), summarize(times, BASELINE)
    print(
        f"deployment on 127.0.0.1 over TLS: {args.nodes} nodes x {ROWS_PER_NODE} flchain rows, "
        f"{args.rounds} rounds, epsilon {RUN_EPSILON:g}, CPU; medians over train rounds "
        f"3-{args.rounds}" + (f", then over {args.repeats} repeats" if args.repeats > 1 else "")
    )
    columns = ("round s", "idle s", "at node s", "ClientApp s", "overhead s", "x ours")
    print(f"{'variant':<24}" + "".join(f"{name:>12}" for name in columns))
    for summary in (ours, baseline):
        values = (summary.round_s, summary.idle_s, summary.node_s, summary.clientapp_s,
                  summary.overhead_s, summary.round_s / ours.round_s)  # fmt: skip
        print(f"{summary.variant:<24}" + "".join(f"{_number(value):>12}" for value in values))
    print(
        f"baseline / ours per round: {baseline.round_s / ours.round_s:.2f}x "
        f"({baseline.round_s - ours.round_s:+.2f} s)"
    )
    print(
        "round s: between successive `fedmodel run` progress lines (one train message per "
        "node). Max over nodes, per train message: idle s, from a SuperNode's reply sent to "
        "its next message received; at node s, from received to reply sent; ClientApp s, "
        "FedModel's executor's 'answered in'. overhead = round - ClientApp."
    )
    print(
        f"Flower's polling floor: a SuperNode sleeps {SUPERNODE_IDLE_SLEEP_S:g} s after an empty "
        "pull from the SuperLink (flwr/supernode/start_client_internal.py), and it pulls right "
        "after sending its reply, before the server has the next message: so every message "
        f"waits ~{SUPERNODE_IDLE_SLEEP_S:g} s at the node, which FedModel cannot shorten "
        "without patching Flower. FedModel sends one message per round (evaluation rides on "
        "the next train message) and its ServerApp polls replies every 0.1 s "
        "(server/polling_grid.py)."
    )
    print(
        f"overhead beyond training and Flower's floor (ours): "
        f"{ours.overhead_s - SUPERNODE_IDLE_SLEEP_S:.2f} s per round"
    )


def _number(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"  # nan: not measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="rounds per run (at least 3)")
    parser.add_argument("--nodes", type=int, default=2, help="enrolled nodes (1-19)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant, alternating")
    parser.add_argument("--csv", type=Path, help="also write every measured round here")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs)")
    args = parser.parse_args()
    if args.rounds < 3 or not 1 <= args.nodes <= 19 or args.repeats < 1:
        parser.error("--rounds must be at least 3, --nodes 1-19, --repeats at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on SIGTERM too
    times: list[RoundTime] = []
    with federation_on_loopback(args.nodes, args.keep) as federation:
        make_federation(federation)
        for repeat in range(1, args.repeats + 1):
            for variant in (OURS, BASELINE):
                times += measure(federation, variant, repeat, args.rounds)
    print()
    print_table(times, args)
    if args.csv is not None:
        write_csv(args.csv, [asdict(row) for row in times])
    print(f"{2 * args.repeats} runs in {time.monotonic() - STARTED:.0f} s")


if __name__ == "__main__":
    main()
