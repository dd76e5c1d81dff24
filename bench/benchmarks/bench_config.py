"""Cost of building and validating an ``EbpfConfig``.

Configs are built once per run, so this only matters as a guard against a
slow regression (say, validation growing a filesystem check).  The builder
chain validates at every ``with_*`` step, so it costs more than the sum of a
plain construction and one validation.
"""

from __future__ import annotations

import timeit

from ebpf_stream import EbpfConfig, validate_config

from ._support import median


def create_default() -> EbpfConfig:
    return EbpfConfig()


def create_chain() -> EbpfConfig:
    return EbpfConfig.for_environment("production").with_sample_rate(49).with_pids([1])


_VALIDATED = create_chain()


def validate() -> None:
    validate_config(_VALIDATED)


OPERATIONS = {
    "EbpfConfig()": create_default,
    'for_environment("production").with_sample_rate(49).with_pids([1])': create_chain,
    "validate_config(config)": validate,
}


def measure_ns_per_op(number: int = 100_000, repeat: int = 7) -> dict[str, float]:
    """Median over ``repeat`` runs of ``number`` calls, in ns per call, per operation."""
    return {
        name: median(t / number * 1e9 for t in timeit.repeat(op, number=number, repeat=repeat))
        for name, op in OPERATIONS.items()
    }


# -- asv ---------------------------------------------------------------------


def time_config_create() -> None:
    create_default()


def time_config_builder_chain() -> None:
    create_chain()


def time_validate_config() -> None:
    validate()
