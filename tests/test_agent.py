"""``ebpf-stream agent``, the node agent: as a real process with the capabilities its
unit and DaemonSet grant, against real OTLP receivers; its settings; its health
report; and the files it ships, checked by the tools that read them."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import otlp_stacks
import pytest
import yaml
from _support import NOBODY, ROOT, SYSTEM_PYTHON, WORKLOADS, program_ids, sampling, unloaded
from otlp_receivers import closed_port, http_receiver

from ebpf_stream._bpf.syscalls import BpfMap, create_map, hash_map_usage

AGENT = [sys.executable, "-m", "ebpf_stream._cli", "agent"]
DEPLOY = ROOT / "ebpf_stream" / "_cli" / "deploy"
SHIPPED = {"config": "agent.toml", "systemd": "ebpf-stream-agent.service",
           "kubernetes": "daemonset.yaml", "collector": "collector.yaml"}
STATS_FIELDS = {"time", "uptime_s", "rss_bytes", "open_fds", "cpu_s", "received",
                "dropped_kernel", "dropped_user", "exported", "lost_stacks", "export_errors",
                "undelivered", "rejected", "maps"}

bpf = [pytest.mark.bpf, pytest.mark.usefixtures("bpf_environment")]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without OTLP or agent settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "EBPF_STREAM_"))}
    return {**env, **extra}


def shipped_config(tmp_path: Path, endpoint: str) -> Path:
    """The shipped agent.toml, as an operator edits it: only the endpoint changed."""
    text, n = re.subn(r'(?m)^endpoint = ".*"$', f'endpoint = "{endpoint}"',
                      (DEPLOY / "agent.toml").read_text())
    assert n == 1
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def daemonset_documents() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((DEPLOY / "daemonset.yaml").read_text()))


def of_kind(kind: str) -> dict[str, Any]:
    (document,) = (d for d in daemonset_documents() if d["kind"] == kind)
    return document


def agent_container() -> dict[str, Any]:
    (container,) = of_kind("DaemonSet")["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def unit_setting(name: str) -> str:
    (value,) = re.findall(rf"(?m)^{name}=(.*)$",
                          (DEPLOY / "ebpf-stream-agent.service").read_text())
    return value  # type: ignore[no-any-return]


def granted() -> list[str]:
    """The capabilities the unit grants, as setpriv names them (``bpf``, ``perfmon``...)."""
    caps = unit_setting("CapabilityBoundingSet").split()
    return [cap.removeprefix("CAP_").lower() for cap in caps]


def with_granted_capabilities() -> list[str]:
    """The prefix that runs a command as root with the granted capabilities alone."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("dropping capabilities needs root and setpriv")
    caps = ",".join(f"+{cap}" for cap in granted())
    return ["setpriv", f"--inh-caps=-all,{caps}", f"--ambient-caps=-all,{caps}",
            f"--bounding-set=-all,{caps}"]


def check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, *args], capture_output=True, text=True, timeout=60,
                          env=clean_env() if env is None else env)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0].removeprefix("error: ")


