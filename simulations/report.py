"""Human-readable run report: report.md with the result tables and PNG plots.

Every table and sentence follows the run's scoring (summary.json `scoring`): the task's
metrics in its order, led by its headline metric, which the per-round plot shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedmodel.run_directory import (
    DISTRIBUTED_MECHANISM,
    REPORT_FILE,
    RunSummary,
    Scoring,
    client_level_mechanism,
)
from simulations.sites import site_name, table_clients

PRIVACY_NOTE = (
    "Sample-level (epsilon, delta)-DP for each client's records, composed over every "
    "round it trained in. The history is the exact (noise multiplier, sample rate, "
    "steps) Opacus used, so anyone can recompute epsilon from it."
)

CONSTANT_ROW = "constant prediction (no model)"
CLIENT_LEVEL_COLUMNS = (
    "round",
    "noise multiplier",
    "count noise",
    "effective noise",
    "clipping norm",
    "sample rate",
    "epsilon",
    "survivors",
)
CLIENT_LEVEL_HEADING = "Client-level DP"
PRIVACY_COLUMNS = (
    "client",
    "records",
    "epsilon",
    "delta",
    "noise multiplier",
    "sample rate",
    "steps",
)


def privacy_rows(summary: RunSummary) -> list[tuple[str, ...]]:
    """One row per client the table lists (`table_clients`): what it trained on and the
    privacy it spent (formatted)."""
    rows: list[tuple[str, ...]] = []
    for client in table_clients(summary):
        history = client.get("history") or []
        noise = ", ".join(f"{segment[0]:.3f}" for segment in history) or "-"
        rate = ", ".join(f"{segment[1]:.4f}" for segment in history) or "-"
        steps = str(sum(int(segment[2]) for segment in history)) if history else "-"
        epsilon = "no DP" if client.get("epsilon") is None else f"{client['epsilon']:.3f}"
        delta = "-" if client.get("delta") is None else f"{client['delta']:.0e}"
        rows.append(
            (
                site_name(summary, client["client"]),
                str(client["num_examples"]),
                epsilon,
                delta,
                noise,
                rate,
                steps,
            )
        )
    return rows


def baseline_columns(scoring: Scoring) -> tuple[str, ...]:
    """The baseline table's header: the model, the task's metrics and loss, the epsilon spent."""
    return ("model", *(scoring.label(name) for name in scoring.columns), "epsilon")


def baseline_rows(summary: RunSummary) -> list[tuple[str, ...]]:
    """The federated model and its baselines, one formatted row each."""
    baselines = summary.baselines
    assert baselines is not None, "only for a summary with baselines"
    dp = "DP" if summary.dp else "no DP"
    sites = f"{baselines['local_sites']}/{baselines['local_sites_total']} sites"
    worst = baselines["local_worst"]
    candidates = [
        (f"federated ({dp})", summary.final, summary.max_epsilon),
        ("central, no DP", baselines["central"], None),
        ("central, DP", baselines["central_dp"], _epsilon(baselines["central_dp"])),
        (f"site alone ({dp}), mean of {sites}", baselines["local_mean"], None),
        (
            f"site alone ({dp}), worst: {site_name(summary, worst['client']) if worst else '-'}",
            worst,
            _epsilon(worst),
        ),
        (CONSTANT_ROW, baselines.get("constant"), None),  # absent before session 22
    ]
    return [
        (
            name,
            *(_format(metrics.get(key)) for key in summary.scoring.columns),
            "-" if epsilon is None else f"{epsilon:.3f}",
        )
        for name, metrics, epsilon in candidates
        if metrics is not None
    ]


def baseline_verdict(summary: RunSummary) -> str:
    """What the federation gained over local-only and what privacy cost, in the headline
    metric, in words that carry the sign ("0.0029 AUROC better", "0.12 AUROC worse"): a
    signed number after "gained" or "cost" reads wrong half the time. Then its loss beside
    the constant prediction's."""
    assert summary.baselines is not None, "only for a summary with baselines"
    comparison = summary.baselines["comparison"]
    scoring = summary.scoring
    metric = comparison["metric"]
    label = scoring.label(metric)

    def judged(key: str, flip: bool = False) -> str:
        """Comparison `key` (first minus second) as "X better" or "X worse" for the first
        (for the second with `flip`), whichever way the metric improves."""
        better = scoring.improvement(metric, comparison[key]) * (-1 if flip else 1)
        return f"{abs(better):.4f} {label} {'better' if better >= 0 else 'worse'}"

    parts = []
    if metric in scoring.lower_is_better:
        parts.append(f"Lower {label} is better.")
    if comparison["federated_minus_local_mean"] is not None:
        parts.append(
            f"The federated model scored {judged('federated_minus_local_mean')} than a site "
            f"training alone (mean site) and {judged('federated_minus_local_worst')} than "
            "the worst site."
        )
    if comparison["central_minus_central_dp"] is not None:
        parts.append(
            f"Central training under DP scored {judged('central_minus_central_dp', flip=True)} "
            f"than without DP; the federated model {judged('central_dp_minus_federated', True)} "
            "than central DP."
        )
    elif comparison["central_minus_federated"] is not None:
        parts.append(
            f"The federated model scored {judged('central_minus_federated', flip=True)} than "
            "central training."
        )
    parts.extend(_loss_against_constant(summary))
    return " ".join(parts)


