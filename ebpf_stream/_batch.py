"""What one export interval hands to the exporters."""

from __future__ import annotations

import msgspec

from ._profile import Profile


class Batch(msgspec.Struct, gc=False):
    """The samples of one export interval, with the loss seen while collecting them.

    ``dropped`` counts samples lost before this batch was built (kernel ring
    full, channel full, or over ``max_samples``), so an exporter can report
    how complete the batch is.
    """

    profile: Profile
    dropped: int = 0
