"""The Hugging Face hub: fail within seconds, in one line, when something must be downloaded and cannot be."""

from __future__ import annotations

import socket
import urllib.parse

from .errors import UserError


def require_hub(what: str, advice: str, timeout: float = 5.0) -> None:
    """A UserError unless the hub can be reached: offline, ``huggingface_hub`` would retry for about a
    minute and log every try. ``what`` is what needs downloading; ``advice`` what to do instead."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise UserError(
            f"cannot download {what}: it is not in the Hugging Face cache and HF_HUB_OFFLINE is set; {advice}"
        )
    endpoint = urllib.parse.urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as error:
        raise UserError(
            f"cannot reach {constants.ENDPOINT} to download {what} ({error.strerror or type(error).__name__}); {advice}"
        ) from None
