"""results.md / results.json / tradeoff.png of the reproduction (rewritten after every seed)."""

from __future__ import annotations

import json
import os
from typing import Dict, List

from .aggregate import fmt_ci, fmt_rec


def variant_table(agg: Dict[str, Dict]) -> List[str]:
    top4 = agg.get("top-4", {}).get("lat_mean")
    lines = ["| variant | router top-k | k_a | experts run | active params / token | test exact match "
             "(mean ± sd) | per seed | before SFT | test answer NLL (mean ± sd) | NLL before SFT | "
             "val exact match | max abs(θ−1) | latency s | vs top-4 |", "|---" * 14 + "|"]
    for n, g in agg.items():
        s = g["spec"]
        run = f"{g['main_mean']:.2f} (measured)" if "main_mean" in g else str(s["topk"] - s["k_a"])
        lat = f"{g['lat_mean']:.4f} ± {g['lat_std']:.4f}" if "lat_mean" in g else "–"
        rel = f"{g['lat_mean'] / top4:.3f}" if top4 and "lat_mean" in g else "–"
        drift = "–" if g["theta_drift_max"] is None else f"{g['theta_drift_max']:.3f}"
        lines.append(
            f"| {n} | {s['topk']} | {s['k_a']} | {run} | {g['active_params']:,.0f} | "
            f"{100 * g['acc_mean']:.1f} ± {100 * g['acc_std']:.1f} % | "
            + " / ".join(f"{100 * x:.1f}" for x in g["acc_seeds"])
            + f" | {100 * g['acc0_mean']:.1f} % | {g['nll_mean']:.4f} ± {g['nll_std']:.4f} | "
            f"{g['nll0_mean']:.3f} | {100 * g['val_acc_mean']:.1f} % | {drift} | {lat} | {rel} |")
    return lines


def recovery_table(recs: List[Dict]) -> List[str]:
    lines = ["| CE row | gap (reference − baseline) | recovery per seed [95% CI over test items] | "
             "recovery of the seed means [95% CI, seeds and items resampled] | answer-NLL recovery "
             "per seed [95% CI] | NLL recovery of the seed means [95% CI] |", "|---|---|---|---|---|---|"]
    for r in recs:
        om = r["of_means"]
        undef = f", no gap in {100 * om['undefined'] / r['n_boot']:.0f}% of resamples" if om.get("undefined") else ""
        per = "; ".join(seed_cell(s, r["n_boot"]) for s in r["per_seed"])
        lines.append(
            f"| {r['ce']} | {r['high']} − {r['low']}: {100 * om['acc'][r['high']]:.1f} − "
            f"{100 * om['acc'][r['low']]:.1f} % | {per} | {fmt_rec(om['point'])} {fmt_ci(om.get('ci'))}{undef} | "
            + "; ".join(f"{fmt_rec(x['point'])} {fmt_ci(x['ci'])}" for x in r["nll"]["per_seed"])
            + f" | {fmt_rec(r['nll']['of_means']['point'])} {fmt_ci(r['nll']['of_means'].get('ci'))} |")
    return lines


def gap_table(rec: Dict) -> List[str]:
    """Per seed, is there a gap to recover at all: reference − baseline exact match and answer NLL with
    paired 95% bootstrap intervals over the test items (a recovery is meaningful only where both
    intervals exclude 0)."""
    hi, lo = rec["high"], rec["low"]
    lines = [f"| seed | {hi} exact match | {lo} exact match | gap [95% CI] | {hi} answer NLL | {lo} answer NLL | "
             "NLL gap, baseline − reference [95% CI] |", "|---|---|---|---|---|---|---|"]
    for i, (e, n) in enumerate(zip(rec["per_seed"], rec["nll"]["per_seed"])):
        ci = "n/a" if n["gap_ci"] is None else f"[{-n['gap_ci'][1]:.4f}, {-n['gap_ci'][0]:.4f}]"
        nll = n.get("acc", {})
        lines.append(f"| {i} | {100 * e['acc'][hi]:.1f}% | {100 * e['acc'][lo]:.1f}% | {100 * e['gap']:.1f} pt "
                     f"[{100 * e['gap_ci'][0]:.1f}, {100 * e['gap_ci'][1]:.1f}] | {nll.get(hi, float('nan')):.4f} | "
                     f"{nll.get(lo, float('nan')):.4f} | {-n['gap']:.4f} {ci} |")
    return lines


def seed_cell(s: Dict, n_boot: int) -> str:
    """Recovery [CI] (gap [CI]); the share of resamples without a gap when there are any: a
    tiny gap makes the interval of the remaining resamples meaningless."""
    gap = f"gap {100 * s['gap']:.1f} pt [{100 * s['gap_ci'][0]:.1f}, {100 * s['gap_ci'][1]:.1f}]"
    undef = f", no gap in {100 * s['undefined'] / n_boot:.0f}% of resamples" if s["undefined"] else ""
    return f"{fmt_rec(s['point'])} {fmt_ci(s['ci'])} ({gap}{undef})"


def choices_table(seeds: List[Dict]) -> List[str]:
    lines = ["| seed | group | validation exact match per option | selected | its test exact match |",
             "|---|---|---|---|---|"]
    for s in seeds:
        for group, chosen in s["selected"].items():
            opts = [n for n, r in s["variants"].items() if r["spec"].get("group") == group and n != group]
            val = ", ".join(f"{n}: {100 * s['variants'][n]['val_acc']:.1f}%" for n in opts)
            lines.append(f"| {s['seed']} | {group} | {val} | {chosen} | "
                         f"{100 * s['variants'][chosen]['acc']:.1f}% |")
    return lines


