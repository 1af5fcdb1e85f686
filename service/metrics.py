"""Prometheus metrics BentoML lacks, declared with ``bentoml.metrics`` so they appear on /metrics.

Names are prefixed ``imgserve_``. Buckets are in seconds (latencies) or images (batch size).
"""
from __future__ import annotations

import functools

import bentoml

_LAT = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)

QUEUE = bentoml.metrics.Histogram(name="imgserve_queue_seconds", labelnames=["model"], buckets=_LAT,
                                  documentation="Time a request waited in the batching queue before its batch ran")
PREPROCESS = bentoml.metrics.Histogram(name="imgserve_preprocess_seconds", labelnames=["model"], buckets=_LAT,
                                       documentation="Decode + colour conversion + resize time per image")
INFERENCE = bentoml.metrics.Histogram(name="imgserve_inference_seconds", labelnames=["model"], buckets=_LAT,
                                      documentation="Model run time per batch")
BATCH_SIZE = bentoml.metrics.Histogram(name="imgserve_batch_size", labelnames=["model"], buckets=_SIZES,
                                       documentation="Images per inference call")
ERRORS = bentoml.metrics.Counter(name="imgserve_errors", labelnames=["kind"],
                                 documentation="Refused or failed requests by kind")


@functools.lru_cache(maxsize=1024)
def for_model(metric: object, model: str):
    """``metric.labels(model=model)``, looked up once: ``labels()`` takes a lock and sorts keyword
    labels on every call, and the request path observes two of these per request."""
    return metric.labels(model=model)

# gRPC (service/grpc_oip.py), which BentoML's HTTP metrics do not see. Labels are bounded: ``method``
# is one of the served methods or "unmatched", ``code`` one of gRPC's 17 status code names.
GRPC_REQUESTS = bentoml.metrics.Counter(name="imgserve_grpc_requests", labelnames=["method", "code"],
                                        documentation="gRPC calls answered, by method and status code")
GRPC_SECONDS = bentoml.metrics.Histogram(name="imgserve_grpc_request_seconds", labelnames=["method"], buckets=_LAT,
                                         documentation="gRPC call time in the server, message decoded to answer")
