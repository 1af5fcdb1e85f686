"""Several versions under one model name, and which one answers a request (docs/rollouts.md).

``Versions`` holds every loaded (name, version) and the traffic policies in force. A request's
version is chosen once, by ``choose``, right before its admission (no await in between), and the
request keeps that ``ServedModel`` to its end: a switch of weights or a reload changes later
requests only. ``svc.models`` stays the map name -> the version a name answers by default (its
newest loaded version), kept in step here, for the code that needs one model per name.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from service.errors import Refused
from service.models import ServedModel
from service.traffic import HEADERS, Policy, choose_version


@dataclass(frozen=True)
class Choice:
    """The version that answers a request, and the one that runs beside it in the shadow (if any)."""

    live: ServedModel
    shadow: ServedModel | None = None


class Versions:
    def __init__(self, defaults: dict[str, ServedModel]) -> None:
        self.by_name: dict[str, dict[str, ServedModel]] = {}  # name -> version -> model, oldest load first
        self.defaults = defaults  # svc.models: name -> its newest version (the same dict object)
        self.policies: dict[str, Policy] = {}
        self.policy_source = ""  # "file" or "api": where the policies in force came from

    # -- what is served ---------------------------------------------------------------------------
    def add(self, m: ServedModel) -> ServedModel | None:
        """Serve ``m`` beside the name's other versions; returns the model it replaces (same version)."""
        versions = self.by_name.setdefault(m.name, {})
        old = versions.pop(m.version, None)
        versions[m.version] = m  # last: the newest, the name's default
        self.defaults[m.name] = m
        return old

    def remove(self, name: str, version: str) -> ServedModel:
        versions = self.by_name[name]
        old = versions.pop(version)
        self._forget(name, version)
        if versions:
            self.defaults[name] = next(reversed(versions.values()))
        else:
            del self.by_name[name], self.defaults[name]
        return old

    def served(self) -> dict[str, set[str]]:
        """Model name -> its version labels (what a policy is checked against)."""
        return {name: set(versions) for name, versions in self.by_name.items()}

    def every(self) -> list[ServedModel]:
        """Every loaded model, all versions (the guard's early shedding looks at all of them)."""
        return [m for versions in self.by_name.values() for m in versions.values()]

    def is_served(self, m: ServedModel) -> bool:
        return self.by_name.get(m.name, {}).get(m.version) is m

    def get(self, name: Any, version: str | None = None) -> ServedModel:
        """The named version, or the name's default; 404 naming what is served otherwise."""
        if not isinstance(name, str) or name not in self.by_name:
            raise Refused(f"unknown model {name!r}; served models: {', '.join(self.by_name) or 'none'}", 404,
                          "unknown_model", {"models": list(self.by_name)})
        if version is None or version == "":
            return self.defaults[name]
        versions = self.by_name[name]
        if version not in versions:
            raise Refused(f"model {name!r} has no version {version!r}; served versions: {', '.join(versions)}", 404,
                          "unknown_version", {"versions": list(versions)})
        return versions[version]

    # -- which version answers ------------------------------------------------------------------
    def choose(self, name: Any, version: str | None = None, headers: Iterable[tuple[bytes, bytes]] | None = None,
               rand: Callable[[], float] = random.random) -> Choice:
        """The live version for one request (the named one, else the name's policy, else the newest)
        and its shadow, drawn with the policy's fraction. A named version is always honoured."""
        live = self.get(name, version)
        policy = self.policies.get(live.name)
        if policy is None:
            return Choice(live)
        if not version:
            live = self.by_name[live.name][choose_version(policy, _sticky(policy, headers), rand)]
        shadow = policy.shadow
        if shadow is None or shadow.version == live.version or rand() >= shadow.fraction:
            return Choice(live)
        return Choice(live, self.by_name[live.name][shadow.version])

    def set_policies(self, policies: dict[str, Policy], source: str) -> None:
        self.policies, self.policy_source = policies, source

    def pinned(self, name: str, leaving: Iterable[str]) -> None:
        """409 when the policy in force routes to (or shadows) one of the ``leaving`` versions of ``name``:
        traffic moves first, then the version goes (docs/rollouts.md)."""
        policy = self.policies.get(name)
        if policy is None:
            return
        named = {v for v, w in policy.weights if w > 0} | ({policy.shadow.version} if policy.shadow else set())
        held = sorted(named & set(leaving))
        if held:
            raise Refused(f"model {name!r} version(s) {', '.join(held)} still get traffic from the policy in force "
                          f"({self.policy_source}); change the traffic policy first", 409, "version_in_use")


    def _forget(self, name: str, version: str) -> None:
        """Drop a removed version from its name's policy (``pinned`` let it go: its weight is 0)."""
        p = self.policies.get(name)
        if p is not None and any(v == version for v, _ in p.weights):
            weights = tuple((v, w) for v, w in p.weights if v != version)
            self.policies = {**self.policies, name: dataclasses.replace(p, weights=weights)}


def _sticky(policy: Policy, headers: Iterable[tuple[bytes, bytes]] | None) -> dict[str, str]:
    """The policy's sticky header of this request, as ``choose_version`` reads it."""
    if policy.sticky is None:
        return {}
    want = policy.sticky.encode("latin-1")
    for k, v in HEADERS.get() if headers is None else headers:
        if k.lower() == want:
            return {policy.sticky: v.decode("latin-1")}
    return {}
