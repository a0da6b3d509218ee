"""`glm-build capacity`: the service-curve format, the fleet simulation checked against queueing
results it must reproduce, and the search for the smallest fleet."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.cli import build_capacity_parser, main
from builder.deploy.capacity import CapacityError, plan_capacity, simulate_fleet, smallest_fleet
from builder.deploy.curves import FORMAT, CurveError, ServiceCurve, curve_record

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "service-curves" / "tiny-cpu.json"


def curve(levels, prompt_tokens=20, output_tokens=20) -> ServiceCurve:
    """levels: (concurrency, tokens/s, ttft p50, ttft p95)."""
    return ServiceCurve.from_dict(curve_record(
        [{"concurrency": c, "tokens_per_s": r, "ttft_s": {"p50": a, "p95": b}} for c, r, a, b in levels],
        target="chatglm2-6b-stream", profile="cpu", prompt_tokens=prompt_tokens,
        output_tokens=output_tokens))


def test_the_example_curve_is_a_real_measurement_in_the_format():
    raw = json.loads(EXAMPLE.read_text())
    assert raw["format"] == FORMAT and raw["command"].startswith("scripts/capacity_check.py")
    c = ServiceCurve.read(EXAMPLE)
    assert [lv.concurrency for lv in c.levels] == [1, 2, 4, 8, 16]  # capacity_check's default levels
    assert all(lv.in_flight is not None for lv in c.levels)  # placed by Little's law
    # The figures agree with each other as one measurement's must: a closed loop holds at most its
    # clients (Little's law: requests/s x mean latency), the tokens/s are the requests/s times the
    # answer's tokens, and a percentile is never below a lower one.
    for lv in raw["levels"]:
        in_flight = lv["requests_per_s"] * lv["latency_s"]["mean"]
        assert 0.5 * lv["concurrency"] <= in_flight <= lv["concurrency"] * 1.01, lv
        assert lv["tokens_per_s"] == pytest.approx(lv["requests_per_s"] * raw["output_tokens"], rel=0.05)
        assert lv["ttft_s"]["p50"] <= lv["ttft_s"]["p95"] <= lv["latency_s"]["p95"]


def test_bench_serving_points_are_read_too():
    raw = {"checkpoint": "tiny", "new_tokens": 24, "prompt_tokens": [28, 70, 196],
           "points": [{"concurrency": c, "requests": 2 * c, "elapsed_s": 5.0, "tokens_per_s": t,
                       "ttft_p50_s": a, "ttft_p95_s": b, "latency_p50_s": 2.5, "mean_tokens": 24.0}
                      for c, t, a, b in ((1, 9.5, 0.3, 0.44), (4, 19.9, 1.28, 1.59))]}
    c = ServiceCurve.from_dict(raw)
    assert c.prompt_tokens == pytest.approx(98) and c.output_tokens == 24
    assert [(lv.concurrency, lv.tokens_per_s, lv.ttft_p95_s) for lv in c.levels] == [
        (1, 9.5, 0.44), (4, 19.9, 1.59)]


def test_curve_errors_name_the_field(tmp_path):
    good = curve_record([{"concurrency": 1, "tokens_per_s": 10, "ttft_s": {"p50": 0.1, "p95": 0.2}}],
                        target="x", profile="cpu", prompt_tokens=10, output_tokens=10)
    for change, message in ((lambda r: r.update(format="v0"), "format"),
                            (lambda r: r["levels"][0].pop("ttft_s"), "ttft_s"),
                            (lambda r: r["levels"].append(dict(r["levels"][0])), "increasing"),
                            (lambda r: r["levels"][0]["ttft_s"].update(p95=0.01), "p50 <= p95")):
        raw = json.loads(json.dumps(good))
        change(raw)
        with pytest.raises(CurveError, match=message):
            ServiceCurve.from_dict(raw)


def test_interpolation_and_saturation():
    c = curve([(1, 100, 0.1, 0.2), (4, 200, 0.2, 0.4)])
    assert c.tokens_per_s(1) == 100 and c.tokens_per_s(4) == 200
    assert c.tokens_per_s(2.5) == 150 and c.request_speed(2.5) == 60  # the total interpolates
    assert c.request_speed(0.5) == 100  # alone, a request runs at the first level's speed
    assert c.tokens_per_s(8) == 200  # saturated: the total stays, shared by more
    assert c.ttft(7) == pytest.approx((0.2 + 0.1 / 3 * 3, 0.4 + 0.2 / 3 * 3))  # grows on


def test_processor_sharing_matches_the_m_g_1_ps_formula():
    """A replica whose total rate is fixed is an M/G/1 processor-sharing queue: mean time in it
    S / (1 - ρ) and mean number in it ρ / (1 - ρ), whatever the service-time distribution."""
    rate_tokens, output = 100.0, 20.0  # S = 0.2 s
    c = curve([(1, rate_tokens, 0.05, 0.1), (64, rate_tokens, 0.05, 0.1)], output_tokens=output)
    arrival = 3.5  # ρ = 0.7
    result = simulate_fleet(c, replicas=1, rate=arrival, prompt_tokens=20, output_tokens=output,
                            requests=30000, warmup=2000, seed=1)
    rho = arrival * output / rate_tokens
    assert result.in_flight_per_replica == pytest.approx(rho / (1 - rho), rel=0.08)
    assert result.latency_mean_s == pytest.approx(output / rate_tokens / (1 - rho), rel=0.08)


def test_a_replica_that_never_saturates_is_m_g_infinity():
    """Each request at its own speed (tokens/s grows with n): mean in flight = λ · S (Little)."""
    # 50 tokens/s each; the time to first token grows with the requests in flight: 0.05 s alone,
    # 1.05 s at 100
    c = curve([(1, 50, 0.05, 0.1), (100, 5000, 1.05, 1.1)], output_tokens=25)
    result = simulate_fleet(c, replicas=1, rate=8, prompt_tokens=20, output_tokens=25,
                            requests=8000, seed=2)
    assert result.in_flight_per_replica == pytest.approx(8 * 25 / 50, rel=0.06)
    # a request meets the replica holding ~4 others (Poisson around λ·S): its first token comes at
    # the curve's figure there, well above the lone request's 0.05 s
    assert result.ttft_p50_s == pytest.approx(c.ttft(8 * 25 / 50)[0], rel=0.3)
    assert result.ttft_p50_s > 0.07


def test_random_balance_splits_the_load():
    c = curve([(1, 100, 0.05, 0.1), (64, 100, 0.05, 0.1)], output_tokens=20)
    one = simulate_fleet(c, replicas=1, rate=1.5, prompt_tokens=20, output_tokens=20, seed=3)
    four = simulate_fleet(c, replicas=4, rate=6, prompt_tokens=20, output_tokens=20, seed=3,
                          requests=16000)
    assert four.in_flight_per_replica == pytest.approx(one.in_flight_per_replica, rel=0.1)


def test_the_smallest_fleet_and_the_one_below():
    c = curve([(1, 100, 0.1, 0.15), (2, 180, 0.15, 0.25), (4, 300, 0.3, 0.5), (8, 400, 0.8, 1.4)])
    result, below = smallest_fleet(c, rate=40, prompt_tokens=20, output_tokens=20, ttft_p95_s=0.4)
    assert result.ttft_p95_s <= 0.4 < below.ttft_p95_s and below.replicas == result.replicas - 1
    plan = plan_capacity(c, rate=40, prompt_tokens=20, output_tokens=20, ttft_p95_s=0.4, min_rate=10)
    assert plan.replicas == result.replicas and plan.hpa.max_replicas == result.replicas + 1
    assert 1 <= plan.hpa.min_replicas < plan.replicas
    assert 2 <= plan.hpa.target_in_flight < 4  # where the curve's p95 crosses 0.4 s
    assert f"--max-replicas {result.replicas + 1}" in plan.summary(0.4)
    with pytest.raises(CapacityError, match="no number of replicas"):
        smallest_fleet(c, rate=1, prompt_tokens=20, output_tokens=20, ttft_p95_s=0.1)


def test_cli_prints_the_fleet_and_the_deploy_flags(capsys):
    status = main(["capacity", "--rate", "1.5/s", "--prompt-tokens", "20", "--output-tokens", "15",
                   "--ttft-p95", "1s", "--curves", str(EXAMPLE), "--requests", "1500"])
    out = capsys.readouterr().out
    assert status == 0
    assert "Smallest fleet meeting TTFT p95 <= 1000 ms at 1.5 requests/s:" in out
    assert "glm-build deploy --replicas 1 --max-replicas" in out
    assert main(["capacity", "--rate", "1", "--prompt-tokens", "20", "--output-tokens", "15",
                 "--ttft-p95", "1ms", "--curves", str(EXAMPLE)]) == 2
    assert "no number of replicas" in capsys.readouterr().err
    args = build_capacity_parser().parse_args(["--rate", "4/s", "--prompt-tokens", "300",
                                               "--output-tokens", "200", "--ttft-p95", "800ms",
                                               "--curves", "c.json"])
    assert (args.rate, args.ttft_p95) == (4.0, 0.8)
    for action in build_capacity_parser()._actions:
        assert action.help, action.dest
