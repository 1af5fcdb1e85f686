"""Who may call what: with IMGSERVE_API_KEY set, every route needs ``Authorization: Bearer KEY``
except the GET/HEAD routes listed here. This list is the only place that opens a route: a route
added anywhere else (BentoML API, lean route, OIP, the repository, future ones) is closed by default.

Public, and why (docs/operations.md, "Access"):
- health probes: a kubelet or load balancer probes without credentials;
- the static pages and their assets, /docs.json (what Swagger UI at /docs renders) and /models
  (the demo page's model list, read before the visitor has typed a key): they describe the API,
  they run nothing;
- /metrics: Prometheus scrapes without a key by default; its labels are bounded (route templates,
  loaded model names), so no caller can grow it. Scrapers that can send a bearer token may, it is
  simply not checked.
"""
from __future__ import annotations

import hmac

PUBLIC_PATHS = frozenset({
    "/livez", "/readyz", "/healthz", "/v2/health/live", "/v2/health/ready",  # health probes
    "/", "/demo", "/docs", "/docs.json", "/models",  # pages, the API description, the demo's model list
    "/metrics",  # Prometheus
})
PUBLIC_PREFIXES = ("/assets/", "/static_content/")  # the pages' files and Swagger UI's (BentoML's)
PUBLIC_METHODS = frozenset({"GET", "HEAD"})


def is_public(method: str, path: str) -> bool:
    """True when ``method path`` is answered without the API key."""
    return method in PUBLIC_METHODS and (path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES))


def bearer_matches(sent: bytes, key: str | None) -> bool:
    """True when no key is set, or ``sent`` (an Authorization header or gRPC metadata value) is exactly
    ``Bearer KEY``. Compared in constant time; REST's guard and gRPC share it so the rule is one."""
    return key is None or hmac.compare_digest(sent, f"Bearer {key}".encode())
