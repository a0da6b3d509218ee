"""The cancellation protocol's parts alone (builder.serving.cancel), without a server."""
from __future__ import annotations

import threading
import time

from builder.serving.cancel import CancelRegistry, CancelWatch, client_gone, new_route_id, routed_id


class Request:
    def __init__(self, request_id: str = ""):
        self.gone = False
        self._request_id = request_id

    def is_cancelled(self) -> bool:
        return self.gone

    def request_id(self) -> str:
        return self._request_id


class Handle:
    def __init__(self):
        self.cancels = 0

    def cancel(self) -> bool:
        self.cancels += 1
        return self.cancels == 1


def test_route_ids_are_random_and_long():
    ids = {new_route_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 32 for i in ids)


def test_routed_ids_are_told_apart_from_direct_clients():
    assert routed_id(Request("glm-cancel:abc")) == ("cancel", "abc")
    assert routed_id(Request("glm-route:abc")) == ("route", "abc")
    assert routed_id(Request("1")) == routed_id(Request("glm-route:")) == ("", "")
    assert routed_id(object()) == ("", "")


def test_client_gone_asks_the_sender_first():
    request, sender = Request(), Request()
    sender.gone = True
    assert client_gone(request, sender) and not client_gone(request)
    assert not client_gone(object())  # nothing to ask: still there


def test_registry_cancels_the_mapped_request_once():
    registry, handle = CancelRegistry(), Handle()
    assert registry.add("a", handle.cancel)
    assert registry.cancel("a") and handle.cancels == 1
    assert not registry.cancel("a")  # gone from the map: nothing cancelled twice
    assert handle.cancels == 1 and len(registry) == 0


def test_a_cancel_that_comes_first_refuses_its_request():
    now = [0.0]
    registry = CancelRegistry(clock=lambda: now[0])
    assert not registry.cancel("early")
    assert not registry.add("early", Handle().cancel)  # refused on arrival
    assert registry.add("early", Handle().cancel)  # remembered once only
    registry.cancel("stale")
    now[0] = 1000.0
    registry.cancel("other")  # prunes what is older than the TTL
    assert registry.add("stale", Handle().cancel)


def test_watch_cancels_a_gone_client_at_its_variant_once():
    sent, counted = [], []
    watch = CancelWatch(lambda variant, route_id: sent.append((variant, route_id)),
                        counted.append, interval_s=0.01)
    try:
        request = Request()
        ticket = watch.track(request)
        ticket.variant = "chatglm2-6b-int4"
        time.sleep(0.05)
        assert not sent and not ticket.cancelled
        request.gone = True
        deadline = time.monotonic() + 5
        while not ticket.cancelled:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert watch.check(ticket)
        time.sleep(0.05)
        assert sent == [("chatglm2-6b-int4", ticket.route_id)] and counted == [ticket]
    finally:
        watch.close()


def test_watch_counts_a_client_gone_before_any_forward_without_sending():
    sent, counted = [], []
    watch = CancelWatch(lambda *call: sent.append(call), counted.append, interval_s=3600)
    try:
        request = Request()
        request.gone = True
        ticket = watch.track(request)
        assert watch.check(ticket) and sent == [] and counted == [ticket]
    finally:
        watch.close()


def test_a_failing_cancel_message_does_not_stop_the_watch():
    def refuse(variant, route_id):
        raise RuntimeError("variant gone")

    counted = []
    watch = CancelWatch(refuse, counted.append, interval_s=0.01)
    try:
        requests = [Request(), Request()]
        tickets = [watch.track(r) for r in requests]
        for t in tickets:
            t.variant = "v"
        for r in requests:
            r.gone = True
        done = threading.Event()
        deadline = time.monotonic() + 5
        while len(counted) < 2:
            assert time.monotonic() < deadline
            done.wait(0.01)
        assert all(t.cancelled for t in tickets)
    finally:
        watch.close()


def test_made_up_cancels_cannot_grow_the_registry_without_bound():
    from builder.serving.cancel import EARLY_CANCEL_MAX

    registry = CancelRegistry(clock=lambda: 0.0)
    for i in range(EARLY_CANCEL_MAX + 100):
        registry.cancel(f"made-up-{i}")
    assert len(registry._early) == EARLY_CANCEL_MAX
    assert registry.add("made-up-0", Handle().cancel)  # the oldest were forgotten first
    assert not registry.add(f"made-up-{EARLY_CANCEL_MAX + 99}", Handle().cancel)
