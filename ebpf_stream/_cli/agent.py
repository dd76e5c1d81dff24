"""``ebpf-stream agent``: profile every process of the machine, unattended, into OTLP.

One agent per machine (a systemd service, or a Kubernetes DaemonSet) feeds
the OpenTelemetry Collector for weeks.  It is ``record`` without a target or
an end: the same run (``run_traced``), every process, until SIGTERM or SIGINT,
then a flush.  Its settings come from a file and the environment
(``agent_config``), its health is reported every interval (``health``), and
the files to deploy it ship with the package (``--print``).

A Collector that is down does not stop the agent: the exporter retries, and
what it gives up is counted in ``undelivered``, logged, and reported.  When
the agent stops with deliveries given up, it says so in a warning and still
exits 0, since it did its job and the counts are in its last report; it exits
non-zero only when the run itself failed (BPF refused, a probe that broke).
"""

from __future__ import annotations

import logging
import os
from importlib.resources import files
from pathlib import Path

import anyio
import click

from .._base.errors import ExportError
from .._base.otlp_settings import Signal
from .._outputs.otlp.exporter import OtlpExporter
from .agent_config import AgentSettings, load
from .backend import backend_options
from .health import Health, log
from .runs import run_traced

DEPLOY_FILES = {
    "config": "agent.toml",
    "systemd": "ebpf-stream-agent.service",
    "kubernetes": "daemonset.yaml",
    "collector": "collector.yaml",
}
"""What ``--print`` shows, by name: the files in ``deploy/``."""
_SHUTDOWN_MARGIN_S = 5.0  # beyond the OTLP flush timeout, for the last batch's conversion


def deploy_file(name: str) -> str:
    """The text of a shipped file, by its ``--print`` name."""
    return files(__package__).joinpath("deploy", DEPLOY_FILES[name]).read_text()


async def run_agent(settings: AgentSettings, health: Health) -> None:
    """Profile until SIGTERM or SIGINT; a delivery given up is logged, not raised."""
    otlp = OtlpExporter(environ=settings.environ)
    config = settings.config
    log.info("agent: profiling every process at %d Hz, exporting to %s every %gs",
             config.sample_rate_hz, otlp.endpoints[Signal.PROFILES].display,
             config.export_interval_s)
    try:
        await run_traced(config, [otlp], (), None, health.watch,
                         max(15.0, otlp.flush_timeout_s + _SHUTDOWN_MARGIN_S))
    except ExportError as exc:
        log.warning("agent: stopped with deliveries given up: %s", exc)
    finally:
        health.final()


@click.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              metavar="PATH", help="The TOML file. Default: $EBPF_STREAM_CONFIG, else "
              "/etc/ebpf-stream/agent.toml if it exists.")
@click.option("--check", is_flag=True,
              help="Check the file and environment, print the settings, and exit.")
@click.option("--print", "shown", type=click.Choice(list(DEPLOY_FILES)),
              help="Print a shipped file: an example config, the systemd unit, the "
              "Kubernetes DaemonSet, or a Collector configuration.")
def agent(config_file: Path | None, check: bool, shown: str | None) -> None:
    """Profile every process of this machine into OTLP, until SIGTERM.

    CPU with Python frames, asyncio loop stalls, and the tracers the config
    switches on; a health report every stats_interval (in the log, and in
    stats_file as JSON lines).  Every key of the file can be set by a variable,
    EBPF_STREAM_ and the key in capitals, which wins over the file.

    \b
    ebpf-stream agent --print config > /etc/ebpf-stream/agent.toml
    ebpf-stream agent --check
    ebpf-stream agent --config /etc/ebpf-stream/agent.toml
    """
    if shown is not None:
        click.echo(deploy_file(shown), nl=False)
        return
    settings = load(config_file, os.environ)
    if check:
        for line in settings.describe():
            click.echo(line)
        return
    # The health reports, and the engine's notes (a program compiled, a collector
    # back), belong in the journal whatever -v says.
    logging.getLogger("ebpf_stream").setLevel(logging.INFO)
    health = Health(settings.stats_interval_s, settings.stats_file)
    anyio.run(run_agent, settings, health, backend_options=backend_options())
