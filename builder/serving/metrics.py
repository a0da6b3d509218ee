"""Custom ``glm_*`` metrics on Triton's metrics port, safe to update from any thread.

Triton 2.51's Python backend (the server in every ``nvidia-pytriton`` up to 0.7.0) rebuilds a
``Metric``'s shared-memory message on each ``increment``/``set``, after releasing the GIL and
without a lock of its own: two threads updating the same metric at once free the message the
server is still reading, and tritonserver dies (SIGSEGV in ``Metric::LoadFromSharedMemory``).
Eight threads incrementing one counter crash it on the first try; a router's request threads
counting fallbacks or cancelled clients at once did so under load. Every metric call here holds
one lock per stub process (the stub sends these messages one at a time anyway, so the lock costs
nothing), and a metric is created once per label set.

>>> fallbacks = Family("glm_router_fallbacks_total", COUNTER, "Requests sent elsewhere", router="x")
>>> fallbacks.increment(1, preferred="chatglm2-6b-fp16", served="chatglm2-6b-int8")

Nothing here imports torch.
"""
from __future__ import annotations

import threading

COUNTER, GAUGE = "counter", "gauge"
_LOCK = threading.Lock()  # every metric call of this process


class Family:
    """One metric family; its metrics by label set, each created on first use.

    ``labels`` given here are on every sample; those given to :meth:`increment` / :meth:`set`
    name the sample within the family.
    """

    def __init__(self, name: str, kind: str, description: str, **labels: str):
        import triton_python_backend_utils as pb_utils  # provided by the Python-backend stub

        kinds = {COUNTER: pb_utils.MetricFamily.COUNTER, GAUGE: pb_utils.MetricFamily.GAUGE}
        if kind not in kinds:
            raise ValueError(f"kind={kind!r}: must be one of {sorted(kinds)}")
        self.name = name
        self._labels = labels
        self._metrics: dict[tuple, object] = {}
        with _LOCK:  # the family must outlive its metrics: kept here
            self._family = pb_utils.MetricFamily(name=name, description=description,
                                                 kind=kinds[kind])

    def declare(self, **labels: str) -> None:
        """Create the sample now, at 0, so that a scraper sees it before its first update."""
        with _LOCK:
            self._metric(labels)

    def increment(self, value: float = 1.0, **labels: str) -> None:
        if value:
            with _LOCK:
                self._metric(labels).increment(value)

    def set(self, value: float, **labels: str) -> None:
        with _LOCK:
            self._metric(labels).set(value)

    def _metric(self, labels: dict[str, str]):
        key = tuple(sorted(labels.items()))
        metric = self._metrics.get(key)
        if metric is None:
            metric = self._metrics[key] = self._family.Metric(labels={**self._labels, **labels})
        return metric
