"""The reproduction study (the README's `make reproduce`; docs/reproduction.md).

Trains the paper's model family on English Wikipedia at a scale two CPU cores afford, evaluates
every model with `bd3-eval`, and writes the report's JSON, tables and plots. Every step is one of
the framework's own tools, run the way a user runs it:

  tokenizer   bd3-train-tokenizer on the Wikipedia dump in gensim's test data
  data        bd3-prepare-data: article-level train / validation / test split, L = 128,
              BOS + L-2 tokens + EOS per sequence (the paper's LM1B packing)
  train_*     bd3-train (torchrun): AR, BD3 B = 4, 8, 16, MDLM, and BD3 B = 4 trained on the
              plain U[0,1] schedule (no clip search) for the schedule study; one config
              (configs/wiki_repro.yaml), the same network, seed, steps and tokens for all
  scorer      bd3-convert of the AR model to the standalone format (the generative-PPL scorer)
  eval_*      bd3-eval: NELBO perplexity with 95% intervals on validation, test and the Lee
              news corpus (zero-shot); gradient variance per clip range for the schedule
              study's models
  genL_*      bd3-eval: samples of L tokens scored by the AR model (entropy, NFE)
  gen2L_*     bd3-eval: samples of 2L tokens, the same
  report      reproduction.json, report.md (tables with the paper's numbers beside ours) and
              the plots, from the stages' own outputs

Stages are resumable: a finished stage leaves `stages/<name>.json` (command, seconds) and is not
redone; an interrupted training resumes from its newest intact checkpoint (`--resume auto`).
`--quick` runs every stage for a few steps on a tiny network (the test suite runs it).
Run from the checkout: `python -m tools.reproduce [--workdir runs/reproduce] [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tools.bench import common

CONFIG = "wiki_repro.yaml"


@dataclass(frozen=True)
class Model:
    """One trained model of the study: its name and the config overrides that make it."""

    name: str
    label: str
    overrides: tuple[str, ...]
    diffusion: bool = True
    block_size: int | None = None  # None: the whole sequence (MDLM) or AR
    variance: bool = False  # in the schedule study (gradient variance per clip range)


MODELS = (
    Model("ar", "AR", ("model.preset=ar", "model.block_size=null",
                        "validation.clip_search.enabled=false"), diffusion=False),
    Model("bd3_b4", "BD3-LM B=4", ("model.block_size=4",), block_size=4, variance=True),
    Model("bd3_b8", "BD3-LM B=8", ("model.block_size=8",), block_size=8),
    Model("bd3_b16", "BD3-LM B=16", ("model.block_size=16",), block_size=16, variance=True),
    Model("mdlm", "MDLM", ("model.preset=mdlm", "model.block_size=null",
                           "validation.clip_search.enabled=false"), variance=True),
    Model("bd3_b4_linear", "BD3-LM B=4, U[0,1] (no clip search)",
          ("model.block_size=4", "validation.clip_search.enabled=false"), block_size=4,
          variance=True),
)


@dataclass(frozen=True)
class Scale:
    """What differs between the full study and `--quick`."""

    train_iters: int
    global_batch: int
    micro_batch: int
    network: tuple[str, ...] = ()
    validation: tuple[str, ...] = ()
    nelbo_samples: int = 2
    eval_batch: int = 16
    num_samples: int = 64
    variance_minibatches: int = 8
    vocab_size: int = 4096


FULL = Scale(train_iters=200, global_batch=32, micro_batch=16)
QUICK = Scale(train_iters=4, global_batch=8, micro_batch=4,
              network=("model.num_layers=1", "model.hidden_size=32",
                       "model.num_attention_heads=2", "schedule.warmup_steps=2"),
              validation=("validation.interval=4", "validation.num_batches=1",
                          "validation.clip_search.num_batches=1", "checkpoint.interval=2"),
              num_samples=2, variance_minibatches=2, vocab_size=512)

# The paper's numbers (LM1B, L = 128, 65B tokens; docs/method.md §5 and §2.4) for the report.
PAPER_TEST_PPL = {"ar": 22.83, "bd3_b4": 28.23, "bd3_b8": 29.83, "bd3_b16": 30.60,
                  "mdlm": 31.78}
PAPER_TABLE2 = {  # B: {range: (PPL, Var. NELBO)}, LM1B fine-tunes per clip range
    4: {"U[0,0.5]": (29.23, 32.68), "U[0.3,0.8]": (29.37, 10.39), "U[0.5,1]": (29.16, 8.28),
        "U[0,1]": (29.23, 23.65)},
    16: {"U[0,0.5]": (31.27, 7.90), "U[0.3,0.8]": (31.19, 3.62), "U[0.5,1]": (31.29, 3.63),
         "U[0,1]": (31.33, 7.39)},
    128: {"U[0,0.5]": (31.72, 1.03), "U[0.3,0.8]": (31.78, 1.35), "U[0.5,1]": (31.92, 1.83),
          "U[0,1]": (31.78, 3.80)},
}
PAPER_GEN_PPL = {  # OWT, GPT2-Large scorer, 300 samples: (L=1024, L=2048) gen PPL
    "ar": (14.1, 13.2), "mdlm": (46.8, 41.3), "bd3_b16": (33.4, 31.5), "bd3_b8": (30.4, 28.2),
    "bd3_b4": (25.7, 23.6)}


@dataclass
class Study:
    workdir: Path
    scale: Scale
    nproc: int
    python: str = sys.executable
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.workdir / "data"

    @property
    def tokenizer(self) -> Path:
        return self.workdir / "tokenizer"

    def stage(self, name: str, command: list[str], *, distributed: bool = False,
              log: str | None = None) -> None:
        """Run one tool unless its stage already finished; record what ran and how long."""
        marker = self.workdir / "stages" / f"{name}.json"
        if marker.exists():
            self.timings[name] = json.loads(marker.read_text())["seconds"]
            print(f"[{name}] done before ({self.timings[name]:.0f} s), skipped", flush=True)
            return
        if distributed and self.nproc > 1:
            command = [self.python, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc-per-node={self.nproc}", *command]
        else:
            command = [self.python, *command]
        shown = " ".join(str(part) for part in command)
        print(f"[{name}] $ {shown}", flush=True)
        env = dict(os.environ)
        env.setdefault("WANDB_MODE", "offline")
        env.setdefault("DS_ACCELERATOR", "cpu")
        started = time.perf_counter()
        logfile = self.workdir / "logs" / f"{log or name}.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(logfile, "a") as out:
            result = subprocess.run([str(part) for part in command], env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            tail = "\n".join(logfile.read_text().splitlines()[-15:])
            raise SystemExit(f"reproduce: stage {name} failed (exit {result.returncode}); "
                             f"log {logfile}:\n{tail}")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"command": shown, "seconds": seconds}, indent=1))
        self.timings[name] = seconds
        print(f"[{name}] {seconds:.0f} s", flush=True)

    # ------------------------------------------------------------------------------ stages

    def prepare(self) -> None:
        self.stage("tokenizer", ["-m", "megatron_bd3.cli.train_tokenizer", "--input", "wikipedia",
                                 "--output", self.tokenizer, "--overwrite",
                                 "--vocab-size", str(self.scale.vocab_size), "-q"])
        self.stage("data", ["-m", "megatron_bd3.cli.prepare_data", "--input", "wikipedia",
                            "--tokenizer", self.tokenizer, "--output", self.data, "--overwrite",
                            "--seq-length", "128", "--insert-special", "--val-fraction", "0.1",
                            "--test-fraction", "0.1", "--no-progress", "-q"])

    def run_dir(self, model: Model) -> Path:
        return self.workdir / "runs" / model.name

    def train(self, model: Model) -> None:
        s = self.scale
        self.stage(f"train_{model.name}", [
            "-m", "megatron_bd3.cli.train", CONFIG,
            f"data.manifest={self.data / 'manifest.json'}", f"data.tokenizer={self.tokenizer}",
            f"logging.output_dir={self.workdir / 'runs'}", f"logging.run_name={model.name}",
            f"training.train_iters={s.train_iters}", f"training.global_batch_size={s.global_batch}",
            f"training.micro_batch_size={s.micro_batch}", *model.overrides, *s.network,
            *s.validation, "--resume", "auto"], distributed=True)

    def scorer(self) -> Path:
        path = self.workdir / "scorer"
        self.stage("scorer", ["-m", "megatron_bd3.cli.convert", "--checkpoint",
                              self.run_dir(MODELS[0]) / "checkpoints", "--to", "standalone",
                              "--output", path, "--overwrite"])
        return path

    def evaluate(self, model: Model, scorer: Path) -> None:
        s = self.scale
        command = ["-m", "megatron_bd3.cli.eval", self.run_dir(model) / "checkpoints",
                   "--data", f"validation={self.data}@validation",
                   "--data", f"test={self.data}@test", "--data", "lee=default",
                   "--text-mode", "line", "--nelbo-samples", str(s.nelbo_samples),
                   "--batch-size", str(s.eval_batch), "--output", self.eval_dir(model, "eval"),
                   "--no-progress"]
        if model.variance:
            command += ["--variance-sweep", "--variance-data", "validation",
                        "--variance-minibatches", str(s.variance_minibatches)]
        self.stage(f"eval_{model.name}", command, distributed=True)
        if model.diffusion:
            for kind, length in (("genL", 128), ("gen2L", 256)):
                self.stage(f"{kind}_{model.name}", [
                    "-m", "megatron_bd3.cli.eval", self.run_dir(model) / "checkpoints",
                    "--output", self.eval_dir(model, kind), "--no-progress",
                    *self._generation(scorer, length)], distributed=True)

    def _generation(self, scorer: Path, length: int) -> list[str]:
        n = self.scale.num_samples
        return ["--num-samples", str(n), "--sample-batch-size", str(n), "--length", str(length),
                "--top-p", "0.9", "--sample-seed", "1", "--scorer", str(scorer)]

    def eval_dir(self, model: Model, kind: str) -> Path:
        return self.workdir / "eval" / model.name / kind

    def run(self) -> Path:
        self.prepare()
        for model in MODELS:
            self.train(model)
            if model.name == "ar":
                scorer = self.scorer()
        for model in MODELS:
            self.evaluate(model, scorer)
        started = time.perf_counter()
        report = build_report(self)
        self.timings["report"] = time.perf_counter() - started
        return report


# ---------------------------------------------------------------------------------- report


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]


def _mean_and_se(values: list[float]) -> list[float] | None:
    """Mean and standard error over samples (None with fewer than two)."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return [mean, math.sqrt(variance / len(values))]


