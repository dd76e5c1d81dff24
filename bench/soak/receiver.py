"""The soak's collector: an OTLP/HTTP receiver in its own process, counting what it took.

It prints its endpoint, then answers each stdin line with its counters as
JSON; when stdin closes it goes down as a collector does: from then on every
call is refused (503), then, once calls in flight are answered, the port
closes, and the last line printed is the final count.  Counted are the CPU
samples of the profiles requests (each "samples" profile's timestamps, or
its aggregate value) and the traced events of the logs requests (records
with an event name; the agent's own warnings carry none), in the units the
agent's ``exported`` and ``undelivered`` counters use.

    python receiver.py PORT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import otlp_receivers

_DRAIN_S = 1.0  # for calls in flight when the collector goes down


def profile_samples(request: Any) -> int:
    strings = request.dictionary.string_table
    count = 0
    for resource in request.resource_profiles:
        for scope in resource.scope_profiles:
            for profile in scope.profiles:
                if strings[profile.sample_type.type_strindex] != "samples":
                    continue  # the CPU-time twin of the same samples
                for sample in profile.samples:
                    count += len(sample.timestamps_unix_nano) or sum(sample.values)
    return count


def event_records(request: Any) -> int:
    return sum(1 for resource in request.resource_logs for scope in resource.scope_logs
               for record in scope.log_records if record.event_name)


class Counting(list[otlp_receivers.Call]):
    """Stands in for the receiver's list of calls: counts each one, keeps none."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = {"samples": 0, "records": 0, "profiles_calls": 0, "metrics_calls": 0,
                       "logs_calls": 0, "refused_calls": 0}

    def append(self, call: otlp_receivers.Call) -> None:
        if call.failed:
            self.counts["refused_calls"] += 1
            return
        self.counts[f"{call.signal}_calls"] += 1
        if call.signal == "profiles":
            self.counts["samples"] += profile_samples(call.request)
        elif call.signal == "logs":
            self.counts["records"] += event_records(call.request)


async def serve(port: int) -> None:
    behaviour = otlp_receivers.Behaviour()
    calls = Counting()
    async with otlp_receivers.http_receiver(behaviour, port=port) as receiver:
        receiver.calls = calls
        print(receiver.endpoint, flush=True)
        while await anyio.to_thread.run_sync(sys.stdin.readline):
            print(json.dumps(calls.counts), flush=True)
        behaviour.fail_first = 2**62  # refuse from now on; what is in flight is answered
        await anyio.sleep(_DRAIN_S)
    print(json.dumps(calls.counts), flush=True)


if __name__ == "__main__":
    anyio.run(serve, int(sys.argv[1]))
