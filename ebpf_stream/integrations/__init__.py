"""Profile a service from its lifespan, configured by its environment.

``ebpf_stream.integrations.starlette`` (FastAPI, Starlette) and
``ebpf_stream.integrations.aiohttp`` wrap ``ServiceProfiling`` for their
framework; use ``ServiceProfiling`` itself in any other.  None of these
modules imports its framework: the service has already done so.
"""

from typing import TYPE_CHECKING

from .._base.lazy import lazy_exports

if TYPE_CHECKING:
    from ._service import ServiceProfiling
    from ._settings import ProfilingOptions

__getattr__ = lazy_exports(__name__, {
    "._service": ("ServiceProfiling",),
    "._settings": ("ProfilingOptions",),
})

__all__ = ["ProfilingOptions", "ServiceProfiling"]
