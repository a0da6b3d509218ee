"""What a build says about itself: ``build.json``, ``report.md``, ``memory.png`` and the summary the
CLI prints.

Every report compares ChatGLM2-6B's estimates with THUDM's published table, on the chosen GPU,
even when the build used the embedded demo model (then it says so plainly and shows both). The
table's "GB" is read as GiB (2^30 bytes): see :data:`builder.plan.memory.TABLE_UNIT_BYTES` for why.

>>> from builder import CHATGLM2_6B, load_profile
>>> from builder.plan.placement import make_plan
>>> plan = make_plan(CHATGLM2_6B, "int4", load_profile("p40"))
>>> print(format_summary(plan, ModelSource.spec()))       # doctest: +ELLIPSIS
glm-build plan: ChatGLM2-6B ...
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from ..model.config import CHATGLM2_6B, ChatGLM2Config
from ..plan.memory import GIB, PUBLISHED_TABLE, TABLE_UNIT_BYTES, estimate_memory, weight_bytes
from ..plan.placement import Plan, PlacementError, Variant, make_plan, phase_breakdown

UNIT_NOTE = ("The published table's \"GB\" is read as GiB (2^30 bytes): only that reading leaves "
             "room above weights + KV cache for a CUDA context in every row (builder/plan/memory.py, "
             "TABLE_UNIT_BYTES). GiB figures are binary; GB figures are 10^9 bytes.")


@dataclass(frozen=True)
class ModelSource:
    """What a build was made from."""

    config: ChatGLM2Config
    label: str  # how reports name the model: "ChatGLM2-6B", "the embedded demo model ..."
    source: str  # what the user gave: a folder, a hub id, "--spec chatglm2-6b", "" (embedded)
    checkpoint: Path | None = None  # the resolved checkpoint folder; None for --spec
    is_demo: bool = False  # the embedded tiny checkpoint, not ChatGLM2-6B
    family: str = "chatglm2-6b"  # its family (builder.model.family): names the repository's models

    @classmethod
    def spec(cls, name: str = "chatglm2-6b") -> "ModelSource":
        """``--spec NAME``: a published model from its config alone, no weights."""
        from ..model.family import get_family

        family = get_family(name)
        return cls(family.spec, family.display_name, f"--spec {name}", family=name)

    @property
    def parameters(self) -> int:
        return weight_bytes(self.config, 16) // 2


def glm_build_version() -> str:
    try:
        return metadata.version("glm-build")
    except metadata.PackageNotFoundError:  # run from a source checkout that is not installed
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"),
                          re.MULTILINE) if pyproject.is_file() else None
        return f"{match.group(1)} (source checkout)" if match else "unknown"


def package_versions() -> dict[str, str]:
    """Versions of what produced the build, read without importing torch."""
    versions = {"builder": glm_build_version(), "python": platform.python_version()}
    for package in ("torch", "transformers", "jinja2", "tritonclient"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def file_hashes(directory: Path) -> dict[str, dict]:
    """{relative path: {"sha256", "bytes"}} of every file below ``directory`` (links followed)."""
    from tqdm import tqdm

    files = sorted(p for p in Path(directory).rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    hashes = {}
    # A bar only when hashing takes a while: the 6B's shards are 12 GB.
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing inputs",
              disable=total < GIB) as bar:
        for path in files:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
                    bar.update(len(block))
            hashes[path.relative_to(directory).as_posix()] = {
                "sha256": digest.hexdigest(), "bytes": path.stat().st_size}
    return hashes


# -- the table comparison ---------------------------------------------------------------------------
def published_rows(family) -> list:
    """The family's published memory figures as :class:`~builder.model.family.PublishedRow`\ s
    (ChatGLM2's table for the ChatGLM2 family)."""
    from ..model.family import PublishedRow

    if family.published:
        return list(family.published)
    if family.kind != "chatglm2":
        return []
    return [PublishedRow(precision, tokens, value / TABLE_UNIT_BYTES, "GB",
                         "one A100, THUDM's runtime (transformers 4.30, torch 2.0 SDPA)",
                         "THUDM/ChatGLM2-6B README", phase=phase)
            for precision, phases in PUBLISHED_TABLE.items()
            for phase, (tokens, value) in phases.items()]


def table_comparison(plan: Plan) -> list[dict]:
    """The plan's model family (ChatGLM2-6B's table for the embedded demo), per asked precision and
    published row: published, estimated in the table's conditions (its GPU and runtime), and the
    same phase on this plan's profile in this runtime (its per-process overhead; logits of the
    last position only). A row without a length is compared at 2048 tokens."""
    from ..model.family import get_family

    family = get_family(plan.model_name)
    rows = []
    for placement in plan.placements:
        variant = placement.variant
        for row in published_rows(family):
            if row.precision != variant.precision:
                continue
            tokens = row.input_tokens or 2048
            estimated = estimate_memory(family.spec, variant.bits, tokens, row.phase,
                                        group_size=row.group_size or variant.group_size,
                                        all_logits=row.all_logits)
            published = row.memory_bytes
            rows.append({
                "variant": variant.name, "precision": variant.precision, "phase": row.phase,
                "tokens": tokens, "length_given": row.input_tokens is not None,
                "published_bytes": published, "estimated_bytes": estimated,
                "error": (estimated - published) / published,
                "on_profile_bytes": phase_breakdown(family.spec, variant, tokens, row.phase,
                                                    plan.profile).total})
    return rows


def chatglm2_6b_plan(plan: Plan) -> Plan | PlacementError:
    """The same variants of ChatGLM2-6B on the same profile: a plan, or why it does not fit."""
    if plan.config == CHATGLM2_6B:
        return plan
    try:
        return make_plan(CHATGLM2_6B, [p.variant.precision for p in plan.placements],
                         plan.profile, min_tokens=plan.min_tokens, model_label="ChatGLM2-6B")
    except PlacementError as err:
        return err


def build_record(plan: Plan, source: ModelSource, *, quantize_at: str, templates_dir: Path,
                 options: dict | None = None) -> dict:
    """The content of ``build.json``."""
    model = {"label": source.label, "source": source.source, "is_demo": source.is_demo,
             "parameters": source.parameters, "config": asdict(source.config)}
    if source.checkpoint is not None:
        model |= {"checkpoint": str(source.checkpoint), "files": file_hashes(source.checkpoint)}
    other = chatglm2_6b_plan(plan)
    return {
        "glm_build": glm_build_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": {"model": model, "gpu": plan.profile.label, "profile": asdict(plan.profile),
                   "quantize_at": quantize_at, "options": options or {},
                   "templates": file_hashes(templates_dir)},
        "versions": package_versions(),
        "plan": plan.as_dict(),
        "estimates": {
            "unit_note": UNIT_NOTE, "table_unit_bytes": TABLE_UNIT_BYTES,
            "chatglm2_6b_vs_published": table_comparison(plan),
            "chatglm2_6b_on_profile": other.as_dict() if isinstance(other, Plan)
            else {"fits": False, "error": str(other)},
        },
    }


