"""Load tests (locust) and the benchmark (wrk + in-process onnxruntime) for the imgserve service."""