def _loss_against_constant(summary: RunSummary) -> list[str]:
    """The federated model's loss beside the constant prediction's: whether its outputs,
    read as probabilities (or values), beat knowing no feature at all."""
    constant = (summary.baselines or {}).get("constant") or {}
    ours, theirs = (summary.final or {}).get("loss"), constant.get("loss")
    if ours is None or theirs is None:
        return []
    worse = ours > theirs
    return [
        f"The federated model's loss, {ours:.4f}, is {abs(ours - theirs):.4f} "
        f"{'higher' if worse else 'lower'} than the constant prediction's ({theirs:.4f})"
        + (": judged by its loss, it is worse than no model." if worse else ".")
    ]


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _epsilon(metrics: dict[str, Any] | None) -> float | None:
    return None if metrics is None else metrics.get("epsilon")


def report_title(summary: RunSummary) -> str:
    return f"FedModel run: {summary.scenario} / {summary.dataset}"


def run_description(summary: RunSummary) -> str:
    """The run in one sentence: how many clients and rounds, and what DP it ran under."""
    return (
        f"{summary.num_clients} clients, {summary.rounds} rounds, "
        + (
            f"DP-SGD per client at target epsilon {summary.target_epsilon} "
            f"(delta {summary.delta}, {str(summary.accountant).upper()} accountant)."
            if summary.dp
            else "no DP-SGD on the clients."
        )
        + (
            f" Client-level DP: {client_level_mechanism(summary.client_level_dp)} (below)."
            if summary.client_level_dp
            else ""
        )
    )


def round_columns(scoring: Scoring) -> tuple[str, ...]:
    """The per-round table's header: the task's metrics between the round and its costs."""
    labels = (scoring.label(name) for name in scoring.columns)
    return ("round", *labels, "train loss", "max epsilon", "clients")


def round_rows(summary: RunSummary) -> list[tuple[str, ...]]:
    """One formatted row per round: the global model's scores and what the round spent."""
    return [
        (
            str(row["round"]),
            *(_format(row.get(name)) for name in summary.scoring.columns),
            _format(row["train_loss"]),
            "-" if row["max_epsilon"] is None else f"{row['max_epsilon']:.3f}",
            str(row["clients"]),
        )
        for row in summary.per_round
    ]


