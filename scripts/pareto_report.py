"""Store bytes vs held-out perplexity of the default model: uniform expert levels and edgemoe-plan plans.

For each uniform level (``--levels``) the default model is exported at that level; for each tolerance
(``--tolerances``) edgemoe-plan plans it (``--plan-bits`` offered, ``--method`` ranking) on calibration text
and edgemoe-export --plan writes the mixed bundle. Every bundle is then scored through the runtime
(edgemoe_ort.eval, the library of ``edgemoe-eval``; prefill windows of 256) on the held-out split of
models/eval_default.py. Calibration text: files of eval_default's **train** split copied into
``WORK/calibration/`` (the planner calibrates on that folder's own train split), so no held-out token is
ever seen by the planner. Writes a section of docs/quality.md (between the ``pareto`` markers, replaced on
each run) and docs/img/quality-pareto.png; scripts/quality_report.py calls it after its own tables.

    .venv/bin/python scripts/pareto_report.py --levels int8,int4 --tolerances 0.5%,1%,2%
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: edgemoe_ort/plan/planner.py says why

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgemoe_ort.bundle import Bundle  # noqa: E402
from edgemoe_ort.eval.perplexity import evaluate  # noqa: E402
from edgemoe_ort.export import export_model  # noqa: E402
from edgemoe_ort.plan.format import parse_bits, parse_tolerance, quantized_dtypes, write_plan  # noqa: E402
from edgemoe_ort.plan.planner import plan_model  # noqa: E402
from edgemoe_ort.quant import BITS  # noqa: E402
from edgemoe_ort.runtime import MoEModel, RuntimeOptions  # noqa: E402
from models.eval_default import heldout_token_ids, load_corpus, load_tokenizer  # noqa: E402

MODEL = REPO / "models" / "edgemoe-tiny-mixtral"
BEGIN, END = "<!-- pareto: begin -->", "<!-- pareto: end -->"
WINDOW = 256
METHOD = """
EdgeMoE's expert-wise bitwidth adaptation (docs/architecture.md, "plan"). **Method.** The planner loads the
HF checkpoint in float32, patched as the exporter patches it, and replaces each routed expert's weights by
`dequantize(quantize(w, dtype, group_size))` (edgemoe_ort.quant: the numbers the bundle's kernels compute
with, bit for bit); the dense part stays fp32. It measures the calibration perplexity of every uniform level
offered, takes as `high` the lowest level whose uniform model (and every level above) is within the
tolerance and as `low` the next one, ranks the experts by the perplexity with that one expert alone at the
lowest offered level and all others at `high` (`--method loss`, one pass per expert; `--method proxy`: the
gate-weighted squared output error of each expert at the lowest level on the calibration inputs routed to
it, relative to its layer's MoE output energy, one pass in all), puts the K least important at `low` and
finds the largest K within the tolerance by bisection (the degradation is close to monotone in K; a
non-monotone curve can only make K smaller than it could be, never outside the tolerance), then lowers the
least important of those K one level further the same way, until the lowest level or K = 0
(edgemoe_ort/plan/search.py). **Reference:** degradation = calibration perplexity / that of the uniform model
at the highest offered level - 1; `plan.json` records the reference dtype and perplexity. **Splits:**
calibration = the planner's own train split (edgemoe_ort/profile/corpus.py) of `--corpus`; here the corpus is
train-split files of models/eval_default.py, and the table scores the held-out split of models/eval_default.py
through the runtime (edgemoe-eval's library, prefill windows of 256): no token scored below was seen by the
planner.
"""


def calibration_folder(work: Path, chars: int) -> Path:
    """Train-split files of the default model's corpus (in path order) copied to ``work/calibration``, until
    they hold ``chars`` characters."""
    folder = work / "calibration"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    n = 0
    for i, f in enumerate(load_corpus("train")):
        if n >= chars:
            break
        (folder / f"{i:05d}_{f.relpath.replace('/', '_')}").write_text(f.text, encoding="utf-8")
        n += len(f.text)
    return folder


def heldout_ppl(bundle: Path, ids: np.ndarray) -> float:
    model = MoEModel.load(bundle, RuntimeOptions())
    try:
        return evaluate(model, ids, window=WINDOW, mode="prefill").perplexity
    finally:
        model.close()


def _curve(points: list[tuple[int, float]], x: int) -> float | None:
    """The uniform curve (piecewise linear in bytes) at ``x``; None outside its range."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    uni = sorted((r for r in rows if r["kind"] == "uniform"), key=lambda r: r["store_bytes"])
    ax.plot([r["store_bytes"] / 2**20 for r in uni], [r["ppl"] for r in uni], "o-", color="tab:blue",
            label="uniform")
    for r in uni:
        ax.annotate(r["label"], (r["store_bytes"] / 2**20, r["ppl"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    plans = [r for r in rows if r["kind"] == "plan"]
    ax.plot([r["store_bytes"] / 2**20 for r in plans], [r["ppl"] for r in plans], "s", color="tab:red",
            label="edgemoe-plan")
    for r in plans:
        ax.annotate(r["label"], (r["store_bytes"] / 2**20, r["ppl"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=8, color="tab:red")
    ax.set_xlabel("expert store (MiB)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("edgemoe-tiny-mixtral: store bytes vs held-out perplexity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def section(rows: list[dict], args: argparse.Namespace, command: str, img: str) -> str:
    ref = next(r for r in rows if r["kind"] == "uniform")
    lines = [
        BEGIN,
        "## Expert-wise bitwidths (`edgemoe-plan`)",
        "",
        " ".join(METHOD.split()),
        "",
        f"Levels: uniform {', '.join(args.levels)}; plans offered {', '.join(args.plan_bits)}, tolerances"
        f" {', '.join(args.tolerances)}, `--method {args.method}`, {args.calib_tokens} calibration tokens;"
        f" held-out: the first {args.tokens} tokens; group size {args.group_size}. Produced by:",
        "",
        "```",
        command,
        "```",
        "",
        "| bundle | experts per dtype | store bytes | held-out perplexity | Δ vs "
        f"{ref['label']} | calibration Δ (planner) | vs the uniform curve at its size |"
        " planner time (load) |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    uni_pts = [(r["store_bytes"], r["ppl"]) for r in rows if r["kind"] == "uniform"]
    for r in rows:
        vs = "–"
        if r["kind"] == "plan":
            at = _curve(uni_pts, r["store_bytes"])
            vs = "outside the uniform range" if at is None else (
                f"{'below' if r['ppl'] < at else 'above'} ({100 * (r['ppl'] / at - 1):+.3f}%)")
        lines.append(
            f"| {r['label']} | {r['counts']} | {r['store_bytes']:,} | {r['ppl']:.3f} |"
            f" {100 * (r['ppl'] / ref['ppl'] - 1):+.3f}% | {r.get('calib', '–')} | {vs} |"
            f" {r.get('seconds', '–')} |")
    plans = [r for r in rows if r["kind"] == "plan" and "spearman" in r]
    lines += ["", f"![store bytes vs held-out perplexity]({img})", ""]
    if min(BITS[d] for d in args.levels + args.plan_bits) >= 4:
        lines += ["With the formats of this build (lowest int4) the uniform int4 model is as good as int8 on"
                  " held-out text, so these plans exercise the planner rather than a trade-off: the trade-off"
                  " needs int3 / int2 (`--levels int8,int4,int3,int2 --tolerances 0.5%,1%,2%`).", ""]
    if plans:
        lines.append("Proxy vs loss ranking (Spearman over all experts, per plan that ranked): "
                     + ", ".join(f"{r['label']}: {r['spearman']}" for r in plans) + ".")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default=",".join(quantized_dtypes()),
                    help="uniform levels (bits or dtypes; default every quantized format of this build)")
    ap.add_argument("--tolerances", default="0.1%,0.2%,0.3%,0.5%", help="a plan per tolerance")
    ap.add_argument("--plan-bits", default=None, help="levels the plans may use (default: --levels)")
    ap.add_argument("--method", default="loss", choices=("loss", "proxy"))
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=32768, help="held-out tokens scored")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--work", type=Path, default=REPO / "build" / "quality" / "pareto")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "quality.md")
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "quality-pareto.png")
    args = ap.parse_args(argv)
    args.levels = parse_bits(args.levels, "--levels")
    args.plan_bits = parse_bits(args.plan_bits, "--plan-bits") if args.plan_bits else list(args.levels)
    args.tolerances = [t.strip() for t in args.tolerances.split(",") if t.strip()]
    tols = [parse_tolerance(t) for t in args.tolerances]
    command = (f"python scripts/pareto_report.py --levels {','.join(args.levels)} --tolerances "
               f"{','.join(args.tolerances)} --plan-bits {','.join(args.plan_bits)} --method {args.method} "
               f"--calib-tokens {args.calib_tokens} --tokens {args.tokens} --group-size {args.group_size}")

    ids = heldout_token_ids(load_tokenizer(MODEL), args.tokens)
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for d in args.levels:
        path = export_model(MODEL, args.work / f"uniform-{d}", bits=BITS[d], group_size=args.group_size,
                            force=True)
        ppl = heldout_ppl(path, ids)
        b = Bundle.open(path)
        rows.append({"kind": "uniform", "label": f"uniform {d}", "counts": f"{d} {b.summary()['experts']}",
                     "store_bytes": b.store_bytes, "ppl": ppl})
        print(f"uniform {d}: held-out perplexity {ppl:.3f}", flush=True)
    calib = calibration_folder(args.work, 3 * 4 * args.calib_tokens)  # ~3-4 chars per token, 10% held out
    for text, tol in zip(args.tolerances, tols, strict=True):
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        plan = plan_model(MODEL, tolerance=tol, corpus=[calib], bits=args.plan_bits,
                          group_size=args.group_size, tokens=args.calib_tokens, method=args.method)
        seconds = time.perf_counter() - t0
        tag = text.replace("%", "pct")
        plan_path = write_plan(args.work / f"plan-{tag}.json", plan)
        path = export_model(MODEL, args.work / f"plan-{tag}", plan=plan_path, force=True)
        ppl = heldout_ppl(path, ids)
        cmp_ = plan.search.get("proxy_vs_loss", {})
        row = {"kind": "plan", "label": f"plan {text}",
               "counts": ", ".join(f"{d} {n}" for d, n in plan.counts().items()),
               "store_bytes": Bundle.open(path).store_bytes, "ppl": ppl,
               "calib": f"{100 * plan.result['degradation']:+.3f}%",
               "seconds": f"{seconds:.0f} s ({load:.1f})"}
        if cmp_.get("spearman") is not None:
            row["spearman"] = f"{cmp_['spearman']:.2f}"
        rows.append(row)
        print(f"plan {text}: {row['counts']}, held-out perplexity {ppl:.3f}, calibration {row['calib']}, "
              f"{seconds:.0f} s", flush=True)
    (args.work / "rows.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.plot)
    img = Path("img") / args.plot.name if args.plot.parent.name == "img" else args.plot
    text = args.out.read_text() if args.out.exists() else ""
    new = section(rows, args, command, str(img))
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + new + text[text.index(END) + len(END) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + new
    args.out.write_text(text)
    print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
