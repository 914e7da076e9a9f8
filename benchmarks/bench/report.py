"""Markdown for benchmark results: a header with the case and its ground truth, one table row per method, and the
``ours / peer`` lines for matched pairs. All numbers come from the results dict ``run_bench`` writes as JSON."""

from __future__ import annotations

from typing import Any

__all__ = ["markdown", "ratio_lines"]


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "–" if value is None or value != value else format(value, fmt)


def _lds(row: dict[str, Any], measure: str) -> str:
    res = row.get(f"lds_{measure}")
    if not res:
        return "–"
    low, high = res["ci"]
    return f"{_num(res['mean'])} [{_num(low, '.2f')}, {_num(high, '.2f')}]"


def _cells(row: dict[str, Any]) -> list[str]:
    name = row["method"] if row["family"] == "datacredit" else f"{row['method']} *({row['family']})*"
    if row["status"] != "ok":
        text = row.get("reason") or row.get("error") or ""
        return [name, f"{row['status']}: {text.replace('|', '/')}", "", "", "", "", "", ""]
    mis = row.get("mislabel") or {}
    auroc = _num(mis.get("auroc")) if "auroc" in mis else ("error" if "error" in mis else "–")
    pair = ""
    if "time_ratio" in row:
        pair = f"{row['time_ratio']:.2f}× vs {row['pair']} (r = {_num(row.get('r_vs_ours'))})"
    return [name, _num(row.get("cpu_seconds"), ".2f"), _num(row["seconds"], ".2f"), _num(row.get("peak_mb"), ".0f"),
            _lds(row, "loss"), auroc, pair, row.get("note", "")]


def markdown(results: dict[str, Any]) -> str:
    """The results of one case as markdown (header, table, pair lines)."""
    gt = results["groundtruth"]
    m = results["machine"]
    lines = [
        f"### {results['case']}{' (quick)' if results['quick'] else ''}",
        "",
        f"{results['description']}; {results['n_train']} training examples, {results['n_query']} queries, "
        f"{results['parameters']} parameters. One training run: {_num(results.get('train_cpu_seconds'), '.2f')} s "
        f"CPU ({_num(results['train_seconds'], '.2f')} s wall). "
        f"Ground truth: m = {gt['m']} subsets (α = {gt['alpha']}) × {gt['seeds']} seeds, median retraining "
        f"{_num(gt['retrain_seconds_median'], '.2f')} s; noise ceiling (seed-to-seed Spearman) "
        f"{_num(gt['noise_ceiling_loss'])}. torch {m['torch']}, {m['threads']} thread(s), load average "
        f"{_fmt_load(m.get('load_average'))}.",
        "",
    ]
    head = ["method", "CPU (s)", "wall (s)", "peak RSS (MB)", "LDS [95% CI]", "mislabel AUROC", "ours / peer CPU time",
            "note"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in results["rows"]]
    ratios = ratio_lines(results)
    if ratios:
        lines += ["", *[f"- {line}" for line in ratios]]
    return "\n".join(lines) + "\n"


def ratio_lines(results: dict[str, Any]) -> list[str]:
    """One line per matched pair that ran: ours / peer CPU time (and wall) and both LDS values."""
    by_name = {r["method"]: r for r in results["rows"]}
    out = []
    for row in results["rows"]:
        if "time_ratio" not in row:
            continue
        ours = by_name[row["pair"]]
        out.append(f"{row['pair']} / {row['method']}: CPU time {_num(ours['cpu_seconds'], '.2f')} s / "
                   f"{_num(row['cpu_seconds'], '.2f')} s = {row['time_ratio']:.2f} "
                   f"(wall {_num(row.get('wall_ratio'), '.2f')}); "
                   f"LDS {_num(ours['lds_loss']['mean'])} vs {_num(row['lds_loss']['mean'])}; "
                   f"r(scores) = {_num(row.get('r_vs_ours'))}")
    return out


def _fmt_load(load: Any) -> str:
    return "–" if not load else ", ".join(f"{x:.1f}" for x in load)
