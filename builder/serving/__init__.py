"""Serving on Triton Inference Server: the ``glm-serve`` server process and the Python models it runs.

>>> from builder.serving.server import ServerOptions, TritonServer
>>> with TritonServer(ServerOptions("generated_repo")) as server:
...     print(server.urls["grpc"])
localhost:8001

Kept free of imports: each module imports what it needs (no torch just to start a server).
"""
