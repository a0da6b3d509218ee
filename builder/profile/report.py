"""What ``glm-build profile`` writes: ``profile.json``, ``profile.md`` and ``profile.png``.

``profile.json`` is the list of :class:`builder.profile.run.ProfileRecord` as dicts (bytes as
integers, ``error`` = (estimated − measured) / measured). ``profile.md`` is the same as a table,
with the command that made it and what each figure counts. ``profile.png`` puts measured,
estimated and (where the table has the cell) published bytes side by side.

>>> write_reports(records, Path("profile"), command="glm-build profile ...", model="ChatGLM2-6B")
"""
from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Sequence

from ..plan.memory import GIB, MIB
from ..build.report import UNIT_NOTE

MEASURED = {
    "cpu": "*measured*: the resident set's peak while the workload ran, minus the baseline: the "
           "run's process (forked from a server that has imported torch, transformers and "
           "builder) first loads the embedded tiny model the same way and decodes two tokens, "
           "so that code, thread pools and lazy imports every model needs are in place, then "
           "takes the baseline, loads the variant and reads every weight once (a memory-mapped "
           "fp16 checkpoint then counts in full, as in a server that has seen the whole "
           "vocabulary), resets the high-water mark and runs the workload (`VmHWM` and `VmRSS` "
           "of `/proc/self/status`). *load peak*: the same difference while loading (a "
           "memory-mapped fp16 checkpoint is read lazily, after it; quantizing at load holds "
           "float copies of a shard and of one projection). *estimated*: "
           "`builder.estimate_memory(..., device=\"cpu\", process_overhead=0, "
           "all_logits=False)`: the process's own overhead is the subtracted baseline.",
    "cuda": "*measured*: the CUDA context (device memory this process uses outside the caching "
            "allocator after the run, from `torch.cuda.mem_get_info`, less what `nvidia-smi` "
            "showed before the process had a context) plus the allocator's peak reserved bytes "
            "during the workload (`torch.cuda.max_memory_reserved`, reset after loading): what "
            "`nvidia-smi` shows at the peak. *estimated*: `builder.estimate_memory(..., "
            "device=\"cuda\", all_logits=False)` with the default per-process overhead.",
}


def write_reports(records: Sequence, out: Path, *, command: str, model: str) -> dict[str, Path]:
    """Write the three files into ``out`` (created if missing); their paths by kind."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "profile.json", "md": out / "profile.md", "png": out / "profile.png"}
    paths["json"].write_text(json.dumps([r.as_dict() for r in records], indent=2) + "\n",
                             encoding="utf-8")
    paths["md"].write_text(profile_markdown(records, command=command, model=model),
                           encoding="utf-8")
    plot_profile(paths["png"], records, model=model)
    return paths


def _size(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB / 2 else f"{n / MIB:.1f} MiB"


def record_table(records: Sequence) -> list[str]:
    """The markdown table, one row per record, columns by device."""
    cuda = any(r.device == "cuda" for r in records)
    header = ["variant", "dtype", "workload", "measured", "estimated", "error", "published"]
    header += ["context", "peak allocated", "peak reserved"] if cuda else ["baseline RSS",
                                                                           "load peak"]
    header += ["load s", "run s"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * (len(header) - 3)]
    for r in records:
        d = r.details
        extra = ([_size(d.get("context_bytes")), _size(d.get("peak_allocated_bytes")),
                  _size(d.get("peak_reserved_bytes"))] if cuda
                 else [_size(r.baseline_bytes), _size(d.get("load_peak_bytes"))])
        cells = [r.variant, r.dtype, r.workload, _size(r.measured_bytes),
                 _size(r.estimated_bytes), f"{r.error:+.1%}", _size(r.published_bytes), *extra,
                 f"{r.load_seconds:.1f}", f"{r.run_seconds:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def profile_markdown(records: Sequence, *, command: str, model: str) -> str:
    devices = sorted({r.device for r in records})
    worst = max((abs(r.error) for r in records), default=0.0)
    lines = ["# glm-build profile", "",
             f"Model: {model}, {records[0].layers if records else '?'} decoder layers. "
             f"Device: {', '.join(_device_name(r) for r in _first_per_device(records))}. "
             f"Versions: {_versions()}.", "",
             "Made with:", "", "```", command, "```", ""]
    lines += record_table(records)
    lines += ["", f"Largest |error| (estimated vs measured): {worst:.1%}.", ""]
    lines += [MEASURED[d] for d in devices]
    lines += ["", "*published*: THUDM's ChatGLM2-6B table (A100-SXM4-80G GPU memory, PyTorch 2.0, "
              "logits of every prompt position), shown only for ChatGLM2-6B itself at the "
              "table's workloads (encode 2048, generate 8192).", "",
              f"Sizes: MiB = 2^20 bytes, GiB = 2^30 bytes. {UNIT_NOTE}", "",
              "![measured vs estimated vs published](profile.png)", ""]
    return "\n".join(lines)


def _first_per_device(records: Sequence) -> list:
    seen: dict[str, object] = {}
    for r in records:
        seen.setdefault(r.device, r)
    return list(seen.values())


def _device_name(record) -> str:
    if record.device == "cuda":
        return f"CUDA ({record.details.get('gpu', 'GPU')})"
    import os

    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def _versions() -> str:
    found = []
    for package in ("torch", "transformers", "glm-build"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found + [f"python {platform.python_version()}"])


def plot_profile(path: Path, records: Sequence, *, model: str = "") -> None:
    """Bars per variant and workload: measured, estimated, published (where the table has it)."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, and none wanted
    import matplotlib.pyplot as plt

    largest = max([r.measured_bytes for r in records] + [r.estimated_bytes for r in records]
                  + [r.published_bytes or 0 for r in records] + [1])
    unit, unit_name = (GIB, "GiB") if largest >= GIB else (MIB, "MiB")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(records) + 2), 4.8))
    x = range(len(records))
    series = [("measured", [r.measured_bytes for r in records]),
              ("estimated", [r.estimated_bytes for r in records])]
    if any(r.published_bytes for r in records):
        series.append(("published (GB read as GiB)", [r.published_bytes or 0 for r in records]))
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series):
        offset = (k - (len(series) - 1) / 2) * width
        ax.bar([i + offset for i in x], [v / unit for v in values], width, label=label)
    for i, r in enumerate(records):
        top = max(r.measured_bytes, r.estimated_bytes, r.published_bytes or 0) / unit
        ax.annotate(f"{r.error:+.1%}", (i, top), textcoords="offset points", xytext=(0, 3),
                    ha="center", fontsize=7)
    ax.set_xticks(list(x), [f"{r.precision}\n{r.phase} {r.tokens}" for r in records], fontsize=8)
    ax.set_ylabel(unit_name)
    devices = "/".join(sorted({r.device for r in records}))
    ax.set_title(f"{model or 'profile'} on {devices}: measured vs estimated "
                 f"(labels: estimated error)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
