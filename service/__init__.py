"""imgserve service: serve bundles over HTTP with BentoML (see service/service.py)."""
