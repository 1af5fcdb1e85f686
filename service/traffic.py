"""Traffic policy per model name: canary weights, sticky users, shadow (docs/rollouts.md, issue 22).

A policy file (IMGSERVE_TRAFFIC, YAML or JSON) maps a model name to its policy::

    digits:
      weights: {v1: 90, v2: 10}             # integers summing to 100
      shadow: {version: v2, fraction: 1.0}  # optional
      sticky: X-User-Id                     # optional

A file is checked whole: one bad field refuses all of it (the old policies stay), and the error
names the field. Version choice lives in ``choose_version`` only, so every route (classify, OIP,
/explain, gRPC) routes the same way.

Sticky users: the header value hashes into one of 100 buckets, and the buckets are laid out on the
cumulative weights in the versions' sorted order. Moving the weights therefore moves only the
buckets between the old and the new boundary; every other user keeps the version they had.
"""
from __future__ import annotations

import asyncio
import contextvars
import hashlib
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import yaml

BUCKETS = 100
_KEYS = {"weights", "shadow", "sticky"}
# The current request's raw ASGI headers, set by the guard: a sticky header is read from them.
HEADERS: contextvars.ContextVar[tuple] = contextvars.ContextVar("imgserve_headers", default=())


class PolicyError(ValueError):
    """A policy refused whole; the message names the field (``digits.weights.v3``)."""


@dataclass(frozen=True)
class Shadow:
    version: str
    fraction: float


@dataclass(frozen=True)
class Policy:
    weights: tuple[tuple[str, int], ...]  # sorted by version label: the buckets' fixed layout
    shadow: Shadow | None = None
    sticky: str | None = None  # lower-case header name

    def doc(self) -> dict[str, Any]:
        """The policy as a document of the schema (GET /v2/repository/traffic, GET /models)."""
        return {"weights": dict(self.weights),
                "shadow": {"version": self.shadow.version, "fraction": self.shadow.fraction} if self.shadow else None,
                "sticky": self.sticky}

    def version_for_bucket(self, b: int) -> str:
        """The version whose share of the cumulative weights holds bucket ``b`` (0..99)."""
        edge = 0
        for version, w in self.weights:
            edge += w
            if b < edge:
                return version
        raise AssertionError("weights sum to 100")  # parse_policies guarantees it


def bucket(value: str) -> int:
    """A sticky header value's bucket, the same in every process and replica (not Python's hash())."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "big") % BUCKETS


def choose_version(policy: Policy, headers: Mapping[str, str], rand: Callable[[], float] = random.random) -> str:
    """The live version for one request: by its sticky header's bucket when it has one, else at random."""
    value = headers.get(policy.sticky) if policy.sticky else None
    b = bucket(value) if value else int(rand() * BUCKETS)
    return policy.version_for_bucket(b)


def parse_policies(doc: Any, served: Mapping[str, set[str]]) -> dict[str, Policy]:
    """A whole policy document -> policies; ``served`` maps each model name to its loaded versions."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise PolicyError("the policy must be a mapping of model name to policy")
    return {name: _policy(str(name), body, served) for name, body in doc.items()}


def parse_text(text: str, served: Mapping[str, set[str]]) -> dict[str, Policy]:
    """A policy file's text (YAML, so JSON too) -> policies."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PolicyError(f"the policy is not valid YAML or JSON: {e}") from None
    return parse_policies(doc, served)


def _policy(name: str, body: Any, served: Mapping[str, set[str]]) -> Policy:
    if name not in served:
        raise PolicyError(f"{name}: no model of that name is served; served: {', '.join(sorted(served)) or 'none'}")
    if not isinstance(body, dict):
        raise PolicyError(f"{name}: must be a mapping with 'weights' (and optional 'shadow', 'sticky')")
    unknown = set(body) - _KEYS
    if unknown:
        raise PolicyError(f"{name}.{sorted(map(str, unknown))[0]}: unknown field; valid: {', '.join(sorted(_KEYS))}")
    versions = served[name]
    return Policy(_weights(name, body.get("weights"), versions), _shadow(name, body.get("shadow"), versions),
                  _sticky(name, body.get("sticky")))


def _version(field: str, v: Any, versions: set[str]) -> str:
    if str(v) not in versions:
        raise PolicyError(f"{field}: version {v!r} is not served; served: {', '.join(sorted(versions))}")
    return str(v)


def _weights(name: str, raw: Any, versions: set[str]) -> tuple[tuple[str, int], ...]:
    field = f"{name}.weights"
    if not isinstance(raw, dict) or not raw:
        raise PolicyError(f"{field}: required, a mapping of version to an integer percentage, e.g. {{v1: 90, v2: 10}}")
    out = []
    for v, w in raw.items():
        _version(f"{field}.{v}", v, versions)
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= 100:
            raise PolicyError(f"{field}.{v}: {w!r} must be an integer from 0 to 100")
        out.append((str(v), w))
    total = sum(w for _, w in out)
    if total != BUCKETS:
        raise PolicyError(f"{field}: the weights sum to {total}, they must sum to 100")
    return tuple(sorted(out))


def _shadow(name: str, raw: Any, versions: set[str]) -> Shadow | None:
    field = f"{name}.shadow"
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"version", "fraction"} or "version" not in raw:
        raise PolicyError(f"{field}: must be a mapping {{version: V, fraction: 0..1}}")
    version = _version(f"{field}.version", raw["version"], versions)
    fraction = raw.get("fraction", 1.0)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise PolicyError(f"{field}.fraction: {fraction!r} must be a number from 0 to 1")
    return Shadow(version, float(fraction))


def _sticky(name: str, raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw or not all(c.isalnum() or c in "-_" for c in raw):
        raise PolicyError(f"{name}.sticky: {raw!r} must be a header name, e.g. X-User-Id")
    return raw.lower()


class PolicyFile:
    """The policies from IMGSERVE_TRAFFIC, re-read when the file changes (mtime, size or inode: a
    ConfigMap update swaps a symlink). A bad file is refused whole and the policies before it stay;
    ``error`` says why until a good file replaces it."""

    POLL_S = 0.5  # well inside the 2 s a change must take effect in

    def __init__(self, path: str, served: Callable[[], Mapping[str, set[str]]],
                 on_change: Callable[[dict[str, Policy]], None] | None = None) -> None:
        self.path, self.served, self.on_change = path, served, on_change
        self.policies: dict[str, Policy] = {}
        self.error = ""
        self._seen: tuple[int, int, int] | None = None

    def check(self) -> bool:
        """Re-read the file if it changed; True when new policies took effect."""
        try:
            st = os.stat(self.path)
            seen = (st.st_mtime_ns, st.st_size, st.st_ino)
            if seen == self._seen:
                return False
            self._seen = seen
            with open(self.path, encoding="utf-8") as f:
                policies = parse_text(f.read(), self.served())
        except (OSError, UnicodeDecodeError, PolicyError) as e:
            self.error = f"{self.path}: {e}"
            return False
        self.policies, self.error = policies, ""
        return True

    async def watch(self) -> None:
        """Poll forever (a background task of the service)."""
        while True:
            if self.check() and self.on_change is not None:
                self.on_change(self.policies)
            await asyncio.sleep(self.POLL_S)