def sensitivity_lines(sens: Dict) -> List[str]:
    t1, t2 = sens["threads"]
    lines = [f"Pretraining seed {sens['seed']} rerun end to end with torch.set_num_threads({t2}) instead of "
             f"{t1}: pretraining loss (last 10% of steps) {sens['pretrain_loss'][0]:.5f} → "
             f"{sens['pretrain_loss'][1]:.5f}.", "",
             f"| variant | test exact match, {t1} thread(s) | {t2} thread(s) | change | test items flipped | "
             "NLL change |", "|---|---|---|---|---|---|"]
    for n, v in sens["variants"].items():
        a1, a2 = v["acc"]
        lines.append(f"| {n} | {100 * a1:.1f}% | {100 * a2:.1f}% | {100 * (a2 - a1):+.1f} pt | "
                     f"{v['flipped']} | {v['nll'][1] - v['nll'][0]:+.4f} |")
    lines += [""] + [f"recovery {ce}: {fmt_rec(a)} → {fmt_rec(b)}" for ce, (a, b) in sens["recovery"].items()]
    return lines


def seed_line(s: Dict, gate_acc: float) -> str:
    pre, gate = s.get("pretrain"), ""
    if pre is not None:
        verdict = "gate off" if gate_acc <= 0 else ("passed" if pre["passed"] else "NOT passed")
        gate = (f", {pre['steps']} pretraining steps, check {100 * pre['gate_history'][-1][1]:.1f}% exact match "
                f"({verdict})")
    return f"seed {s['seed']}: pretraining loss {s['pretrain_loss']:.4f}{gate}, {s['wall_s']:.0f} s"


def machine_lines(res: Dict) -> List[str]:
    """Other processes may share the cores: the load averages bracket the run."""
    m, st = res.get("machine"), res["settings"]
    if not m:
        return []
    end = f", at the end {m['load_end'][0]:.2f}" if "load_end" in m else ""
    return [f"{m['cpus']} CPUs, {st.get('workers', 1)} worker process(es) x {st['threads']} torch thread(s); "
            f"1-min load average at the start {m['load_start'][0]:.2f}{end} (other processes included)"]


def write_markdown(res: Dict, out: str) -> None:
    md = ["# Scaled-down CE trade-off reproduction", "",
          f"status: {res['status']}; pretraining seeds done (threads={res['settings']['threads']}): "
          f"{[s['seed'] for s in res['seeds']]}; wall time so far {res['wall_s']:.0f} s", "",
          *machine_lines(res), "", "per pretraining seed: " + "; ".join(seed_line(s, res["settings"].get("gate_acc", 0))
                                                        for s in res["seeds"]), ""]
    if res.get("aggregate"):
        md += ["## Variants (test: the same held-out problems for every seed and variant)", "",
               *variant_table(res["aggregate"]), ""]
    if res.get("recovery"):
        md += ["## Recovery of the gap, (acc_CE − acc_baseline)/(acc_reference − acc_baseline) "
               "(paper: 53–64%)", "", *recovery_table(res["recovery"]), ""]
    if res.get("recovery"):
        md += [f"## Is there a gap? {res['recovery'][0]['high']} vs {res['recovery'][0]['low']} per pretraining seed",
               "", *gap_table(res["recovery"][0]), ""]
        k1 = [r for r in res["recovery"] if r["high"] != res["recovery"][0]["high"]]
        md += [*gap_table(k1[0]), ""] if k1 else []
    if res["seeds"] and res["seeds"][0]["selected"]:
        md += ["## Choices made on the validation problems (never on the test problems)", "",
               *choices_table(res["seeds"]), ""]
    if res.get("sensitivity"):
        md += ["## CPU sensitivity", "", *sensitivity_lines(res["sensitivity"]), ""]
    if res.get("notes"):
        md += ["## Notes", "", *[f"- {n}" for n in res["notes"]], ""]
    md += [f"settings: {json.dumps(res['settings'])}", ""]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(md))


def write_json(res: Dict, out: str) -> None:
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(res, f, separators=(",", ":"))  # compact: per-item arrays of every variant and seed
    os.replace(tmp, os.path.join(out, "results.json"))  # a reader never sees half a file


COLORS = {"top-4": "tab:blue", "top-2": "tab:orange", "top-1": "tab:red", "top-2+CE": "tab:green",
          "top-1+CE": "tab:brown", "top-2+CE hidden": "tab:olive", "top-2+CE lr-mult (val)": "tab:purple",
          "top-2+calCE (val)": "tab:gray", "top-2+calCE lr-mult (val)": "black",
          "top-2+tied θ lr-mult (val)": "tab:pink"}


def write_plot(res: Dict, out: str) -> None:
    import matplotlib  # plotting only; not a dependency of the package

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for n, g in res["aggregate"].items():
        if "lat_mean" not in g or g["spec"].get("group") not in (None, n):  # grid: the selected row only
            continue
        ax.errorbar(g["lat_mean"], 100 * g["acc_mean"], xerr=g["lat_std"], yerr=100 * g["acc_std"],
                    fmt="o", color=COLORS.get(n, "tab:cyan"), capsize=3, label=n)
        for acc in g["acc_seeds"]:
            ax.plot(g["lat_mean"], 100 * acc, ".", color=COLORS.get(n, "tab:cyan"), alpha=0.35)
    ax.set_xlabel(f"greedy decode latency, batch {res['settings']['lat_batch']} (s)")
    ax.set_ylabel("test exact match (%)")
    ax.set_title("Accuracy vs latency (scaled-down, CPU; dots: pretraining seeds)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "tradeoff.png"), dpi=120)
    plt.close(fig)


def write_outputs(res: Dict, out: str, plot: bool = True) -> None:
    write_json(res, out)
    write_markdown(res, out)
    if plot and res.get("aggregate"):
        write_plot(res, out)
