"""The benchmark's table: images/s, GFLOP/s and share of the matmul peak, per variant."""

from __future__ import annotations

import json
from typing import Any


def print_benchmark(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    from rich.console import Console

    from cifar_bp.report import console, table

    # Piped into a log, rich would wrap the table at 80 columns; a terminal keeps its width.
    out = console if console.is_terminal else Console(highlight=False, width=WIDE)
    out.print(table(TITLE, columns(report), rows(report)))
    for line in notes(report):
        out.print(line, soft_wrap=True)


WIDE = 170  # characters per line when printing to a file or pipe


TITLE = "Training throughput: median of the timed epochs, and the first epoch; one process each"


def columns(report: dict[str, Any]) -> list[str]:
    cuda = report["device"].startswith("cuda")
    syncs = any(v["host_syncs"] is not None for v in report["variants"].values())
    out = ["variant", "settings", "batch", "img/s", "range", "× (a)", "GFLOP/s", "% peak",
           "% dtype peak", "1st epoch img/s", "1st GFLOP/s", "1st % peak", "RSS MB"]  # fmt: skip
    return out + ["CUDA MB"] * cuda + ["host syncs"] * syncs


def rows(report: dict[str, Any]) -> list[list[str]]:
    cuda = report["device"].startswith("cuda")
    syncs = any(v["host_syncs"] is not None for v in report["variants"].values())
    return [row(key, v, cuda, syncs) for key, v in report["variants"].items()]


def row(key: str, v: dict[str, Any], cuda: bool, syncs: bool) -> list[str]:
    runs = v["runs_images_per_s"]
    out = [
        f"{key} {v['label']}", v["settings"], str(v["batch_size"]), f"{v['images_per_s']:,.0f}",
        f"{min(runs):,.0f}-{max(runs):,.0f}",
        f"{v['ratio']:.2f}×" if v["ratio"] is not None else "-",
        f"{v['gflops']:,.1f}", f"{v['peak_share']:.0%}", f"{v['dtype_peak_share']:.0%}",
        f"{v['first_images_per_s']:,.0f}", f"{v['first_gflops']:,.1f}",
        f"{v['first_peak_share']:.0%}",
        f"{v['peak_rss_mb']:,.0f}",
    ]  # fmt: skip
    if cuda:
        out.append(f"{v['peak_cuda_mb']:,.0f}")
    if syncs:
        n = v["host_syncs"]
        out.append("-" if n is None else f"{n} in {v['sync_steps']} steps")
    return out


def notes(r: dict[str, Any]) -> list[str]:
    cost, peak = r["step_mflop_per_image"], r["peak"]
    best = ", ".join(
        f"{name} {p['best_gflops']:,.1f} GFLOP/s (median {p['median_gflops']:,.1f}, "
        f"{p['samples']} samples)"
        for name, p in peak.items()
        if isinstance(p, dict)
    )
    load = {t: " ".join(f"{x:.2f}" for x in r["load_average"][t]) for t in ("before", "after")}
    lines = [
        f"Peak: {peak['side']}² matmul, {peak['threads']} threads, best of its samples taken in "
        f"turns with the variants: {best}. '% peak' is of the float32 peak; '% dtype peak' "
        "of the peak of the type the variant multiplies in (bfloat16 for bf16 autocast, where "
        "measured), the harder measure for a bf16 variant.",
        f"Step cost: {cost['total']:.1f} MFLOP per image (forward {cost['forward']:.1f}, weight "
        f"gradients {cost['weight_grads']:.1f}, input gradients {cost['input_grads']:.1f}), "
        "counted as 2 × the conv and linear layers' multiply-adds; an optimizer's own work "
        "(Muon's) is not counted.",
        f"{r.get('gpu') or r['cpu']} ({r['device']}), {r['threads']} threads, CPU native bf16: "
        f"{'yes' if r['cpu_native_bf16'] else 'no'}; torch {r['torch']}, torchvision "
        f"{r['torchvision']}, python {r['python']}. {r['images']} images per variant, 1 first "
        f"+ {r['repeats']} timed epochs each, in turns. Load average (1, 5, 15 min) before: "
        f"{load['before']}, after: {load['after']}",
    ]
    for key, v in r["variants"].items():
        if v.get("overrides") and v["key"] != "a":
            sets = " ".join(f"--set {item}" for item in v["overrides"])
            lines.append(f"({key}) in a run: cifar-bp train {sets}")
    return lines
