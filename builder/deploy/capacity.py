"""How many replicas a load needs: a discrete-event simulation (simpy) of a fleet serving with a
measured :class:`~builder.deploy.curves.ServiceCurve`.

The model, and why:

- **Arrivals** are Poisson at ``rate`` requests/s (many independent users).
- **The Service** spreads them over ``replicas`` pods: at random (``balance="random"``, what
  kube-proxy does per connection), or to the pod with the fewest in flight (``"least"``, an L7
  gateway).
- **A replica** is one continuous batch: with ``n`` requests in it, it produces the curve's
  ``tokens_per_s(n)`` answer tokens per second, shared equally (processor sharing: each request
  advances at ``request_speed(n)``, the measured level's tokens/s over the requests the server held
  then), and a request leaves once its ``output_tokens`` are made.
  Past the measured concurrencies its throughput stays flat (saturated), so in-flight requests
  pile up as they would.
- **Time to first token** of a request that finds ``n`` others is drawn from a log-normal through
  the curve's p50 and p95 at concurrency ``n + 1`` (extrapolated past the last level), scaled by
  ``prompt_tokens / curve.prompt_tokens`` when the prompts are longer than the measured ones
  (prefill grows with the prompt; first order).

>>> curve = ServiceCurve.read("docs/service-curves/tiny-cpu.json")
>>> plan = plan_capacity(curve, rate=8, prompt_tokens=26, output_tokens=20, ttft_p95_s=0.5)
>>> plan.replicas, plan.hpa.max_replicas
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Optional

import simpy

from ..stats import percentile
from .curves import ServiceCurve

BALANCES = ("random", "least")
Z95 = 1.6448536269514722  # the standard normal's 95th percentile
MAX_REPLICAS = 1000


class CapacityError(ValueError):
    """The target cannot be met by any number of replicas, or an input is out of range."""


@dataclass(frozen=True)
class FleetResult:
    """One simulated fleet."""

    replicas: int
    rate: float
    ttft_p50_s: float
    ttft_p95_s: float
    latency_p95_s: float
    latency_mean_s: float
    in_flight_per_replica: float  # time-averaged requests in a replica
    requests: int

    def line(self) -> str:
        return (f"{self.replicas:>3} replica(s): TTFT p50 {self.ttft_p50_s * 1000:7.1f} ms, "
                f"p95 {self.ttft_p95_s * 1000:7.1f} ms; request p95 {self.latency_p95_s:6.2f} s; "
                f"{self.in_flight_per_replica:.1f} in flight per replica")


class _Replica:
    """A continuous batch under processor sharing, as a simpy process."""

    def __init__(self, env: simpy.Environment, curve: ServiceCurve, done):
        self.env, self.curve, self.done = env, curve, done
        self.active: dict[int, float] = {}  # request id → answer tokens still to make
        self.last = 0.0
        self.area = 0.0  # ∫ in-flight dt
        self.wake = env.event()
        env.process(self._run())

    def _advance(self) -> None:
        dt = self.env.now - self.last
        n = len(self.active)
        if n and dt > 0:
            step = self.curve.request_speed(n) * dt
            for key in self.active:
                self.active[key] -= step
        self.area += n * dt
        self.last = self.env.now

    def add(self, key: int, tokens: float) -> int:
        """Admit a request; returns how many were in the replica before it."""
        self._advance()
        before = len(self.active)
        self.active[key] = tokens
        if not self.wake.triggered:
            self.wake.succeed()
        return before

    def _run(self):
        while True:
            if not self.active:
                yield self.wake
                self.wake = self.env.event()
                continue
            n = len(self.active)
            per_request = self.curve.request_speed(n)
            yield self.env.timeout(max(0.0, min(self.active.values()) / per_request)) | self.wake
            if self.wake.triggered:
                self.wake = self.env.event()
            self._advance()
            for key in [k for k, left in self.active.items() if left <= 1e-9]:
                del self.active[key]
                self.done(key)


def simulate_fleet(curve: ServiceCurve, *, replicas: int, rate: float, prompt_tokens: float,
                   output_tokens: float, requests: int = 4000, warmup: int = 400,
                   balance: str = "random", seed: int = 0) -> FleetResult:
    """Simulate ``requests`` Poisson arrivals at ``rate``/s over ``replicas``; the first
    ``warmup`` are not counted (the fleet starts empty)."""
    if balance not in BALANCES:
        raise CapacityError(f"balance must be one of {', '.join(BALANCES)}, got {balance!r}")
    if not (rate > 0 and replicas >= 1 and requests > warmup >= 0):
        raise CapacityError("rate must be > 0, replicas >= 1 and requests > warmup")
    rng = random.Random(seed)
    env = simpy.Environment()
    arrived: dict[int, float] = {}
    ttft: dict[int, float] = {}
    latency: dict[int, float] = {}

    def done(key):
        latency[key] = max(env.now - arrived[key], ttft[key])

    fleet = [_Replica(env, curve, done) for _ in range(replicas)]
    scale = curve.prompt_scale(prompt_tokens)

    def arrivals():
        for key in range(requests):
            yield env.timeout(rng.expovariate(rate))
            replica = (rng.choice(fleet) if balance == "random"
                       else min(fleet, key=lambda r: (len(r.active), rng.random())))
            arrived[key] = env.now
            others = replica.add(key, output_tokens)
            p50, p95 = curve.ttft(others + 1)
            sigma = math.log(p95 / p50) / Z95 if p95 > p50 else 0.0
            ttft[key] = scale * p50 * math.exp(sigma * rng.gauss(0, 1))

    env.process(arrivals())
    env.run()  # until every request has left
    counted = range(warmup, requests)
    first = [ttft[k] for k in counted]
    whole = [latency[k] for k in counted]
    return FleetResult(replicas=replicas, rate=rate, ttft_p50_s=percentile(first, 0.5),
                       ttft_p95_s=percentile(first, 0.95), latency_p95_s=percentile(whole, 0.95),
                       latency_mean_s=sum(whole) / len(whole),
                       in_flight_per_replica=sum(r.area for r in fleet) / env.now / replicas,
                       requests=len(first))


@dataclass(frozen=True)
class HpaBounds:
    """What to write into the autoscalers (``glm-build deploy`` flags)."""

    min_replicas: int
    max_replicas: int
    target_in_flight: float  # per pod: the largest concurrency whose measured TTFT p95 meets the target

    def deploy_flags(self) -> str:
        return (f"--replicas {self.min_replicas} --max-replicas {self.max_replicas} "
                f"--target-in-flight {self.target_in_flight:g}")


@dataclass(frozen=True)
class CapacityPlan:
    replicas: int  # the smallest fleet meeting the target at the rate
    result: FleetResult  # its simulation
    below: Optional[FleetResult]  # one replica fewer (what fails), None at 1
    hpa: HpaBounds
    notes: tuple[str, ...] = field(default=())

    def summary(self, target_s: float) -> str:
        lines = [f"Smallest fleet meeting TTFT p95 <= {target_s * 1000:.0f} ms at "
                 f"{self.result.rate:g} requests/s: {self.replicas} replica(s)",
                 "  " + self.result.line()]
        if self.below is not None:
            lines.append("  " + self.below.line() + "  (misses)")
        lines += [f"HPA: minReplicas {self.hpa.min_replicas}, maxReplicas {self.hpa.max_replicas}, "
                  f"target {self.hpa.target_in_flight:g} requests in flight per pod "
                  f"(glm_requests_in_flight)",
                  f"  glm-build deploy {self.hpa.deploy_flags()}"]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def target_in_flight(curve: ServiceCurve, ttft_p95_s: float, scale: float = 1.0) -> float:
    """The largest concurrency (to a tenth) at which the curve's TTFT p95 × ``scale`` still meets
    the target; 1 at least."""
    top = curve.load(curve.levels[-1])
    best = 1.0
    c = 1.0
    while c <= top + 1e-9:
        if curve.ttft(c)[1] * scale <= ttft_p95_s:
            best = c
        c = round(c + 0.1, 1)
    return best


def smallest_fleet(curve: ServiceCurve, *, rate: float, prompt_tokens: float, output_tokens: float,
                   ttft_p95_s: float, **simulation) -> tuple[FleetResult, Optional[FleetResult]]:
    """The smallest replica count whose simulated TTFT p95 meets ``ttft_p95_s``, and the one below."""
    scale = curve.prompt_scale(prompt_tokens)
    if curve.ttft(1)[1] * scale > ttft_p95_s:
        raise CapacityError(f"an idle replica's TTFT p95 is {curve.ttft(1)[1] * scale * 1000:.0f} ms "
                            f"already: no number of replicas meets {ttft_p95_s * 1000:.0f} ms")
    def run(n: int) -> FleetResult:
        return simulate_fleet(curve, replicas=n, rate=rate, prompt_tokens=prompt_tokens,
                              output_tokens=output_tokens, **simulation)

    # start near what throughput alone needs (a fleet below it saturates), then walk
    n = max(1, math.ceil(rate * output_tokens / curve.max_tokens_per_s))
    result = run(n)
    if result.ttft_p95_s <= ttft_p95_s:  # down to the first fleet that misses
        while n > 1:
            below = run(n - 1)
            if below.ttft_p95_s > ttft_p95_s:
                return result, below
            n, result = n - 1, below
        return result, None
    while n < MAX_REPLICAS:  # up to the first fleet that meets it
        below, n = result, n + 1
        result = run(n)
        if result.ttft_p95_s <= ttft_p95_s:
            return result, below
    raise CapacityError(f"more than {MAX_REPLICAS} replicas would be needed")


def plan_capacity(curve: ServiceCurve, *, rate: float, prompt_tokens: float, output_tokens: float,
                  ttft_p95_s: float, min_rate: float = 0.0, **simulation) -> CapacityPlan:
    """The fleet for ``rate`` and the autoscaler bounds: max = that fleet + 1 (a voluntary
    disruption, the PodDisruptionBudget's one, at the peak still leaves it), min = the fleet for
    ``min_rate`` (1 when 0), target = :func:`target_in_flight`."""
    if not (rate > 0 and prompt_tokens > 0 and output_tokens > 0 and ttft_p95_s > 0):
        raise CapacityError("rate, prompt and output tokens and the TTFT target must be positive")
    if not 0 <= min_rate <= rate:
        raise CapacityError(f"min_rate must be between 0 and the rate ({rate:g}), got {min_rate:g}")
    result, below = smallest_fleet(curve, rate=rate, prompt_tokens=prompt_tokens,
                                   output_tokens=output_tokens, ttft_p95_s=ttft_p95_s, **simulation)
    minimum = 1
    if min_rate > 0:
        minimum = smallest_fleet(curve, rate=min_rate, prompt_tokens=prompt_tokens,
                                 output_tokens=output_tokens, ttft_p95_s=ttft_p95_s,
                                 **simulation)[0].replicas
    scale = curve.prompt_scale(prompt_tokens)
    notes = []
    for what, asked, measured in (("prompt", prompt_tokens, curve.prompt_tokens),
                                  ("output", output_tokens, curve.output_tokens)):
        if not 0.5 <= asked / measured <= 2:
            notes.append(f"{what} tokens {asked:g} are far from the measured {measured:g}: measure "
                         f"curves with requests like yours for a firmer answer")
    notes.append("a new replica takes its start-up time (deploy/README.md) before it serves: keep "
                 "minReplicas at what the slowest ramp of your load needs")
    hpa = HpaBounds(min_replicas=minimum, max_replicas=result.replicas + 1,
                    target_in_flight=target_in_flight(curve, ttft_p95_s, scale))
    return CapacityPlan(replicas=result.replicas, result=result, below=below, hpa=hpa,
                        notes=tuple(notes))