def reports(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


_RECEIVED = re.compile(r"^INFO: health: .*; received [1-9]", re.MULTILINE)


class Agent:
    """``ebpf-stream agent --config PATH`` as a real process, stopped by SIGTERM."""

    def __init__(self, config: Path, env: dict[str, str], prefix: list[str]) -> None:
        self.log = config.with_suffix(".log")
        self._log = self.log.open("w")
        self.process = subprocess.Popen([*prefix, *AGENT, "--config", str(config)], env=env,
                                        stdout=self._log, stderr=subprocess.STDOUT)

    def wait_sampling(self, timeout: float = 60) -> set[int]:
        """Wait until the CPU program runs; returns the ids of the programs it loaded.

        Without CAP_SYS_ADMIN the agent cannot turn on the kernel's BPF run-time
        counts, which ``sampling`` reads (unless another process has them on): then
        its health report's first sample says so.
        """
        deadline = time.monotonic() + timeout
        while not (sampling(self.process.pid) or _RECEIVED.search(self.log.read_text())):
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the agent did not start sampling"
            time.sleep(0.05)
        return program_ids(self.process.pid)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    """Every agent a test starts, killed at the end if the test did not stop it."""
    started: list[Agent] = []
    yield started
    for agent in started:
        agent.close()


def run_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Short intervals, so that a test takes seconds."""
    return clean_env(EBPF_STREAM_EXPORT_INTERVAL="0.5", EBPF_STREAM_STATS_INTERVAL="0.5",
                     EBPF_STREAM_STATS_FILE=str(tmp_path / "stats.jsonl"), **extra)


async def wait_until(what: str, condition: Any, agent: Agent, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert agent.process.poll() is None, agent.log.read_text()
        assert time.monotonic() < deadline, f"{what}: {agent.log.read_text()[-2000:]}"
        await anyio.sleep(0.1)


def check_reports(lines: list[dict[str, Any]]) -> None:
    assert lines
    for report in lines:
        assert set(report) == STATS_FIELDS
        assert report["rss_bytes"] > 0 and report["open_fds"] > 0 and report["cpu_s"] > 0
        for entries, most in report["maps"].values():
            assert 0 <= entries <= most
    assert [r["time"] for r in lines] == sorted(r["time"] for r in lines)
    assert [r["received"] for r in lines] == sorted(r["received"] for r in lines)


# -- the agent running ----------------------------------------------------------------------


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
@pytest.mark.anyio
async def test_the_shipped_config_profiles_another_users_python_with_the_granted_capabilities(
        tmp_path: Path, workdir: Path, agents: list[Agent]) -> None:
    """The agent as the unit and DaemonSet run it: root with their capabilities alone.
    A Python workload of uid 65534 started after it is profiled with Python frames;
    SIGTERM ends it with status 0, its reports written and its programs unloaded."""
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"the workload runs on Debian's {SYSTEM_PYTHON}")
    prefix = with_granted_capabilities()
    script = workdir / "shares.py"  # where uid 65534 can read it
    shutil.copy(WORKLOADS / "python" / "shares.py", script)
    stats = tmp_path / "stats.jsonl"
    async with http_receiver() as receiver:
        agent = Agent(shipped_config(tmp_path, receiver.endpoint), run_env(tmp_path), prefix)
        agents.append(agent)
        ours = await anyio.to_thread.run_sync(agent.wait_sampling)
        workload = subprocess.Popen([*NOBODY, str(SYSTEM_PYTHON), str(script), "30"],
                                    stdout=subprocess.PIPE, text=True)
        try:
            def python_frames() -> list[tuple[str, ...]]:
                return [frames for (pid, frames) in otlp_stacks.stacks(
                    receiver.requests("profiles")) if pid == workload.pid
                    and any(f.startswith("alpha (shares.py:") for f in frames)]

            await wait_until("no Python frames of the workload arrived",
                             lambda: python_frames() and len(reports(stats)) >= 2, agent)
        finally:
            workload.send_signal(signal.SIGINT)
            workload.wait(timeout=30)
        # In a thread: the receiver answers the last flush from this event loop.
        assert await anyio.to_thread.run_sync(agent.stop) == 0, agent.log.read_text()
    log = agent.log.read_text()
    assert "Traceback" not in log and "ERROR" not in log, log
    assert ours and unloaded(ours), "the agent left programs loaded"
    for request in receiver.requests("profiles"):
        for rp in request.resource_profiles:
            attributes = otlp_stacks.resource_attributes(rp.resource)
            assert attributes["deployment.environment.name"] == "production"  # [resource]
    lines = reports(stats)
    check_reports(lines)
    assert lines[0]["uptime_s"] >= 0.5, "the first report comes after one interval"
    assert lines[-1]["received"] >= lines[-1]["exported"] > 0
    assert lines[-1]["undelivered"] == 0 and lines[-1]["export_errors"] == 0, log
    assert any(r["maps"] for r in lines), "no BPF hash map reported"
    assert log.count("INFO: health: ") == len(lines)


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
@pytest.mark.anyio
async def test_a_collector_down_at_start_gets_what_comes_once_it_is_up(
        tmp_path: Path, agents: list[Agent]) -> None:
    """Batches given up while the collector is down count as undelivered; the agent
    keeps running, delivers once it is up, and still exits 0 after SIGTERM."""
    port = closed_port()
    stats = tmp_path / "stats.jsonl"
    agent = Agent(shipped_config(tmp_path, f"http://127.0.0.1:{port}"),
                  run_env(tmp_path, EBPF_STREAM_SAMPLE_RATE="49"), [])
    agents.append(agent)
    agent.wait_sampling()
    # Four batches fill the exporter's queue; the next drops the oldest.
    await wait_until("nothing was counted undelivered",
                     lambda: any(r["undelivered"] for r in reports(stats)), agent)
    async with http_receiver(port=port) as receiver:
        await wait_until("nothing arrived once the collector was up",
                         lambda: receiver.requests("profiles"), agent, timeout=20)
        assert await anyio.to_thread.run_sync(agent.stop) == 0, agent.log.read_text()
    log = agent.log.read_text()
    assert "Traceback" not in log
    assert f"OTLP export to http://127.0.0.1:{port}/v1development/profiles failed" in log
    assert "recovered" in log
    lines = reports(stats)
    check_reports(lines)
    assert lines[-1]["undelivered"] > 0
    delivered = sum(len(rp.scope_profiles[0].profiles[0].samples)
                    for r in receiver.requests("profiles") for rp in r.resource_profiles)
    assert delivered > 0


# -- settings ---------------------------------------------------------------------------


def test_check_prints_the_resolved_settings_the_environment_winning(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('sample_rate = 29\nexport_interval = 5\nsyscalls = true\n'
                      '[otlp]\nendpoint = "http://file:4318"\nprotocol = "grpc"\n'
                      'headers = { authorization = "Bearer secret" }\n'
                      '[resource]\n"a" = "1"\n"b" = "2"\n')
    result = check("--check", env=clean_env(
        EBPF_STREAM_CONFIG=str(config), EBPF_STREAM_SAMPLE_RATE="37",
        EBPF_STREAM_MEMORY="on", OTEL_EXPORTER_OTLP_ENDPOINT="http://env:4317",
        OTEL_RESOURCE_ATTRIBUTES="b=3,c=4"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for line in (f"config: {config}", "sample_rate: 37 (EBPF_STREAM_SAMPLE_RATE)",
                 f"export_interval: 5 ({config})", f"syscalls: true ({config})",
                 "memory: true (EBPF_STREAM_MEMORY)", "network: false (default)",
                 "preset: production (default)", "stats_interval: 60 (default)",
                 "otlp.endpoint: http://env:4317", "otlp.protocol: grpc",
                 "otlp.headers: authorization", "resource: a=1,b=3,c=4"):
        assert line in lines, result.stdout
    assert "secret" not in result.stdout


@pytest.mark.parametrize(("file", "env", "message"), [
    ("", {"EBPF_STREAM_SAMPLE_RATE": "abc"},
     "EBPF_STREAM_SAMPLE_RATE: 'abc' is not a whole number"),
    ('sample_rate = "abc"', {}, "{path}: sample_rate: 'abc' is not a whole number"),
    ("sample_rate = 5000", {},
     "{path}: sample_rate: 5000 is outside the allowed range 1..1000"),
    ("export_interval = 0", {},
     "{path}: export_interval: 0.0 is outside the allowed range 0.1..3600"),
    ("", {"EBPF_STREAM_EXPORT_INTERVAL": "inf"},
     "EBPF_STREAM_EXPORT_INTERVAL: 'inf' is not a number (expected digits, like 2.5)"),
    ('syscalls = "maybe"', {}, "{path}: syscalls: 'maybe' is not a boolean"),
    ("python_frames = 3", {}, "{path}: python_frames: 3 is not a name"),
    ('preset = "prod"', {}, "{path}: preset: 'prod' is not one of production, staging"),
    ('python_frames = "off"\nstall_threshold_ms = 50', {},
     "{path}: stall_threshold_ms: stall detection needs Python frames, which "
     "python_frames=off turns off"),
    ("stats_interval = 0", {}, "{path}: stats_interval: 0 is outside the allowed range"),
    ('stats_file = "/no/such/dir/stats.jsonl"', {},
     "{path}: stats_file: '/no/such/dir/stats.jsonl': directory '/no/such/dir' does not exist"),
    ("sampel_rate = 19", {}, "{path}: unknown key 'sampel_rate' (known: preset, sample_rate,"),
    ('[otlp]\nendpont = "x"', {}, "{path}: unknown key 'otlp.endpont' (known: endpoint,"),
    ('[otlp]\nendpoint = "collector:4318"', {"OTEL_EXPORTER_OTLP_ENDPOINT": ""},
     "{path}: otlp.endpoint: 'collector:4318' is not a valid OTLP endpoint"),
    ('[otlp]\ncompression = "zstd"', {},
     "{path}: otlp.compression: 'zstd' is not an OTLP compression"),
    ("[otlp]\ntimeout = 2.5", {},
     "{path}: otlp.timeout: 2.5 is not a whole number of milliseconds"),
    ("", {"OTEL_EXPORTER_OTLP_PROTOCOL": "udp"},
     "OTEL_EXPORTER_OTLP_PROTOCOL: 'udp' is not an OTLP protocol"),
    ("[resource]\nteam = [1, 2]", {}, "{path}: resource.team: [1, 2] is not a single value"),
    ("sample_rate = ", {}, "{path}: not valid TOML: Invalid value"),
    ("sample_rate = 19", {"OTEL_EXPORTER_OTLP_ENDPOINT": ""},
     "no OTLP endpoint: set endpoint in the [otlp] table of {path}, or "
     "OTEL_EXPORTER_OTLP_ENDPOINT"),
])
def test_a_bad_setting_is_one_line_naming_where_it_came_from(
        tmp_path: Path, file: str, env: dict[str, str], message: str) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(file + "\n")
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", **env}
    got = one_line_error(check("--check", "--config", str(config), env=clean_env(**env)))
    assert got.startswith(message.format(path=config)), got


def test_a_missing_file_is_one_line_and_running_checks_first(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    assert one_line_error(check("--config", str(missing))) == (
        f"{missing}: No such file or directory")


def test_without_a_file_the_environment_alone_may_configure_it() -> None:
    result = check("--check", env=clean_env(OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4318"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "config: none"


def test_the_readmes_example_config_passes_the_check(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## A node agent"):readme.index("## Python services")]
    (example,) = re.findall(r"```toml\n(.*?)```", section, flags=re.S)
    config = tmp_path / "agent.toml"
    config.write_text(example.replace("/var/lib/ebpf-stream/", f"{tmp_path}/"))
    result = check("--check", "--config", str(config))
    assert result.returncode == 0, result.stderr


# -- the health report ----------------------------------------------------------------------


@pytest.mark.bpf
@pytest.mark.usefixtures("bpf_environment")
def test_hash_map_usage_counts_the_entries_of_hash_maps_alone() -> None:
    hash_fd = create_map("agent_test", 1, 4, 8, 16)  # BPF_MAP_TYPE_HASH
    array_fd = create_map("agent_array", 2, 4, 8, 16)  # BPF_MAP_TYPE_ARRAY: fixed size
    try:
        table = BpfMap(hash_fd, "agent_test")
        for key in range(5):
            table.update(key.to_bytes(4, "little"), bytes(8))
        assert hash_map_usage([hash_fd, array_fd, hash_fd]) == {
            "agent_test": (5, 16), "agent_test.2": (5, 16)}
    finally:
        os.close(hash_fd)
        os.close(array_fd)


# -- the shipped files ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_print_shows_each_shipped_file(name: str) -> None:
    result = check("--print", name)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (DEPLOY / SHIPPED[name]).read_text()


def test_the_wheel_carries_the_shipped_files(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", ".cache", "out", "build", "*.egg-info", "__pycache__", "bench"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                            str(tmp_path / "wheel"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"ebpf_stream/_cli/deploy/{file}" for file in SHIPPED.values()} <= names


def test_the_unit_and_the_daemonset_grant_the_same_capabilities_and_not_sys_admin() -> None:
    container = agent_container()
    context = container["securityContext"]
    assert context["privileged"] is False and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert sorted(c.lower() for c in context["capabilities"]["add"]) == sorted(granted())
    assert "sys_admin" not in granted()
    assert unit_setting("ExecStart").endswith(
        "ebpf-stream agent --config /etc/ebpf-stream/agent.toml")
    assert unit_setting("Restart") == "on-failure"


def test_the_daemonsets_config_and_environment_pass_the_check(tmp_path: Path) -> None:
    """The ConfigMap's agent.toml with the pod's variables, the downward API filled in."""
    spec = of_kind("DaemonSet")["spec"]["template"]["spec"]
    assert spec["hostPID"] is True
    config = tmp_path / "agent.toml"
    config.write_text(of_kind("ConfigMap")["data"]["agent.toml"])
    env = {"NODE_NAME": "node-7"}
    for variable in agent_container()["env"]:
        if "value" in variable:
            env[variable["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], variable["value"])
    assert env["OTEL_RESOURCE_ATTRIBUTES"] == "k8s.node.name=node-7"
    result = check("--check", "--config", str(config), env=clean_env(**env))
    assert result.returncode == 0, result.stderr
    assert "otlp.endpoint: http://otel-collector.observability.svc.cluster.local:4318" \
           "/v1development/profiles" in result.stdout.splitlines()
    assert "resource: k8s.node.name=node-7" in result.stdout.splitlines()
    mounts = {m["mountPath"] for m in agent_container()["volumeMounts"]}
    assert {"/sys/kernel/tracing", "/sys/kernel/debug", "/sys/fs/cgroup", "/lib/modules",
            "/usr/src", "/var/cache/ebpf-stream", "/etc/ebpf-stream"} <= mounts


def test_the_kubernetes_manifests_are_valid() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    documents = daemonset_documents()
    assert [d["kind"] for d in documents] == ["Namespace", "ServiceAccount", "ConfigMap",
                                               "DaemonSet"]
    for document in documents:
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def test_the_collector_config_has_a_profiles_pipeline_of_defined_parts() -> None:
    config = yaml.safe_load((DEPLOY / "collector.yaml").read_text())
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(":4317")
    assert protocols["http"]["endpoint"].endswith(":4318")
    pipelines = config["service"]["pipelines"]
    assert {"profiles", "metrics", "logs"} <= set(pipelines)
    for name, pipeline in pipelines.items():
        assert pipeline["receivers"] and pipeline["exporters"], name
        for part in ("receivers", "processors", "exporters"):
            assert set(pipeline.get(part, ())) <= set(config.get(part) or {}), (name, part)
    assert pipelines["profiles"]["exporters"] == ["otlp"]
    assert "service.profilesSupport" in (DEPLOY / "collector.yaml").read_text()


def test_systemd_finds_nothing_wrong_with_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian's systemd package has it)")
    # Where this checkout's command is, for the check that ExecStart can run.
    command = shutil.which("ebpf-stream") or str(Path(sys.executable).parent / "ebpf-stream")
    unit = tmp_path / "ebpf-stream-agent.service"
    unit.write_text((DEPLOY / unit.name).read_text().replace(
        "/opt/ebpf-stream/bin/ebpf-stream", command))
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
