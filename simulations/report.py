"""Human-readable run report: report.md with the result tables and two PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PRIVACY_COLUMNS = (
    "client",
    "records",
    "epsilon",
    "delta",
    "noise multiplier",
    "sample rate",
    "steps",
)


def privacy_rows(summary: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per client: what it trained on and the privacy it spent (formatted)."""
    rows: list[tuple[str, ...]] = []
    for client in summary["clients"]:
        history = client.get("history") or []
        noise = ", ".join(f"{segment[0]:.3f}" for segment in history) or "-"
        rate = ", ".join(f"{segment[1]:.4f}" for segment in history) or "-"
        steps = str(sum(int(segment[2]) for segment in history)) if history else "-"
        epsilon = "no DP" if client.get("epsilon") is None else f"{client['epsilon']:.3f}"
        delta = "-" if client.get("delta") is None else f"{client['delta']:.0e}"
        rows.append(
            (client["client"], str(client["num_examples"]), epsilon, delta, noise, rate, steps)
        )
    return rows


def write_report(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write report.md and its plots into `run_dir`; returns the report's path."""
    plots = _write_plots(run_dir, summary)
    final = summary["final"]
    lines = [
        f"# FedModel run: {summary['scenario']} / {summary['dataset']}",
        "",
        f"{summary['num_clients']} clients, {summary['rounds']} rounds, "
        + (
            f"DP-SGD per client at target epsilon {summary['target_epsilon']} "
            f"(delta {summary['delta']}, {summary['accountant'].upper()} accountant)."
            if summary["dp"]
            else "no differential privacy."
        ),
        "",
        f"**Final test AUROC {final['auroc']:.4f}**, accuracy {final['accuracy']:.4f}, "
        f"loss {final['loss']:.4f}.",
        "",
        "## Rounds",
        "",
        "| round | AUROC | accuracy | loss | train loss | max epsilon | clients |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary["per_round"]:
        epsilon = "-" if row["max_epsilon"] is None else f"{row['max_epsilon']:.3f}"
        lines.append(
            f"| {row['round']} | {row['auroc']:.4f} | {row['accuracy']:.4f} | {row['loss']:.4f} "
            f"| {row['train_loss']:.4f} | {epsilon} | {row['clients']} |"
        )
    lines += [
        "",
        "## Privacy spent per client",
        "",
        "Sample-level (epsilon, delta)-DP for each client's records, composed over every "
        "round it trained in. The history is the exact (noise multiplier, sample rate, "
        "steps) Opacus used, so anyone can recompute epsilon from it.",
        "",
        "| " + " | ".join(PRIVACY_COLUMNS) + " |",
        "|" + "---|" * len(PRIVACY_COLUMNS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in privacy_rows(summary)]
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_plots(run_dir: Path, summary: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    rounds = [row["round"] for row in summary["per_round"]]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(rounds, [row["auroc"] for row in summary["per_round"]], marker="o")
    axis.set(xlabel="round", ylabel="test AUROC", title="Global model AUROC per round")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(run_dir / "auroc.png", dpi=100)
    plt.close(figure)
    names.append("auroc.png")
    if summary["dp"]:
        figure, axis = plt.subplots(figsize=(6, 4))
        for client in summary["clients"]:
            points = client["epsilon_by_round"]
            axis.plot(
                [p[0] for p in points], [p[1] for p in points], marker=".", label=client["client"]
            )
        axis.axhline(summary["target_epsilon"], color="red", linestyle="--", label="target")
        axis.set(xlabel="round", ylabel="epsilon", title="Epsilon spent per client")
        axis.grid(alpha=0.3)
        if len(summary["clients"]) <= 12:
            axis.legend(title="client", fontsize="small")
        figure.tight_layout()
        figure.savefig(run_dir / "epsilon.png", dpi=100)
        plt.close(figure)
        names.append("epsilon.png")
    return names