def collect(study: Study) -> dict:
    """Everything the report needs, from the stages' own outputs."""
    manifest = _read_json(study.data / "manifest.json")
    models = {}
    for model in MODELS:
        metrics = _metrics(study.run_dir(model))
        train = [m for m in metrics if "loss" in m]
        val = [m for m in metrics if "val_nll" in m]
        entry = {
            "label": model.label, "block_size": model.block_size,
            "overrides": list(model.overrides),
            "train_loss": [[m["step"], m["loss"]] for m in train],
            "val_nll": [[m["step"], m["val_nll"]] for m in val],
            "clip_range": next((m["clip"] for m in reversed(train) if "clip" in m), None),
        }
        evaluation = _read_json(study.eval_dir(model, "eval") / "eval.json")
        entry["likelihood"] = {r["name"]: {key: r[key] for key in (
            "nll", "se", "ppl", "ppl_ci95", "tokens", "sequences", "nelbo_samples")}
            for r in evaluation["likelihood"]}
        entry["learned_clip_range"] = evaluation["model"].get("clip_range")
        if "variance" in evaluation:
            entry["variance"] = [{key: r[key] for key in (
                "label", "learned", "loss", "loss_variance", "minibatch_loss_variance",
                "grad_variance", "grad_sq_norm", "minibatches", "batch_size")}
                for r in evaluation["variance"]]
        if model.diffusion:
            entry["generation"] = {}
            for kind, directory in (("L", "genL"), ("2L", "gen2L")):
                g = _read_json(study.eval_dir(model, directory) / "eval.json")["generation"]
                entry["generation"][kind] = {key: g[key] for key in (
                    "length", "num_samples", "gen_ppl", "gen_ppl_token_weighted", "entropy",
                    "nfe", "tokens_per_second")}
                entry["generation"][kind]["log_gen_ppl"] = _mean_and_se(
                    [math.log(x["gen_ppl"]) for x in g["samples"] if x["gen_ppl"]])
        models[model.name] = entry
    return {
        "scale": {"quick": study.scale is QUICK, **study.scale.__dict__},
        "config": CONFIG,
        "nproc": study.nproc,
        "data": {split: {k: info[k] for k in ("documents", "sequences", "tokens")}
                 for split, info in manifest["splits"].items()},
        "skipped": manifest.get("skipped", {}),
        "tokens_seen": study.scale.train_iters * study.scale.global_batch * 128,
        "models": models,
        "paper": {"test_ppl_lm1b": PAPER_TEST_PPL, "table2_lm1b": PAPER_TABLE2,
                  "gen_ppl_owt": PAPER_GEN_PPL},
        "machine": common.machine(),
        "versions": common.versions(),
        "seconds": dict(study.timings),
    }