def _table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """A Markdown table's lines."""
    return [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def write_report(run_dir: Path, summary: RunSummary) -> Path:
    """Write report.md and its plots into `run_dir`; returns the report's path."""
    from simulations.plots import write_plots  # matplotlib: only when a report is written

    plots = write_plots(run_dir, summary)
    scoring = summary.scoring
    headline, *others = scoring.described(summary.final_metrics)
    lines = [
        f"# {report_title(summary)}",
        "",
        run_description(summary),
        "",
        f"**Final {summary.scored_on} {headline}**, {', '.join(others)}.",
        "",
        *(f"{sentence}\n" for sentence in federation_sentences(summary)),
        *_baseline_lines(summary),
        *_heterogeneity_lines(summary),
        "## Rounds",
        "",
        *_table(round_columns(scoring), round_rows(summary)),
        "",
        "## Privacy spent per client",
        "",
        PRIVACY_NOTE,
        "",
        *_partial_table_lines(summary),
        *_table(PRIVACY_COLUMNS, privacy_rows(summary)),
    ]
    lines += _client_level_lines(summary)
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    path = run_dir / REPORT_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def _partial_table_lines(summary: RunSummary) -> list[str]:
    note = partial_table_note(summary)
    return [] if note is None else [note, ""]


def partial_table_note(summary: RunSummary) -> str | None:
    """Why the privacy table lists some clients only, where it does."""
    listed = len(table_clients(summary))
    if listed == len(summary.clients):
        return None
    return (
        f"{listed} of the {len(summary.clients)} clients: those that spent the most, the "
        "median and the least epsilon, the largest and the smallest, and the worst site "
        "alone. clients.csv and summary.json hold every client."
    )


def _client_level_lines(summary: RunSummary) -> list[str]:
    """The client-level DP releases (--dp client, distributed or both), one row per round."""
    if not summary.client_level_dp:
        return []
    return [
        "",
        f"## {CLIENT_LEVEL_HEADING}",
        "",
        client_level_note(summary),
        "",
        *_table(CLIENT_LEVEL_COLUMNS, client_level_rows(summary)),
    ]


def client_level_note(summary: RunSummary) -> str:
    """What the client-level DP guarantees, and against whom."""
    central = summary.client_level_dp
    assert central, "only for a run with client-level DP"
    mechanism = client_level_mechanism(central)
    against = (
        "It protects a client from the coordinator too: the clients add the noise before "
        "secure aggregation, and each release is accounted with the survivors whose noise "
        "is in its sum."
        if mechanism == DISTRIBUTED_MECHANISM
        else "It protects a client from the other clients and anyone who sees a model, not "
        "from the coordinator."
    )
    return (
        f"{mechanism[0].upper()}{mechanism[1:]}: (epsilon, delta)-DP for each client's whole "
        f"contribution, epsilon {central['epsilon']:.3f} at delta {central['delta']:g} "
        f"({central['accountant'].upper()}, ledger {central['ledger']}). {against}"
    )


def client_level_rows(summary: RunSummary) -> list[tuple[str, ...]]:
    """One formatted row per client-level DP release of the server."""
    central = summary.client_level_dp
    assert central, "only for a run with client-level DP"
    return [
        (
            str(r["round"]),
            f"{r['noise_multiplier']:.4f}",
            f"{r['clipped_count_stddev']:g}",
            f"{r['effective_noise_multiplier']:.4f}",
            f"{r['clipping_norm']:.4f}",
            f"{r['sample_rate']:g}",
            f"{r['epsilon']:.3f}",
            str(r.get("survivors", "-")),  # distributed DP: the clients whose noise is in it
        )
        for r in central["releases"]
    ]


def federation_sentences(summary: RunSummary) -> list[str]:
    """Where the clients came from and, for synthetic data, how close the model came to
    the ground truth."""
    federation = summary.federation or {}
    lines = []
    if federation.get("natural_sites") is not None:
        small, rows = len(federation["too_small_to_train"]), federation["min_dp_rows"]
        lines.append(
            f"Clients are the data's {federation['natural_sites']} natural sites; "
            + (
                f"{small} of them {'has' if small == 1 else 'have'} fewer than {rows} training "
                "rows, too few to train under DP, and sat out."
                if small
                else f"each has at least {rows} training rows and trains."
            )
        )
    auroc = summary.final_metrics.get("auroc")
    if federation.get("achievable_auroc") is not None and auroc is not None:
        achievable = federation["achievable_auroc"]
        share = (auroc - 0.5) / (achievable - 0.5)
        lines.append(
            f"The ground-truth risk model reaches AUROC {achievable:.4f} on the "
            f"{_rows_scored(summary)}; the "
            f"federated model achieved {share:.1%} of that gain over chance."
        )
    return lines


def baseline_note(summary: RunSummary) -> str:
    """How the baselines compare: same training settings, same rows scored."""
    return (
        "The same model trained with the same learning rate, batch size and passes over the "
        f"data, scored on the same {_rows_scored(summary)}. The constant prediction gives every "
        "row the one output that best fits the pooled training rows (for a yes/no outcome, "
        "their base rate): the score of knowing no feature."
    )


def _rows_scored(summary: RunSummary) -> str:
    return "test set" if summary.scored_on == "test" else "validation rows"


def _baseline_lines(summary: RunSummary) -> list[str]:
    if not summary.baselines:
        return []
    lines = [
        "## Baselines",
        "",
        baseline_note(summary),
        "",
        *_table(baseline_columns(summary.scoring), baseline_rows(summary)),
    ]
    return [*lines, "", baseline_verdict(summary), ""]


def _heterogeneity_lines(summary: RunSummary) -> list[str]:
    if not summary.heterogeneity:
        return []
    return ["## Heterogeneity", "", heterogeneity_note(summary), ""]


def heterogeneity_note(summary: RunSummary) -> str:
    """How unevenly the data is spread across the clients, in three numbers."""
    statistics = summary.heterogeneity
    assert statistics, "only for a run with heterogeneity statistics"
    return (
        f"Client sizes: Gini {statistics['size_gini']:.2f}, largest/median "
        f"{statistics['size_max_over_median']:.1f}. Label rate "
        f"({statistics['label_rate_is']}) sd across clients {statistics['label_rate_sd']:.3f}. "
        f"Mean covariate drift {statistics['mean_drift']:.3f} (RMS standardised difference "
        "between a client's feature means and the federation's; 0.2 small, 0.5 medium). "
        "Per-client values are in summary.json; see heterogeneity.png."
    )
