"""Which clients a report names, and by what name.

Up to TABLE_CLIENTS clients every one has a row in the report's privacy table and a name
in its plots. Beyond that a table of hundreds of rows, and a legend of hundreds of
entries, hide what matters, so the report names the clients that bound the spread: the
most, the median and the least epsilon spent, the largest and the smallest, and the
worst site training alone. clients.csv and summary.json keep every client.
"""

from __future__ import annotations

from fedmodel.run_directory import JsonObject, RunSummary

TABLE_CLIENTS = 20


def site_name(summary: RunSummary, client: str) -> str:
    """A client's site name where the data names its sites (north, CA, ...), else its number."""
    names = (summary.federation or {}).get("site_names") or []
    index = int(client) if client.isdigit() else -1
    return str(names[index]) if 0 <= index < len(names) else client


def table_clients(summary: RunSummary) -> list[JsonObject]:
    """The clients the privacy table lists, in the summary's order: every one up to
    TABLE_CLIENTS, else those that bound the spread (see the module docstring)."""
    clients = summary.clients
    if len(clients) <= TABLE_CLIENTS:
        return list(clients)
    chosen: set[str] = set()
    spent = sorted(
        (client for client in clients if client.get("epsilon") is not None),
        key=lambda client: client["epsilon"],
    )
    if spent:
        chosen |= {spent[0]["client"], spent[len(spent) // 2]["client"], spent[-1]["client"]}
    by_size = sorted(clients, key=lambda client: client.get("num_examples") or 0)
    chosen |= {by_size[0]["client"], by_size[-1]["client"]}
    worst = (summary.baselines or {}).get("local_worst")
    if worst:
        chosen.add(worst["client"])
    return [client for client in clients if client["client"] in chosen]


def named_clients(summary: RunSummary) -> list[str]:
    """Every client the report's tables name (the privacy table's and the worst site
    alone), as client ids: each per-site plot must name all of them."""
    named = [client["client"] for client in table_clients(summary)]
    worst = (summary.baselines or {}).get("local_worst")
    if worst and worst["client"] not in named:
        named.append(worst["client"])
    return named
