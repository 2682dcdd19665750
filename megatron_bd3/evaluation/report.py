"""What `bd3-eval` hands back: a table on stdout, one JSON file, PNG plots, optionally wandb.

The JSON (`<output>/eval.json`) holds everything measured: the model, the evaluation layout,
per dataset the bound with its interval and data counts, the generation report, the variance
table. Plots sit next to it: `likelihood.png` (perplexity bound per dataset with its 95%
interval), `generation.png` (generative perplexity against unigram entropy, one point per
sample), `variance.png` (NELBO variance and gradient variance per clip range).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def likelihood_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'dataset':<20} {'NLL':>9} {'+-SE':>9} {'PPL':>10} {'PPL 95% interval':>23} "
             f"{'tokens':>10} {'seqs':>7} {'K':>3}"]
    for r in rows:
        interval = ("n/a" if r["ppl_ci95"] is None
                    else f"[{r['ppl_ci95'][0]:.3f}, {r['ppl_ci95'][1]:.3f}]")
        lines.append(f"{r['name']:<20} {r['nll']:>9.4f} {_fmt(r['se'], '.4f'):>9} "
                     f"{r['ppl']:>10.3f} {interval:>23} {r['tokens']:>10} {r['sequences']:>7} "
                     f"{r['nelbo_samples']:>3}")
    return "\n".join(lines)


def variance_table(rows: list[dict[str, Any]]) -> str:
    """One line per clip range: the shape of paper Table 2. The paper's NELBO column is the
    perplexity of a model trained with each range; here one checkpoint's estimator is measured
    under each range, so `loss` is its mean training loss under that range, not a bound."""
    first = rows[0]
    lines = [f"gradient variance (eq. 10) of one checkpoint's training loss per clip range; "
             f"M = {first['minibatches']} minibatches of {first['batch_size']} sequences of "
             f"{first['dataset']} (not models trained per range, as in the paper's Table 2)",
             f"{'clip range':<16} {'loss':>9} {'NELBO var':>11} {'minibatch var':>13} "
             f"{'grad var':>11} {'mean |g|^2':>11} {'M':>4}"]
    for r in rows:
        label = r["label"] + (" *" if r.get("learned") else "")
        lines.append(f"{label:<16} {r['loss']:>9.4f} {r['loss_variance']:>11.4g} "
                     f"{r['minibatch_loss_variance']:>13.4g} {r['grad_variance']:>11.4g} "
                     f"{r['grad_sq_norm']:>11.4g} {r['minibatches']:>4}")
    lines.append("NELBO var: per-(sequence, block) NELBO terms, the clip search's statistic; "
                 "minibatch var: of the minibatch loss; * the model's learned range")
    return "\n".join(lines)


def generation_table(report: dict[str, Any]) -> str:
    stops = ", ".join(f"{reason} {count}" for reason, count in report["stop_reasons"].items())
    return "\n".join([
        f"generation: {report['num_samples']} samples of {report['length']} tokens, scorer "
        f"{report['scorer'] or 'none'}",
        f"  gen PPL {_fmt(report['gen_ppl'], '.3f')} (mean of per-sample; token-weighted "
        f"{_fmt(report['gen_ppl_token_weighted'], '.3f')}, {report['scored_tokens']} tokens"
        f"{', %d samples unscored' % report['unscored_samples'] if report['unscored_samples'] else ''})",
        f"  entropy {_fmt(report['entropy'], '.3f')} nats, NFE {_fmt(report['nfe'], '.1f')}, "
        f"length {_fmt(report['num_tokens'], '.1f')} [{report['num_tokens_min']}, "
        f"{report['num_tokens_max']}], stops: {stops}",
        f"  {_fmt(report['tokens_per_second'], '.1f')} generated tokens/s "
        f"({_fmt(report['generation_seconds'], '.1f')} s on the slowest rank)",
    ])


def write_json(path: Path, results: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path: Path) -> Path:
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_likelihood(rows: list[dict[str, Any]], path: Path) -> Path:
    """Perplexity bound per dataset with its 95% interval (when K >= 2)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 2), 3.5))
    names = [r["name"] for r in rows]
    ppl = [r["ppl"] for r in rows]
    lower = [r["ppl"] - r["ppl_ci95"][0] if r["ppl_ci95"] else 0.0 for r in rows]
    upper = [r["ppl_ci95"][1] - r["ppl"] if r["ppl_ci95"] else 0.0 for r in rows]
    ax.errorbar(range(len(rows)), ppl, yerr=[lower, upper], fmt="o", capsize=4)
    ax.set_xticks(range(len(rows)), names, rotation=20, ha="right")
    ax.set_ylabel("perplexity bound (NELBO)")
    ax.set_title("NELBO perplexity, 95% interval over Monte-Carlo repeats")
    return _save(fig, ax, path)


def plot_generation(samples: list[dict[str, Any]], path: Path) -> Path:
    """Per-sample generative perplexity against unigram entropy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    points = [(s["entropy"], s["gen_ppl"]) for s in samples if s.get("gen_ppl") is not None]
    if points:
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=12)
    ax.set_xlabel("unigram entropy (nats)")
    ax.set_ylabel("generative perplexity")
    ax.set_yscale("log")
    ax.set_title(f"{len(points)} samples")
    return _save(fig, ax, path)


def plot_variance(rows: list[dict[str, Any]], path: Path) -> Path:
    """NELBO-estimate variance and gradient variance per clip range (log scale)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(rows) + 2), 3.5))
    labels = [f"U[{r['clip_range'][0]:g}, {r['clip_range'][1]:g}]" for r in rows]
    x = range(len(rows))
    ax.plot(x, [r["grad_variance"] for r in rows], "o-", label="gradient variance (eq. 10)")
    ax.plot(x, [r["loss_variance"] for r in rows], "s--", label="NELBO variance")
    ax.set_xticks(list(x), labels, rotation=20, ha="right")
    ax.set_yscale("log")
    ax.legend()
    return _save(fig, ax, path)


def log_wandb(results: dict[str, Any], *, mode: str, project: str, directory: Path) -> str:
    """Scalars of `results` to wandb (offline unless mode is online); returns what happened."""
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb

        run = wandb.init(project=project, mode=mode, dir=str(directory), job_type="eval",
                         config={"model": results.get("model"), "layout": results.get("layout")})
        scalars = {}
        for row in results.get("likelihood", []):
            for key in ("nll", "ppl", "se", "bpd"):
                if row.get(key) is not None:
                    scalars[f"eval/{row['name']}/{key}"] = row[key]
        generation = results.get("generation") or {}
        for key, value in generation.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                scalars[f"gen/{key}"] = value
        run.log(scalars)
        run.finish()
        return f"wandb ({mode}) run {run.id} in {directory}"
    except Exception as error:  # never fail an evaluation on logging
        return f"wandb disabled ({type(error).__name__}: {error})"
