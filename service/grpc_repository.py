"""Triton's gRPC extensions on the served models: ``ModelConfig`` and the model repository
(``RepositoryIndex``, ``RepositoryModelLoad``, ``RepositoryModelUnload``).

The answers are REST's: the configuration is ``service.oip.config`` as a ``ModelConfig`` message,
and the repository calls go to the same ``service.repository.ModelRepository`` (same switch
IMGSERVE_MODEL_CONTROL=explicit, same model root, same checks and errors), so a model loaded over
gRPC serves REST at once and the other way round. ``service.grpc_oip`` mixes these methods into its
servicer; the API key guards them there. ``repository_name`` is ignored: there is one repository.
"""
from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from service import oip, repository
from service.errors import Refused
from service.oip_grpc_gen import grpc_service_pb2 as pb
from service.oip_grpc_gen import model_config_pb2 as mc


def model_config(model: Any) -> Any:
    """``oip.config`` (the REST .../config document) as Triton's ``ModelConfig`` message."""
    doc = oip.config(model)
    # The message's versions are integers; a bundle version such as "2024-05" has no such form.
    numeric = [int(v) for v in doc["version_policy"]["specific"]["versions"] if str(v).isdigit()]
    doc["version_policy"] = {"specific": {"versions": numeric}} if numeric else {"latest": {"num_versions": 1}}
    return json_format.ParseDict(doc, mc.ModelConfig())


def _params(parameters: Any) -> dict[str, Any]:
    """A ``map<string, ModelRepositoryParameter>`` as the dict REST's load body has."""
    out = {}
    for key, p in parameters.items():
        kind = p.WhichOneof("parameter_choice")
        if kind is None:
            raise Refused(f"parameter {key!r} has no value", 400, "bad_load")
        out[key] = getattr(p, kind)
    return out


class RepositoryMethods:
    """Servicer methods; ``self.svc`` is the running ``ImgServe`` and ``self._call`` answers errors."""

    svc: Any

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        def answer() -> Any:
            model = oip._resolve(self.svc, request.name, request.version or None)
            return pb.ModelConfigResponse(config=model_config(model))
        return await self._call(context, answer)

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        def answer() -> Any:
            rows = repository._repository(self.svc, change=False).index(request.ready)
            return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])
        return await self._call(context, answer)

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        async def answer() -> Any:
            repo = repository._repository(self.svc, change=True)
            await repo.load(request.model_name, _params(request.parameters))
            return pb.RepositoryModelLoadResponse()
        return await self._call(context, answer)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        async def answer() -> Any:
            repo = repository._repository(self.svc, change=True)
            await repo.unload(request.model_name, _params(request.parameters))
            return pb.RepositoryModelUnloadResponse()
        return await self._call(context, answer)


# Method -> request message, for service.grpc_oip's registry.
METHODS = {"ModelConfig": pb.ModelConfigRequest, "RepositoryIndex": pb.RepositoryIndexRequest,
           "RepositoryModelLoad": pb.RepositoryModelLoadRequest,
           "RepositoryModelUnload": pb.RepositoryModelUnloadRequest}
