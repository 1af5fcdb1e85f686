"""The parity gate: every backend against PyTorch eager on the same real uint8 samples.

A backend is any callable ``uint8 (N, H, W, C) -> float32 logits (N, K)``. The reference is the
wrapped PyTorch model in eager mode at the same batch size. Pass criteria, per (backend, batch):
``|out - ref| <= atol + rtol * |ref|`` on every logit (numpy.allclose) and top-1 agreement
``>= min_top1_agreement``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

Backend = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Tolerances:
    atol: float = 1e-4
    rtol: float = 1e-3
    min_top1_agreement: float = 1.0


def run_batched(backend: Backend, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Run ``backend`` over ``images`` in chunks of ``batch_size``; (N, K) float64 logits."""
    outs = [np.asarray(backend(np.ascontiguousarray(images[i:i + batch_size])), dtype=np.float64)
            for i in range(0, len(images), batch_size)]
    return np.concatenate(outs, axis=0)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _max_rel(out: np.ndarray, ref: np.ndarray, floor: float) -> float:
    """Largest |out - ref| / |ref| over entries with |ref| > floor (near-zero entries only inflate it)."""
    mask = np.abs(ref) > floor
    if not mask.any():
        return 0.0
    return float((np.abs(out - ref)[mask] / np.abs(ref)[mask]).max())


def compare(out: np.ndarray, ref: np.ndarray, tol: Tolerances) -> dict[str, Any]:
    """Differences of one backend's logits ``out`` against the reference ``ref`` (both (N, K))."""
    if out.shape != ref.shape or not np.isfinite(out).all():
        return {"logits_max_abs": float("inf"), "logits_max_rel": float("inf"), "softmax_max_abs": float("inf"),
                "softmax_max_rel": float("inf"), "top1_agreement": 0.0, "passed": False,
                "error": f"output shape {out.shape} (expected {ref.shape}) or non-finite values"}
    p_out, p_ref = softmax(out), softmax(ref)
    top_out, top_ref = out.argmax(1), ref.argmax(1)
    # a different argmax counts as agreement only when the reference itself cannot tell the two
    # classes apart within the tolerance (an exact tie in an untrained model is not a disagreement)
    rows = np.arange(len(ref))
    tie = np.abs(ref[rows, top_out] - ref[rows, top_ref]) <= tol.atol + tol.rtol * np.abs(ref[rows, top_ref])
    agreement = float(np.mean((top_out == top_ref) | tie))
    close = bool(np.allclose(out, ref, atol=tol.atol, rtol=tol.rtol))
    return {
        "logits_max_abs": float(np.abs(out - ref).max()),
        "logits_max_rel": _max_rel(out, ref, tol.atol),
        "softmax_max_abs": float(np.abs(p_out - p_ref).max()),
        "softmax_max_rel": _max_rel(p_out, p_ref, 1e-6),
        "top1_agreement": agreement,
        "passed": close and agreement >= tol.min_top1_agreement,
    }


def parity_gate(reference: Backend, backends: dict[str, Backend], images: np.ndarray, *,
                batch_sizes: Sequence[int], tol: Tolerances, sample_source: str,
                skipped: Sequence[str] = ()) -> dict[str, Any]:
    """Run every backend and the reference at each batch size and return the manifest's ``parity`` report."""
    results = []
    for bs in batch_sizes:
        ref = run_batched(reference, images, bs)
        for name, backend in backends.items():
            try:
                out = run_batched(backend, images, bs)
            except Exception as e:  # a backend that crashes fails the gate, it does not abort the report
                out = np.full((1, 1), np.nan)
                log.error("backend %s failed at batch %d: %s", name, bs, e)
            results.append({"backend": name, "batch_size": int(bs), **compare(out, ref, tol)})
    return {
        "passed": all(r["passed"] for r in results),
        "samples": int(len(images)),
        "sample_source": sample_source,
        "batch_sizes": [int(b) for b in batch_sizes],
        "reference": "torch_eager",
        "tolerances": asdict(tol),
        "results": results,
        "skipped": list(skipped),
    }


def format_table(report: dict[str, Any]) -> str:
    """Fixed-width table of a parity report (printed by the CLI, pass or fail)."""
    t = report["tolerances"]
    lines = [f"parity vs {report.get('reference', 'torch_eager')} on {report['samples']} samples "
             f"({report['sample_source']}); logits atol {t['atol']:g} rtol {t['rtol']:g}, "
             f"top-1 >= {100 * t['min_top1_agreement']:.1f} %",
             f"{'backend':<22} {'batch':>5} {'logit abs':>10} {'logit rel':>10} {'prob abs':>10} "
             f"{'prob rel':>10} {'top-1 %':>8}  result"]
    for r in report["results"]:
        lines.append(f"{r['backend']:<22} {r['batch_size']:>5} {r['logits_max_abs']:>10.2e} {r['logits_max_rel']:>10.2e} "
                     f"{r['softmax_max_abs']:>10.2e} {r['softmax_max_rel']:>10.2e} {100 * r['top1_agreement']:>8.2f}  "
                     f"{'ok' if r['passed'] else 'FAIL'}")
    for s in report.get("skipped", []):
        lines.append(f"skipped: {s}")
    lines.append(f"parity gate: {'PASSED' if report['passed'] else 'FAILED'}")
    return "\n".join(lines)
