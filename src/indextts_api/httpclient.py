"""The one HTTP client factory: every outbound request has timeouts and bounded redirects."""

from __future__ import annotations

import httpx

from indextts_api import __version__

USER_AGENT = f"indextts-api/{__version__}"


def make_http_client(*, connect_timeout_s: float, read_timeout_s: float, max_redirects: int = 0) -> httpx.Client:
    """A pooled client; redirects are followed only when ``max_redirects`` > 0."""
    return httpx.Client(
        timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s),
        follow_redirects=max_redirects > 0,
        max_redirects=max(max_redirects, 0),
        headers={"User-Agent": USER_AGENT},
        limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        trust_env=False,  # no proxy or netrc picked up from the environment
    )
