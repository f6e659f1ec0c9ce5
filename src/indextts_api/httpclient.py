"""The one HTTP client factory: every outbound request has timeouts, bounded redirects and,
unless private URLs are allowed, connects only to public addresses (see ``netguard``)."""

from __future__ import annotations

import httpcore
import httpx

from indextts_api import __version__
from indextts_api.netguard import GuardedBackend

USER_AGENT = f"indextts-api/{__version__}"
_LIMITS = httpx.Limits(max_connections=32, max_keepalive_connections=16)


class GuardedTransport(httpx.HTTPTransport):
    """httpx's transport with httpcore's pool built on the guarded network backend."""

    def __init__(self) -> None:
        super().__init__(limits=_LIMITS, trust_env=False)
        # httpx has no parameter for the network backend, so the pool is rebuilt with the same
        # settings plus the backend (httpcore's documented extension point).
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=_LIMITS.max_connections,
            max_keepalive_connections=_LIMITS.max_keepalive_connections,
            keepalive_expiry=_LIMITS.keepalive_expiry,
            network_backend=GuardedBackend(),
        )


def make_http_client(
    *, connect_timeout_s: float, read_timeout_s: float, allow_private: bool, max_redirects: int = 0
) -> httpx.Client:
    """A pooled client; redirects are followed only when ``max_redirects`` > 0."""
    return httpx.Client(
        timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s),
        follow_redirects=max_redirects > 0,
        max_redirects=max(max_redirects, 0),
        headers={"User-Agent": USER_AGENT},
        limits=_LIMITS,
        trust_env=False,  # no proxy or netrc picked up from the environment
        transport=None if allow_private else GuardedTransport(),
    )
