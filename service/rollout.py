"""Rollouts wired into the service: versions, the traffic policy (file and HTTP) and shadows.

    GET  /v2/repository/traffic    the policy document in force
    PUT  /v2/repository/traffic    a new document (JSON or YAML), refused whole when bad

docs/rollouts.md has the user's view. The policy in force is the last one that took effect: from
IMGSERVE_TRAFFIC when the file changes (polled, ``service.traffic.PolicyFile``), or from a PUT.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service import repository
from service.answer import answer, current_service
from service.errors import Refused
from service.io import json_response
from service.models import ServedModel
from service.shadow import Shadows
from service.traffic import PolicyError, PolicyFile, parse_text
from service.versions import Choice, Versions

__all__ = ["Choice", "setup", "watch", "describe", "version_header", "routes"]
logger = logging.getLogger(__name__)
MAX_POLICY_BYTES = 64 * 1024  # a policy names a few versions per model; YAML parsing is not cheap
VERSION_HEADER = "X-Model-Version"


def setup(svc: Any, loaded: list[ServedModel]) -> tuple[Versions, Shadows, PolicyFile | None]:
    """The loaded models served as versions, and the policy file read once: a bad or missing file
    stops the start (starting without it would send every request to the newest version)."""
    versions = Versions(svc.models)
    for m in loaded:
        versions.add(m)
    policy_file = None
    if svc.settings.traffic:
        policy_file = PolicyFile(svc.settings.traffic, versions.served,
                                 on_change=lambda p: _took_effect(versions, p, "file"))
        if not policy_file.check():
            raise ValueError(f"IMGSERVE_TRAFFIC: {policy_file.error}")
        _took_effect(versions, policy_file.policies, "file")
    return versions, Shadows(versions.is_served), policy_file


def _took_effect(versions: Versions, policies: dict, source: str) -> None:
    versions.set_policies(policies, source)
    logger.info("traffic policy from %s: %s", source, {n: p.doc() for n, p in policies.items()} or "none")


def watch(policy_file: PolicyFile | None) -> asyncio.Task | None:
    """Poll the policy file in the background (the task is kept by the service)."""
    return None if policy_file is None else asyncio.get_running_loop().create_task(policy_file.watch())


def version_header(m: ServedModel) -> dict[str, str]:
    return {VERSION_HEADER: m.version}


def describe(svc: Any) -> dict[str, Any]:
    """GET /models' view of the rollout: per name its policy, default version and shadow figures."""
    v: Versions = svc.versions
    pf: PolicyFile | None = svc.policy_file
    traffic = {}
    for name in v.by_name:
        p = v.policies.get(name)
        traffic[name] = {**(p.doc() if p else {"weights": None, "shadow": None, "sticky": None}),
                         "default_version": v.defaults[name].version, "shadow_stats": svc.shadows.describe(name)}
    return {"traffic": traffic,
            "traffic_policy": {"source": v.policy_source or None, "file": pf.path if pf else None,
                               "file_error": pf.error if pf else ""}}


# -- routes --------------------------------------------------------------------------------------
def _doc(v: Versions) -> dict[str, Any]:
    return {name: p.doc() for name, p in v.policies.items()}


async def get_traffic(request: Request) -> Response:
    async def work() -> Response:
        return json_response(_doc(current_service().versions))

    return await answer(work, "GET /v2/repository/traffic")


async def put_traffic(request: Request) -> Response:
    async def work() -> Response:
        svc = current_service()
        repository.changes_allowed(svc)
        body = await repository.body_of(request)
        if len(body) > MAX_POLICY_BYTES:
            raise Refused(f"a traffic policy is at most {MAX_POLICY_BYTES} bytes", 413, "body_too_large")
        try:
            policies = parse_text(body.decode("utf-8"), svc.versions.served())
        except UnicodeDecodeError:
            raise Refused("the traffic policy must be UTF-8 text (JSON or YAML)", 400, "bad_policy") from None
        except PolicyError as e:
            raise Refused(f"traffic policy refused, the one in force stays: {e}", 400, "bad_policy") from None
        _took_effect(svc.versions, policies, "api")
        return json_response(_doc(svc.versions))

    return await answer(work, "PUT /v2/repository/traffic")


routes = [Route("/v2/repository/traffic", get_traffic, methods=["GET"]),
          Route("/v2/repository/traffic", put_traffic, methods=["PUT"])]