# -- text -------------------------------------------------------------------------------------------
def _gib(n: int | None) -> str:
    """GiB, or MiB below a tenth of one (the demo model's weights are a few MiB)."""
    if n is None:
        return "—"
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _published_cell(variant: Variant) -> str:
    cells = PUBLISHED_TABLE.get(variant.precision)
    if cells is None:
        return "— (not in the table)"
    return f"{cells['encode'][1] / TABLE_UNIT_BYTES:.1f} / {cells['generate'][1] / TABLE_UNIT_BYTES:.1f} GB"


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
            "| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
            for r in [header, *rows]]


def plan_lines(plan: Plan, markdown: bool = False) -> list[str]:
    """The placement table and one fit line per device."""
    from ..model.family import get_family
    from ..plan.placement import CONCURRENCY_LENGTHS

    chatglm2 = get_family(plan.model_name).kind == "chatglm2"  # the 6B's table, beside each variant
    rows = [[p.variant.name, p.device_label, p.dtype, _gib(p.weights_bytes), _gib(p.need_bytes),
             str(p.max_tokens), f"{p.kv_blocks} × {p.kv_page_size}",
             " / ".join(str(p.concurrency(t)) for t in (*CONCURRENCY_LENGTHS, p.max_tokens)),
             *([_published_cell(p.variant)] if chatglm2 else [])] for p in plan.placements]
    lines = _table(["variant", "device", "dtype", "weights", "need at limit", "limit tokens",
                    "KV pool (blocks × tokens)",
                    "concurrent at " + " / ".join(map(str, CONCURRENCY_LENGTHS)) + " / limit",
                    *(["6B published enc 2048 / gen 8192"] if chatglm2 else [])], rows, markdown)
    lines.append("")
    for d in plan.devices:
        at_floor = sum(p.min_need_bytes for p in plan.placements if p.device == d.index)
        spare = d.budget_bytes - at_floor
        lines.append(
            f"{'- ' if markdown else ''}{d.label} ({_gib(d.budget_bytes)}): "
            + (f"fits {' + '.join(d.variants)} with {_gib(d.headroom_bytes)} "
               f"({d.headroom_bytes / 1e9:.2f} GB) to spare at the routing limits; "
               f"{_gib(spare)} ({spare / 1e9:.2f} GB) at {plan.min_tokens} tokens"
               if d.variants else "unused"))
    return lines