def _interval(row: dict) -> str:
    if row.get("ppl_ci95") is None:
        return f"{row['ppl']:.1f}"
    low, high = row["ppl_ci95"]
    if high - low < 1e-9 * row["ppl"]:  # AR: the exact likelihood, no Monte-Carlo noise
        return f"{row['ppl']:.1f} (exact)"
    return f"{row['ppl']:.1f} [{low:.1f}, {high:.1f}]"


def _geometric(generation: dict) -> str:
    """Per-sample generative perplexities summarised on the log scale: exp(mean log PPL) with the
    95% interval exp(mean +- 1.96 SE) over samples."""
    if generation.get("log_gen_ppl") is None:
        return "n/a" if generation["gen_ppl"] is None else f"{generation['gen_ppl']:.1f}"
    mean, se = generation["log_gen_ppl"]
    return (f"{math.exp(mean):.0f} [{math.exp(mean - 1.96 * se):.0f}, "
            f"{math.exp(mean + 1.96 * se):.0f}]")


def render_tables(results: dict) -> str:
    models = results["models"]
    lines = ["### Perplexity (NELBO bound for the diffusion models; 95% intervals)", "",
             "| model | validation | test | Lee news (zero-shot) | paper, LM1B test |",
             "|---|---|---|---|---|"]
    for name, m in models.items():
        lk = m["likelihood"]
        paper = PAPER_TEST_PPL.get(name)
        lines.append(f"| {m['label']} | {_interval(lk['validation'])} | {_interval(lk['test'])} "
                     f"| {_interval(lk['lee'])} | {'≤' if name != 'ar' and paper else ''}"
                     f"{paper if paper else '–'} |")
    lines += ["", "### Generative perplexity under our AR model (top-p 0.9, first-hitting sampler; "
              "geometric mean over samples with its 95% interval)",
              "", "| model | L=128 gen PPL / entropy / NFE | 2L=256 gen PPL / entropy / NFE "
              "| paper, OWT L=1024 / 2048 (GPT2-Large) |", "|---|---|---|---|"]
    for name, m in models.items():
        if "generation" not in m:
            continue
        cells = []
        for kind in ("L", "2L"):
            g = m["generation"][kind]
            cells.append(f"{_geometric(g)} / {g['entropy']:.2f} / {g['nfe']:.0f}")
        paper = PAPER_GEN_PPL.get(name)
        lines.append(f"| {m['label']} | {cells[0]} | {cells[1]} | "
                     f"{f'{paper[0]} / {paper[1]}' if paper else '–'} |")
    lines += ["", "### Clipped schedules: NELBO variance and gradient variance per clip range",
              "", "| model | clip range | training loss | NELBO var | gradient var |",
              "|---|---|---|---|---|"]
    for m in models.values():
        for r in m.get("variance", []):
            star = " (learned)" if r["learned"] else ""
            lines.append(f"| {m['label']} | {r['label']}{star} | {r['loss']:.3f} | "
                         f"{r['loss_variance']:.3g} | {r['grad_variance']:.3g} |")
    lines += ["", "### Wall time per stage (seconds)", "", "| stage | seconds |", "|---|---|"]
    for stage, seconds in results["seconds"].items():
        lines.append(f"| {stage} | {seconds:.0f} |")
    lines.append(f"| total | {sum(results['seconds'].values()):.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, directory: Path) -> list[Path]:
    """Loss curves and perplexity by model with intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in results["models"].values():
        steps, losses = zip(*m["train_loss"], strict=True) if m["train_loss"] else ((), ())
        ax.plot(steps, losses, label=m["label"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token; NELBO for diffusion)")
    ax.set_title("training loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(directory / "loss_curves.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(results["models"])
    datasets = ("validation", "test", "lee")
    width = 0.8 / len(datasets)
    for j, dataset in enumerate(datasets):
        xs, ys, errs = [], [], [[], []]
        for i, name in enumerate(names):
            row = results["models"][name]["likelihood"][dataset]
            xs.append(i + (j - 1) * width)
            ys.append(row["ppl"])
            low, high = row["ppl_ci95"] or (row["ppl"], row["ppl"])
            errs[0].append(row["ppl"] - low)
            errs[1].append(high - row["ppl"])
        ax.bar(xs, ys, width=width, yerr=errs, capsize=3, label=dataset)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([results["models"][n]["label"].replace(", ", ",\n") for n in names],
                       fontsize=7)
    ax.set_ylabel("perplexity (bound), 95% interval")
    ax.set_title("perplexity by model")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    paths.append(directory / "perplexity.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def build_report(study: Study) -> Path:
    """Write reproduction.json, report.md and the plots into <workdir>/report."""
    directory = study.workdir / "report"
    directory.mkdir(parents=True, exist_ok=True)
    results = collect(study)
    (directory / "reproduction.json").write_text(json.dumps(results, indent=1) + "\n")
    plots = plot(results, directory)
    machine, versions = results["machine"], results["versions"]
    header = [
        "## Results of this run", "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; "
        + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        f"{results['nproc']} training processes; {results['tokens_seen']} tokens seen per model "
        f"({results['scale']['train_iters']} steps x {results['scale']['global_batch']} x 128).",
        "", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    report = directory / "report.md"
    report.write_text("\n".join(header) + "\n" + render_tables(results))
    print(f"reproduce: wrote {report}, {directory / 'reproduction.json'}", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None,
                        help="where everything is written (default runs/reproduce, or "
                             "runs/reproduce-quick with --quick); rerun to resume")
    parser.add_argument("--quick", action="store_true",
                        help="every stage for a few steps on a tiny network")
    parser.add_argument("--nproc", type=int, default=2, help="processes per training/eval")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or ("runs/reproduce-quick" if args.quick else "runs/reproduce"))
    study = Study(workdir.resolve(), QUICK if args.quick else FULL, args.nproc)
    started = time.perf_counter()
    report = study.run()
    print(f"reproduce: finished in {time.perf_counter() - started:.0f} s; report {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
