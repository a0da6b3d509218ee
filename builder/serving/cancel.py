"""Cancellation across the BLS hop: a client that goes away frees its place in a variant's batch.

Triton 2.51 (the server in every ``nvidia-pytriton`` up to 0.7.0) lets a model see that its own
client cancelled (``is_cancelled()``) but gives it no way to cancel a BLS request it sent: the
response iterator's ``cancel()`` came in 2.57. So the router tells the variant itself:

- every request the router forwards carries the request id ``glm-route:<id>``
  (:data:`ROUTE_PREFIX`), ``<id>`` a random 128-bit id the router made (unguessable, so nobody
  else can cancel it); the variant reads it with ``request.request_id()``;
- a router-side :class:`CancelWatch` polls its clients; when one went away it sends the variant a
  small BLS request whose request id is ``glm-cancel:<id>`` (:data:`CANCEL_PREFIX`), and the variant's
  :class:`CancelRegistry` cancels the batched request it maps to (or, when the cancel arrived
  first, refuses the request on arrival). Where the server has BLS ``cancel()``, it is called too.

Nothing here imports torch; the Triton parts are imported where they are used.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("glm-build.cancel")

ROUTE_PREFIX = "glm-route:"  # request id of a request a router forwarded: the prefix, then its id
CANCEL_PREFIX = "glm-cancel:"  # request id of a cancel message: the prefix, then the id to drop
POLL_INTERVAL_S = 0.1  # how often a router (or a variant, for queued requests) asks whether
# a client is still there: one query to the server per request in flight
EARLY_CANCEL_TTL_S = 120.0  # how long a variant remembers a cancel that came before its request
EARLY_CANCEL_MAX = 4096  # and how many at most (the port is open: a flood of made-up ids stays small)
CANCELLED = "cancelled"  # the message of the error a cancelled request ends with


def new_route_id() -> str:
    """A fresh id for one forwarded request (random, 32 hex digits)."""
    return uuid.uuid4().hex


def routed_id(request) -> tuple[str, str]:
    """``(kind, id)`` of a request a router sent: ``("route", id)`` for a forwarded request,
    ``("cancel", id)`` for a cancel message, ``("", "")`` for anything else (a direct client).

    >>> routed_id(request)   # request.request_id() == "glm-cancel:3f2a..."
    ('cancel', '3f2a...')
    """
    try:
        request_id = request.request_id() or ""
    except AttributeError:
        return "", ""
    for kind, prefix in (("route", ROUTE_PREFIX), ("cancel", CANCEL_PREFIX)):
        if request_id.startswith(prefix) and len(request_id) > len(prefix):
            return kind, request_id[len(prefix):]
    return "", ""


def client_gone(request, sender=None) -> bool:
    """Whether the client cancelled ``request`` (or its stream closed): one query to the server,
    to the response sender where the backend has it (a decoupled model's), else to the request."""
    owner = sender if sender is not None and hasattr(sender, "is_cancelled") else request
    try:
        return bool(getattr(owner, "is_cancelled", lambda: False)())
    except Exception:  # the request is over on the server's side
        return False


# -- router side ----------------------------------------------------------------------------------

@dataclass
class Ticket:
    """One forwarded request the router watches."""

    route_id: str
    request: object  # the router's own request (from its client)
    sender: object | None  # its response sender (the streaming router), else None
    variant: str = ""  # where it is forwarded now ("" before the first forward)
    responses: object | None = None  # the BLS response iterator, for servers that can cancel it
    gone: threading.Event = field(default_factory=threading.Event)
    # Held while the server is asked about this client; once ``closed`` (its last response is
    # about to go) it is never asked again: Triton 2.51's Python backend answers the question
    # from the request's response factory, which the last response frees
    # (TRITONBACKEND_ResponseFactoryIsCancelled on freed memory: a SIGSEGV).
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    @property
    def cancelled(self) -> bool:
        return self.gone.is_set()


class CancelWatch:
    """Watches a router's requests in flight; tells the variant when a client went away.

    ``send_cancel(variant, route_id)`` delivers the cancel message (a BLS call in the router);
    ``on_cancel(ticket)`` counts it. Both run on the watch's own thread.
    """

    def __init__(self, send_cancel: Callable[[str, str], None], on_cancel: Callable[[Ticket], None],
                 interval_s: float = POLL_INTERVAL_S):
        self._send_cancel, self._on_cancel, self._interval_s = send_cancel, on_cancel, interval_s
        self._tickets: dict[str, Ticket] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="glm-cancel-watch", daemon=True)
        self._thread.start()

    def track(self, request, sender=None) -> Ticket:
        ticket = Ticket(new_route_id(), request, sender)
        with self._lock:
            self._tickets[ticket.route_id] = ticket
        return ticket

    def untrack(self, ticket: Ticket) -> None:
        """Stop watching ``ticket``: call before the request's last response is sent."""
        with self._lock:
            self._tickets.pop(ticket.route_id, None)
        with ticket.lock:
            ticket.closed = True

    def check(self, ticket: Ticket) -> bool:
        """Whether ``ticket``'s client is gone; cancels its forwarded request the first time."""
        with ticket.lock:
            if ticket.cancelled or ticket.closed:
                return ticket.cancelled
            gone = client_gone(ticket.request, ticket.sender)
        if gone:
            self._cancel(ticket)
        return gone

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)

    def _cancel(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.cancelled:
                return
            ticket.gone.set()
        try:
            cancel = getattr(ticket.responses, "cancel", None)  # Triton 2.57+: BLS cancellation
            if cancel is not None:
                cancel()
            if ticket.variant:
                self._send_cancel(ticket.variant, ticket.route_id)
        except Exception as err:  # the variant is gone too: nothing left to free
            log.warning("cancelling %s on %s failed: %s", ticket.route_id, ticket.variant, err)
        try:
            self._on_cancel(ticket)
        except Exception:
            log.exception("counting a cancelled request failed")

    def _loop(self) -> None:
        while not self._closing.wait(self._interval_s):
            with self._lock:
                open_tickets = [t for t in self._tickets.values() if not t.cancelled]
            for ticket in open_tickets:
                self.check(ticket)


# -- variant side ---------------------------------------------------------------------------------

class CancelRegistry:
    """A variant's map from the routers' ids to what cancels each request (a callable that
    returns whether it was still running).

    A cancel that arrives before its request (two BLS calls are not ordered) is remembered for
    :data:`EARLY_CANCEL_TTL_S`, and the request is refused when it comes.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._handles: dict[str, Callable[[], bool]] = {}
        self._early: dict[str, float] = {}  # route id -> when its cancel came
        self._lock = threading.Lock()
        self._clock = clock

    def __len__(self) -> int:
        return len(self._handles)

    def add(self, route_id: str, cancel: Callable[[], bool]) -> bool:
        """Map ``route_id`` to ``cancel``; False (and nothing kept) when it was cancelled already."""
        with self._lock:
            if self._early.pop(route_id, None) is not None:
                return False
            self._handles[route_id] = cancel
            return True

    def discard(self, route_id: str) -> None:
        with self._lock:
            self._handles.pop(route_id, None)

    def cancel(self, route_id: str) -> bool:
        """Cancel the request mapped to ``route_id``; True when one was (still) running."""
        with self._lock:
            cancel = self._handles.pop(route_id, None)
            if cancel is None:
                now = self._clock()
                self._early = {k: t for k, t in self._early.items() if now - t < EARLY_CANCEL_TTL_S}
                while len(self._early) >= EARLY_CANCEL_MAX:  # the oldest first (insertion order)
                    del self._early[next(iter(self._early))]
                self._early[route_id] = now
                return False
        return bool(cancel())