def comparison_lines(plan: Plan, markdown: bool = False) -> list[str]:
    rows = [[r["precision"], f"{r['phase']} {r['tokens']}{'' if r.get('length_given', True) else ' (no length given)'}",
             "—" if r["published_bytes"] is None else f"{r['published_bytes'] / GIB:.1f}",
             f"{r['estimated_bytes'] / GIB:.2f}",
             "—" if r["error"] is None else f"{r['error']:+.1%}",
             f"{r['on_profile_bytes'] / GIB:.2f}"] for r in table_comparison(plan)]
    return _table(["precision", "workload", "published GiB", "estimated GiB", "error",
                   f"need on {plan.profile.name} GiB"], rows, markdown)


def demo_note(source: ModelSource) -> str | None:
    if not source.is_demo:
        return None
    return (f"This build used the embedded demo model (a tiny ChatGLM2, "
            f"{_count(source.parameters)} parameters), NOT ChatGLM2-6B; the ChatGLM2-6B "
            f"figures are estimated from its config.")


def chatglm2_6b_fit_line(plan: Plan) -> str:
    other = chatglm2_6b_plan(plan)
    names = "+".join(p.variant.precision for p in plan.placements)
    if isinstance(other, PlacementError):
        return f"ChatGLM2-6B {names} on {plan.profile.label}: does NOT fit. {other}"
    spare = ", ".join(f"{d.label} {_gib(d.headroom_bytes)} to spare" for d in other.devices)
    limits = ", ".join(f"{p.variant.precision} ≤ {p.max_tokens}" for p in other.placements)
    return f"ChatGLM2-6B {names} on {plan.profile.label}: fits ({spare}; limits {limits} tokens)."


def format_summary(plan: Plan, source: ModelSource) -> str:
    """What ``glm-build`` prints at the end (and, with --dry-run, all it does)."""
    profile = plan.profile
    lines = [f"glm-build plan: {source.label} on {profile.label} ({profile.description}; "
             f"{'host memory' if profile.kind == 'cpu' else f'{profile.count} ×'} "
             f"{_gib(profile.memory_bytes)})", ""]
    lines += plan_lines(plan)
    from ..model.family import get_family

    family = get_family(plan.model_name)
    lines += ["", f"{family.display_name}, estimated vs published in the table's conditions (its GPU "
                  f"and runtime), and the same workload in this runtime on {profile.name}:"]
    lines += comparison_lines(plan)
    if any(r.unit == "GB" for r in published_rows(family)):
        lines += ["", UNIT_NOTE]
    if plan.config != CHATGLM2_6B and family.kind == "chatglm2":  # the demo: what the 6B would need
        lines.append(chatglm2_6b_fit_line(plan))
    if (note := demo_note(source)):
        lines += ["", "NOTE: " + note]
    return "\n".join(lines)


def report_markdown(plan: Plan, source: ModelSource, *, out: Path,
                    profile_dir: Path | None = None) -> str:
    """``report.md``: the plan, the table comparison, ChatGLM2-6B on the chosen GPU, profiles."""
    lines = ["# glm-build report", ""]
    if (note := demo_note(source)):
        lines += [f"> **{note}**", ""]
    per = "of host memory" if plan.profile.kind == "cpu" else "per GPU"
    lines += [f"Model: {source.label}, {_count(source.parameters)} parameters, from "
              f"`{source.source or 'builder.TINY_CHECKPOINT'}`. Target: `{plan.profile.label}` — "
              f"{plan.profile.description}, {_gib(plan.profile.memory_bytes)} {per}, "
              f"{plan.profile.process_overhead_bytes / 2**20:.0f} MiB per-process overhead.", "",
              "## Placement and routing limits", "",
              "Each variant is its own Triton Python-backend process. A limit is the longest "
              "request (prompt + `max_token`) the variant takes; the router sends a request to "
              "the highest precision whose limit covers it.", ""]
    lines += plan_lines(plan, markdown=True)
    lines += ["", "![memory](memory.png)", "",
              "## ChatGLM2-6B: estimated vs published", "", UNIT_NOTE, "",
              "*estimated*: `builder.estimate_memory` in the table's conditions (A100-80G, THUDM's "
              f"runtime, which keeps the logits of every prompt position). *need on "
              f"{plan.profile.name}*: this runtime (last-position logits only) with the "
              f"{plan.profile.name} profile's per-process overhead; a request needs the larger "
              "of its encode and generate figures.", ""]
    lines += comparison_lines(plan, markdown=True)
    lines += ["", f"## ChatGLM2-6B on {plan.profile.label}", ""]
    other = chatglm2_6b_plan(plan)
    if isinstance(other, PlacementError):
        lines += ["Does **not** fit:", "", "```", str(other), "```"]
    elif other is plan:
        lines += ["This build is ChatGLM2-6B: see the placement above."]
    else:
        lines += plan_lines(other, markdown=True)
    lines += ["", "## Profiling", ""]
    lines += _profile_links(profile_dir, out)
    return "\n".join(lines) + "\n"


