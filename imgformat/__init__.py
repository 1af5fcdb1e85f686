"""The two file formats of imgserve and the one decode/preprocess pipeline (docs/FORMATS.md).

Torch-free on purpose: training, export, the service and the load tests all import it, and the
service must never load torch, onnx or the training package.

- ``imgformat.constants``: format names and versions, the name pattern, the valid policies.
- ``imgformat.schema``: the JSON Schemas (bundle manifest, checkpoint ``preprocess``) and their checks.
- ``imgformat.spec``: build and check a checkpoint's ``preprocess`` dict (``make_preprocess``).
- ``imgformat.bundle``: read, validate and verify a bundle directory (``load_bundle``, ``Bundle``).
- ``imgformat.preprocess``: upload bytes / PIL image -> uint8 pixels (``Preprocessor``, ``ImageError``).
- ``imgformat.store``: a bundle imported into the BentoML model store (``import_to_bentoml``).
"""
