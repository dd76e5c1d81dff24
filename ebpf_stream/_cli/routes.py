"""CPU by route: how each process's samples split between the endpoints it served.

A profile answers "which function"; for a web service the first question is
often "which endpoint".  Samples are counted by process name (workers of one
service are summed, as in the folded file) and by the endpoint of the
request they were taken for (``GET /items/{id}``), each with its share of
the process's samples.  The table shows only processes that named a route,
and is not shown at all when none did: a run without requests reads as it
always has.
"""

from __future__ import annotations

from collections import Counter

from rich.table import Table
from rich.text import Text

from .._model.labels import NO_ROUTE, endpoint_label
from .._model.profile import Profile

_ROWS = 10


class RouteShares:
    """Samples by process name and endpoint, over the profiles added."""

    def __init__(self) -> None:
        # (process, endpoint) -> samples; few keys: routes are templates.
        self._samples: Counter[tuple[str, str]] = Counter()

    def add(self, profile: Profile) -> None:
        for s in profile:
            self._samples[s.process, endpoint_label(s.context)] += s.count

    def table(self) -> Table | None:
        """The busiest endpoints, with the share of their process's samples; None
        when no sample was taken for a route."""
        routed = {process for process, endpoint in self._samples if endpoint != NO_ROUTE}
        if not routed:
            return None
        totals: Counter[str] = Counter()
        for (process, _), samples in self._samples.items():
            totals[process] += samples
        rows = sorted(((samples, process, endpoint)
                       for (process, endpoint), samples in self._samples.items()
                       if process in routed),
                      key=lambda row: (-row[0], row[1], row[2]))
        table = Table(title="CPU by route", title_justify="left")
        for name, numeric in (("COMMAND", False), ("ENDPOINT", False), ("SAMPLES", True),
                              ("% OF COMMAND", True)):
            table.add_column(name, justify="right" if numeric else "left")
        for samples, process, endpoint in rows[:_ROWS]:
            # Text, not markup: "[no route]" and names in brackets are shown as they are.
            table.add_row(Text(process), Text(endpoint), f"{samples:,}",
                          f"{100 * samples / totals[process]:.1f}")
        return table