def _profile_links(profile_dir: Path | None, out: Path) -> list[str]:
    if profile_dir is None:
        return ["No profile was given (measured figures come from `glm-build profile`)."]
    found = [Path(profile_dir) / n for n in ("profile.md", "profile.json")
             if (Path(profile_dir) / n).is_file()]
    if not found:
        return [f"No profile.md or profile.json in `{profile_dir}`."]
    return [f"- latest profile: [{p.name}]({os.path.relpath(p.resolve(), out.resolve())})"
            for p in found]


# -- the picture --------------------------------------------------------------------------------------
def plot_memory(path: Path, plan: Plan, source: ModelSource) -> None:
    """``memory.png``: the 6B against the table, and this build's use of each device."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, and none wanted
    import matplotlib.pyplot as plt

    rows = table_comparison(plan)
    fig, (table_ax, plan_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    labels = [f"{r['precision']}\n{r['phase']} {r['tokens']}" for r in rows]
    x = range(len(rows))
    series = (("published (GB read as GiB)", [(r["published_bytes"] or 0) for r in rows]),
              ("estimated, the table's conditions", [r["estimated_bytes"] for r in rows]),
              (f"this runtime on {plan.profile.name}", [r["on_profile_bytes"] for r in rows]))
    for k, (label, values) in enumerate(series):
        table_ax.bar([i + (k - 1) * 0.27 for i in x], [v / GIB for v in values], 0.27,
                     label=label)
    table_ax.set_xticks(list(x), labels, fontsize=8)
    table_ax.set_ylabel("GiB")
    table_ax.set_title("ChatGLM2-6B: estimate vs published table")
    table_ax.legend(fontsize=8)

    devices = plan.devices
    for i, d in enumerate(devices):
        bottom = 0.0
        for p in (p for p in plan.placements if p.device == d.index):
            plan_ax.bar(i, p.need_bytes / GIB, bottom=bottom, label=f"{p.variant.name} "
                        f"(≤ {p.max_tokens} tokens)")
            bottom += p.need_bytes / GIB
    plan_ax.axhline(plan.profile.memory_bytes / GIB, color="black", linestyle="--",
                    label=f"budget {plan.profile.memory_bytes / GIB:.1f} GiB")
    plan_ax.set_xticks(range(len(devices)), [d.label for d in devices])
    plan_ax.set_ylim(0, plan.profile.memory_bytes / GIB * 1.35)  # room for the legend
    plan_ax.set_ylabel("GiB at the routing limits")
    who = "demo model (not ChatGLM2-6B)" if source.is_demo else source.label
    plan_ax.set_title(f"This build: {who} on {plan.profile.label}", fontsize=10)
    plan_ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(directory: Path, plan: Plan, source: ModelSource, record: dict, *, out: Path,
                 profile_dir: Path | None = None) -> None:
    """``build.json``, ``report.md`` and ``memory.png`` into ``directory`` (the staging folder of
    ``out``, which links are made relative to)."""
    directory = Path(directory)
    (directory / "build.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
    (directory / "report.md").write_text(
        report_markdown(plan, source, out=out, profile_dir=profile_dir), encoding="utf-8")
    plot_memory(directory / "memory.png", plan, source)


__all__ = ["ModelSource", "UNIT_NOTE", "build_record", "chatglm2_6b_plan", "file_hashes",
           "format_summary", "package_versions", "plot_memory", "report_markdown",
           "table_comparison", "write_report"]


# -- records without the build machine's paths ----------------------------------------------------
def portable(text: str | None, out: Path) -> str | None:
    """A path the user gave, without the build machine's folders: relative ones stay, absolute
    ones keep their last part."""
    if not text or not os.path.isabs(text):
        return text
    return Path(text).name


def portable_record(record: dict, out: Path) -> dict:
    """build.json without absolute paths of the build machine (file hashes identify the inputs)."""
    model = record["inputs"]["model"]
    for key in ("checkpoint", "source"):
        model[key] = portable(model.get(key), out)
    options = record["inputs"]["options"]
    for key in ("model", "out"):
        options[key] = portable(options.get(key), out)
    if options.get("profile_dir"):
        options["profile_dir"] = os.path.relpath(Path(options["profile_dir"]).resolve(),
                                                 out.resolve())
    return record
