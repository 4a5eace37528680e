"""The study's report: results.json (the schema others script against), report.md and PNG plots.

results.json:
    {"variants": {NAME: {"runs": [{"seed", "metrics": {METRIC: VALUE}, "learning_rate", "trainable_params",
                                   "wall_time_s", "final_loss", "loss_curve"}],
                         "summary": {METRIC: {"mean", "std", "ci95": [lo, hi], "n"}},
                         "learning_rate", "trainable_params", "wall_time_s": {"mean", "std", "ci95", "n"}}},
     "paired": {NAME: {METRIC: {"mean_diff", "p_value", "ci95", "t", "n"}}},   # NAME - reference, per seed
     "reference": FIRST VARIANT, "sweep": {NAME: {"learning_rates": {LR: VALUE}, "selected", "metric"}},
     "settings": {...}, "incomplete": [...]}
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .runner import RunResult, Study
from .stats import paired_test, summary

PLOTS = ("benchmarks.png", "question_types.png", "paired_differences.png", "loss_curves.png")


def build_results(study: Study, results: dict[str, list[RunResult]]) -> dict:
    cfg = study.config
    names = [v.name for v in cfg.variants]
    runs = {name: sorted((r for r in results["runs"] if r.variant == name and not r.error), key=lambda r: r.seed)
            for name in names}
    variants = {}
    for name in names:
        metric_names = sorted({m for r in runs[name] for m in r.metrics}, key=_metric_order)
        entry = {"runs": [{"seed": r.seed, "metrics": r.metrics, "learning_rate": r.learning_rate,
                           "trainable_params": r.info.get("trainable_params"),
                           "wall_time_s": r.info.get("wall_time_s"), "final_loss": r.info.get("final_loss"),
                           "max_abs_lora_B": r.info.get("max_abs_lora_B"), "loss_curve": r.info.get("loss_curve")}
                          for r in runs[name]],
                 "summary": {m: summary([r.metrics[m] for r in runs[name] if m in r.metrics]) for m in metric_names},
                 "learning_rate": runs[name][0].learning_rate if runs[name] else None,
                 "trainable_params": runs[name][0].info.get("trainable_params") if runs[name] else None,
                 "wall_time_s": summary([r.info["wall_time_s"] for r in runs[name] if "wall_time_s" in r.info])}
        variants[name] = entry
    reference = names[0]
    paired = {}
    for name in names[1:]:
        by_seed_ref = {r.seed: r.metrics for r in runs[reference]}
        by_seed = {r.seed: r.metrics for r in runs[name]}
        seeds = sorted(by_seed_ref.keys() & by_seed.keys())
        metrics = sorted({m for s in seeds for m in by_seed[s] if m in by_seed_ref[s]}, key=_metric_order)
        paired[name] = {}
        for m in metrics:
            common = [s for s in seeds if m in by_seed[s] and m in by_seed_ref[s]]
            test = paired_test([by_seed_ref[s][m] for s in common], [by_seed[s][m] for s in common])
            paired[name][m] = {"mean_diff": test["mean_diff"], "p_value": test["p_value"], "ci95": test["ci95"],
                               "t": test["t"], "n": test["n"]}
    sweep = {}
    for name in names:
        points = [r for r in results["sweep"] if r.variant == name]
        if points:
            metric = next((study.selection_metric(r.metrics) for r in points if r.metrics), None)
            chosen = study.select_lr(points)
            sweep[name] = {"metric": metric, "selected": chosen, "seed": cfg.sweep_seed,
                           "learning_rates": {f"{r.learning_rate:g}": (r.metrics.get(metric) if not r.error else None)
                                              for r in sorted(points, key=lambda r: r.learning_rate)}}
    incomplete = [{"kind": r.kind, "variant": r.variant, "seed": r.seed, "learning_rate": r.learning_rate,
                   "error": r.error.splitlines()[0][:300]}
                  for group in ("stage1", "sweep", "runs") for r in results[group] if r.error]
    settings = {"preset": cfg.preset, "seeds": cfg.seeds, "variants": names, "lr_sweep": cfg.lr_sweep,
                "sweep_seed": cfg.sweep_seed if cfg.lr_sweep else None, "backbones": cfg.backbones,
                "pretrain": study.stage1_flags(0) | {"seed": "per seed"},
                "finetune": cfg.stage_settings("finetune"), "eval_batch_size": study.preset["eval_batch_size"],
                "data": cfg.data.record() if cfg.data else None, "launcher": study.launcher}
    return {"variants": variants, "paired": paired, "reference": reference, "sweep": sweep,
            "settings": json.loads(json.dumps(settings, default=str)), "incomplete": incomplete}


def _metric_order(name: str) -> tuple:
    group = name.split("/")[0]
    rank = 0 if name.endswith("/overall") else {"all": 1, "combination": 2, "type": 3}.get(group, 4)
    return rank, name


def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _p(value) -> str:
    if value is None:
        return "–"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def write_report(study: Study, results: dict[str, list[RunResult]], out: Path) -> dict:
    """results.json, report.md and the plots in `out`; returns the results dict."""
    data = build_results(study, results)
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    written = write_plots(data, out)
    (out / "report.md").write_text(markdown(data, written))
    return data


def markdown(data: dict, plots: list[str]) -> str:
    names = list(data["variants"])
    reference = data["reference"]
    s = data["settings"]
    lines = ["# Adapter study", "",
             f"Preset `{s['preset']}`, seeds {s['seeds']}, backbones `{s['backbones'].get('model_name_or_path')}` + "
             f"`{s['backbones'].get('vision_tower')}`. Every run: stage 1 (shared by the variants of a seed) -> "
             f"stage 2 -> eval/run_vqa.py -> eval/score.py. Mean ± sample std over seeds, 95 % t-interval; Δ = "
             f"variant − `{reference}` per seed (paired t-test, two-sided p).", ""]
    lines += ["## Variants", "", "| variant | seeds | learning rate | trainable adapter params | wall time per run (s) "
              "| final train loss |", "|---|---|---|---|---|---|"]
    for name in names:
        v = data["variants"][name]
        if not v["runs"]:
            lines.append(f"| `{name}` | 0 | – | – | – | – |")
            continue
        loss = summary([r["final_loss"] for r in v["runs"] if r.get("final_loss") is not None])
        lines.append(f"| `{name}` | {len(v['runs'])} | {v['learning_rate']:g} | {v['trainable_params']:,} "
                     f"| {_fmt(v['wall_time_s']['mean'])} | {_fmt(loss['mean'], 3)} ± {_fmt(loss['std'], 3)} |")
    metric_names = sorted({m for v in data["variants"].values() for m in v["summary"]},
                          key=lambda m: (0 if m.endswith("/overall") else 1 if m.startswith("all") else
                                         2 if m.startswith("combination") else 3, m))
    lines += ["", "## Results", "", "| metric | " + " | ".join(f"`{n}`" for n in names) + " |",
              "|---|" + "---|" * len(names)]
    for m in metric_names:
        cells = []
        for name in names:
            summ = data["variants"][name]["summary"].get(m)
            if not summ or summ["mean"] is None:
                cells.append("–")
                continue
            ci = summ["ci95"]
            cell = f"{summ['mean']:.1f} ± {_fmt(summ['std'])}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")
            if name != reference and m in data["paired"].get(name, {}):
                d = data["paired"][name][m]
                dci = f" [{d['ci95'][0]:.1f}, {d['ci95'][1]:.1f}]" if d["ci95"] else ""
                cell += f"<br>Δ {_fmt(d['mean_diff'])}{dci}, p {_p(d['p_value'])}"
            cells.append(cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    resolved = [(name, m, d) for name, metrics in data["paired"].items() for m, d in metrics.items()
                if d["ci95"] and (d["ci95"][0] > 0 or d["ci95"][1] < 0)]
    lines += ["", f"## Differences from `{reference}` that the runs resolve", "",
              "Paired 95 % interval of the per-seed difference excluding 0 (each metric tested on its own, no "
              "correction for the many comparisons):", ""]
    lines += [f"- `{name}` {m}: Δ {d['mean_diff']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}] over {d['n']} seeds"
              for name, m, d in resolved] or ["- none: no difference is detectable with these seeds"]
    if data["sweep"]:
        lrs = sorted({lr for sw in data["sweep"].values() for lr in sw["learning_rates"]}, key=float)
        lines += ["", "## Learning-rate sweep", "",
                  f"Seed {s['sweep_seed']}, scored on a validation set drawn with another data seed "
                  f"(metric: `{next(iter(data['sweep'].values()))['metric']}`); the best one is used for every seed.",
                  "", "| variant | " + " | ".join(lrs) + " | selected |", "|---|" + "---|" * (len(lrs) + 1)]
        for name, sw in data["sweep"].items():
            selected = f"{sw['selected']:g}" if sw["selected"] else "–"
            lines.append(f"| `{name}` | " + " | ".join(_fmt(sw["learning_rates"].get(lr)) for lr in lrs)
                         + f" | {selected} |")
    if data["incomplete"]:
        lines += ["", "## Not finished", ""]
        lines += [f"- {i['kind']} `{i['variant'] or ''}` seed {i['seed']}"
                  + (f" lr {i['learning_rate']:g}" if i["learning_rate"] else "") + f": {i['error']}"
                  for i in data["incomplete"]]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_plots(data: dict, out: Path) -> list[str]:
    """Bars with 95 % intervals per benchmark and per question type, paired differences, loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in data["variants"] if data["variants"][n]["runs"]]
    if not names:
        return []
    colours = plt.get_cmap("tab10").colors
    written = []
    groups = {"benchmarks.png": [m for m in _all_metrics(data) if m.endswith("/overall")],
              "question_types.png": [m for m in _all_metrics(data)
                                     if m.startswith(("type/", "combination/", "all/"))]}
    for filename, metrics in groups.items():
        if not metrics:
            continue
        columns = min(4, len(metrics))
        rows = math.ceil(len(metrics) / columns)
        fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.8 * rows), squeeze=False)
        for ax, metric in zip(axes.flat, metrics):
            for i, name in enumerate(names):
                summ = data["variants"][name]["summary"].get(metric)
                if not summ or summ["mean"] is None:
                    continue
                err = [[summ["mean"] - summ["ci95"][0]], [summ["ci95"][1] - summ["mean"]]] if summ["ci95"] else None
                ax.bar(i, summ["mean"], yerr=err, color=colours[i % 10], capsize=3, label=name)
                values = [r["metrics"][metric] for r in data["variants"][name]["runs"] if metric in r["metrics"]]
                ax.scatter([i] * len(values), values, s=6, color="black", zorder=3)
            ax.set_title(metric, fontsize=9)
            if not metric.startswith("mme/"):  # percentages (MME's score is a sum over subtasks)
                ax.set_ylim(0, 100)
            ax.set_xticks([])
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(metrics):]:
            ax.axis("off")
        fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="lower center", ncol=min(len(names), 4),
                   fontsize=8)
        fig.suptitle("mean over seeds, 95 % t-interval, dots = seeds", fontsize=9)
        fig.tight_layout(rect=(0, 0.08, 1, 0.96))
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)
        written.append(filename)

    paired_names = [n for n in names[1:] if data["paired"].get(n)]
    metrics = [m for m in _all_metrics(data) if any(m in data["paired"][n] for n in paired_names)]
    if paired_names and metrics:
        fig, ax = plt.subplots(figsize=(7.5, 0.28 * len(metrics) * len(paired_names) + 1.2))
        y = 0
        ticks, labels = [], []
        for m in reversed(metrics):
            for j, name in enumerate(paired_names):
                d = data["paired"][name].get(m)
                if d and d["mean_diff"] is not None:
                    ci = d["ci95"]
                    xerr = [[d["mean_diff"] - ci[0]], [ci[1] - d["mean_diff"]]] if ci else None
                    ax.errorbar(d["mean_diff"], y, xerr=xerr, fmt="o", color=colours[(names.index(name)) % 10],
                                capsize=2, markersize=3, label=name if m == metrics[-1] else None)
                y += 1
            ticks.append(y - len(paired_names) / 2 - 0.5)
            labels.append(m)
            y += 0.5
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_yticks(ticks, labels, fontsize=7)
        ax.set_xlabel(f"paired difference vs {data['reference']} (points), 95 % t-interval", fontsize=8)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(out / "paired_differences.png", dpi=110)
        plt.close(fig)
        written.append("paired_differences.png")

    curves = {n: [r.get("loss_curve") for r in data["variants"][n]["runs"]] for n in names}
    if any(c for cs in curves.values() for c in cs):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for i, name in enumerate(names):
            runs = [c for c in curves[name] if c]
            if not runs:
                continue
            steps = sorted(set.intersection(*(set(s for s, _ in c) for c in runs)))
            per_step = [[dict(c)[s] for c in runs] for s in steps]
            per_step = _running_mean(per_step, window=max(1, len(steps) // 40))
            mean = [sum(v) / len(v) for v in per_step]
            std = [math.sqrt(sum((x - mu) ** 2 for x in v) / max(1, len(v) - 1)) for v, mu in zip(per_step, mean)]
            ax.plot(steps, mean, color=colours[i % 10], label=f"{name} ({len(runs)} seeds)", linewidth=1)
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=colours[i % 10], alpha=0.2)
        ax.set_xlabel("stage-2 optimizer step")
        ax.set_ylabel("training loss (mean ± std over seeds)" + (f", running mean of {max(1, len(steps) // 40)} steps"
                                                                 if len(steps) >= 80 else ""), fontsize=8)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "loss_curves.png", dpi=110)
        plt.close(fig)
        written.append("loss_curves.png")
    return written


def _running_mean(per_step: list[list[float]], window: int) -> list[list[float]]:
    """Each seed's curve averaged over the last `window` steps (per-step losses of small batches are noisy)."""
    if window <= 1:
        return per_step
    seeds = list(zip(*per_step))
    smoothed = [[sum(c[max(0, i - window + 1):i + 1]) / len(c[max(0, i - window + 1):i + 1]) for i in range(len(c))]
                for c in seeds]
    return [list(v) for v in zip(*smoothed)]


def _all_metrics(data: dict) -> list[str]:
    return sorted({m for v in data["variants"].values() for m in v["summary"]}, key=_metric_order)

