"""Talking to the Hugging Face Hub, for messages: what a failure to reach it looks like, which Hub that was,
and the token kept out of every text. Downloads (base models, adapters) and pushes (:mod:`nested.hub`) share
it."""

from __future__ import annotations

import os
import re

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

__all__ = ["HTTP_LIBRARIES", "hub_endpoint", "hub_unreachable", "network_error", "redact"]

_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{6,}")


def redact(text: str) -> str:
    """``text`` with the active Hub token and anything shaped like a Hub token replaced by ``***``."""

    secret = get_token()
    if secret:
        text = text.replace(secret, "***")
    return _TOKEN_PATTERN.sub("***", text)


# The libraries huggingface_hub has talked HTTP through: an error of theirs means no usable answer.
HTTP_LIBRARIES = ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3")


def network_error(error: BaseException) -> BaseException | None:
    """The HTTP error answer or transport failure in ``error``'s chain of causes, if there is one.

    huggingface_hub wraps some (an LFS upload's failure becomes a ``RuntimeError`` from the transport error).
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (HfHubHTTPError, ConnectionError, TimeoutError)):
            return error
        if type(error).__module__.split(".")[0] in HTTP_LIBRARIES:
            return error
        error = error.__cause__ or error.__context__
    return None


def hub_unreachable(error: BaseException) -> str | None:
    """ "no answer from the Hub at <where> (<transport failure>)" when ``error`` comes from a transport failure
    (no network, a wrong HF_ENDPOINT); None for anything else (an HTTP answer, a missing file, a bug)."""
    cause = network_error(error)
    if cause is None or isinstance(cause, (HfHubHTTPError, OfflineModeIsEnabled)):  # offline: nothing asked
        return None
    detail = redact(" ".join(f"{type(cause).__name__}: {cause}".split())).rstrip(".")
    return f"no answer from the Hub at {hub_endpoint(HfApi())} ({detail})"


def hub_endpoint(api: HfApi, endpoint: str | None = None) -> str:
    """The Hub ``api`` talks to, and where that came from (for messages)."""
    if endpoint:
        return f"{api.endpoint} (the endpoint argument)"
    if os.environ.get("HF_ENDPOINT"):
        return f"{api.endpoint} (from HF_ENDPOINT)"
    return f"{api.endpoint} (the default; HF_ENDPOINT selects another Hub)"
