"""The one exception type every adapter-format problem raises."""
from __future__ import annotations


class AdapterFormatError(ValueError):
    """An adapter artifact is malformed, unsafe or incompatible.

    The message names what is wrong (file, tensor key, shape, config field) so that it can be
    shown verbatim to the user, e.g. as the detail of a gRPC INVALID_ARGUMENT status.
    """
