"""``builder.serving.metrics``: custom metrics updated from many threads at once (live).

Triton 2.51's Python backend crashes the server (SIGSEGV) when two threads update the same
``pb_utils`` metric at once: eight threads incrementing one counter did so on the first request.
The model here does exactly that through :class:`builder.serving.metrics.Family`; the server must
live through it and count every increment.
"""
from __future__ import annotations

import textwrap

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from builder.serving.server import ServerOptions, TritonServer, free_port

from conftest import glm_samples

pytestmark = pytest.mark.server

THREADS, INCREMENTS, REQUESTS = 8, 400, 5

MODEL = textwrap.dedent(f'''
    import threading

    import numpy as np
    import triton_python_backend_utils as pb_utils

    from builder.serving.metrics import COUNTER, GAUGE, Family


    class TritonPythonModel:
        def initialize(self, args):
            self.count = Family("glm_test_increments_total", COUNTER, "Increments", model="hammer")
            self.level = Family("glm_test_level", GAUGE, "Last level set", model="hammer")

        def execute(self, requests):
            def work(n):
                for i in range({INCREMENTS}):
                    self.count.increment(1, worker=str(n % 2))  # 4 threads on each sample
                    self.level.set(i)

            responses = []
            for request in requests:
                threads = [threading.Thread(target=work, args=(n,)) for n in range({THREADS})]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                out = pb_utils.Tensor("out", np.array([b"done"], dtype=object))
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            return responses
''')

CONFIG = '''name: "hammer"
backend: "python"
max_batch_size: 0
input [ { name: "in" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "out" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
'''


def test_one_metric_updated_from_many_threads_counts_every_update(tmp_path):
    model = tmp_path / "repo" / "hammer"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(CONFIG)
    (model / "1" / "model.py").write_text(MODEL)
    server = TritonServer(ServerOptions(tmp_path / "repo", http_port=free_port(),
                                        grpc_port=free_port(), metrics_port=free_port(),
                                        address="127.0.0.1", log_file=tmp_path / "server.log",
                                        restart_stubs=False), ready_timeout=120)
    server.start().wait_ready()
    try:
        tensor = grpcclient.InferInput("in", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([b"go"], dtype=object))
        with grpcclient.InferenceServerClient(server.urls["grpc"]) as client:
            for _ in range(REQUESTS):
                result = client.infer("hammer", [tensor], client_timeout=60)
                assert result.as_numpy("out")[0] == b"done"
        samples = {(name, labels.get("worker")): (labels, value)
                   for name, labels, value in glm_samples(server)}
        per_worker = THREADS // 2 * INCREMENTS * REQUESTS
        for worker in ("0", "1"):
            labels, value = samples[("glm_test_increments_total", worker)]
            assert value == per_worker and labels["model"] == "hammer", (labels, value)
        assert samples[("glm_test_level", None)][1] == INCREMENTS - 1
    finally:
        server.stop()
