"""bd3-eval: measure a BD3-LM the way the paper does, in any layout.

    bd3-eval runs/demo --data runs/data                       # NELBO bound on the validation split
    bd3-eval runs/demo --data val=runs/data@validation --data lee=corpus.txt --nelbo-samples 8
    torchrun --nproc-per-node 2 -m megatron_bd3.cli.eval CKPT --data runs/data \\
        --tensor-model-parallel-size 2                        # any TP/PP/DP layout, same numbers
    BD3_COMMAND=eval launch/torchrun.sh CKPT --data runs/data  # or launch/deepspeed.sh, slurm
    bd3-eval MODEL --num-samples 64 --scorer runs/ar-model    # generative perplexity
    bd3-eval CKPT --data runs/data --grad-variance            # gradient variance per clip range

MODEL is a trainer checkpoint (a step directory, a checkpoint root or a run directory; EMA weights
unless --raw-weights) or a standalone model directory. Results: a table on stdout,
`<output>/eval.json` and PNG plots next to it, optionally wandb (--wandb, offline by default).
Bad input is one line naming what is wrong, exit code 2, on every rank. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_bd3.lifetime import (
    children_exit_with_this_process,
    exit_with_parent,
    launched_by_agent,
)


def build_parser() -> argparse.ArgumentParser:
    from megatron_bd3.data.sources import SourceOptions

    parser = argparse.ArgumentParser(prog="bd3-eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="trainer checkpoint or standalone directory")
    parser.add_argument("--raw-weights", action="store_true",
                        help="checkpoints: the raw training weights instead of the EMA weights")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer (default: the model's; must have its fingerprint)")
    parser.add_argument("--output", type=Path, default=Path("runs/eval"),
                        help="directory for eval.json and the plots (default runs/eval)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--wandb", choices=("disabled", "offline", "online"), default="disabled",
                        help="also log to wandb (offline writes a local run to sync later)")
    parser.add_argument("--wandb-project", default="megatron_bd3")
    # the deepspeed launcher passes --local_rank; the rank comes from the environment anyway
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)

    layout = parser.add_argument_group("layout (DP = world size / (TP x PP x CP))")
    layout.add_argument("--tensor-model-parallel-size", type=int, default=1)
    layout.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    layout.add_argument("--context-parallel-size", type=int, default=1,
                        help="context parallelism of the likelihood pass (docs/training.md §4)")

    nelbo = parser.add_argument_group("likelihood (NELBO perplexity bound)")
    nelbo.add_argument("--data", action="append", default=[], metavar="[NAME=]PATH[@SPLIT]",
                       help="a bd3-prepare-data directory or manifest (split default validation), "
                            "or raw text/jsonl/parquet files (globs) wrapped to the model's L; "
                            "repeat for several datasets")
    nelbo.add_argument("--nelbo-samples", type=int, default=4, metavar="K",
                       help="Monte-Carlo repeats over t and masks (K >= 2 gives an interval)")
    nelbo.add_argument("--batch-size", type=int, default=8,
                       help="global evaluation batch G: t is stratified over it (default 8)")
    nelbo.add_argument("--micro-batch-size", type=int, default=None,
                       help="sequences per forward pass (default G / DP)")
    nelbo.add_argument("--seed", type=int, default=1)
    bos = nelbo.add_mutually_exclusive_group()
    bos.add_argument("--ignore-bos", dest="ignore_bos", action="store_true", default=None,
                     help="never mask or count position 0 (default: as the run trained)")
    bos.add_argument("--no-ignore-bos", dest="ignore_bos", action="store_false")
    variance = parser.add_argument_group(
        "gradient variance (paper eq. 10, docs/method.md §2.4) over minibatches of --batch-size "
        "sequences of one --data set")
    variance.add_argument("--grad-variance", action="store_true",
                          help="measure it at the model's learned clip range (or --clip-ranges)")
    variance.add_argument("--clip-ranges", nargs="+", default=None, metavar="LOW,HIGH",
                          help="clip ranges to measure, e.g. 0.3,0.8 0.5,1 (a lower bound 0 is "
                               "taken as 1e-3); implies --grad-variance")
    variance.add_argument("--variance-sweep", action="store_true",
                          help="paper Table 2: U[0,1], U[0,0.5], U[0.3,0.8], U[0.5,1] and the "
                               "learned range; implies --grad-variance")
    variance.add_argument("--variance-minibatches", type=int, default=16, metavar="M",
                          help="minibatches M (default 16; M x --batch-size sequences are read)")
    variance.add_argument("--variance-data", default=None, metavar="NAME",
                          help="which --data set (default the first)")
    SourceOptions.add_arguments(parser.add_argument_group("raw input files"))
    from megatron_bd3.cli.sample import add_sampling_arguments

    generation = parser.add_argument_group(
        "generation quality (the standalone sampler; every bd3-sample setting)")
    add_sampling_arguments(generation, batch_size_flag="--sample-batch-size",
                           seed_flag="--sample-seed")
    parser.set_defaults(num_samples=0)  # no sampling unless --num-samples N
    generation.add_argument("--scorer", type=Path, default=None, metavar="DIR",
                            help="generative perplexity under this AR model: a standalone "
                                 "directory of ours (preset ar) or a local Hugging Face "
                                 "causal-LM directory (needs the [eval] extra); never downloaded")
    return parser


class _Refuse:
    """What bd3-sample's argument helpers call on bad values: one line, exit 2 (EvalInputError)."""

    prog = "bd3-eval"

    @staticmethod
    def error(message: str):
        from megatron_bd3.evaluation.source import EvalInputError

        raise EvalInputError(message)


def _fail(message: str) -> int:
    print(f"bd3-eval: {message}", file=sys.stderr, flush=True)
    return 2


def _quiet() -> None:
    import logging
    import warnings

    for message in (".*Transformer Engine and Apex are not installed.*",
                    ".*Apex is not installed.*", ".*tp_group is None.*",
                    ".*deprecating ShardedTensor.*", ".*`load_state_dict` is deprecated.*",
                    ".*full scope is deprecated.*"):
        warnings.filterwarnings("ignore", message=message)
    for noisy in ("megatron", "DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _check_layout(args, source) -> None:
    from megatron_bd3.evaluation.source import EvalInputError

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    cp = args.context_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or pp < 1 or cp < 1 or world % (tp * pp * cp):
        raise EvalInputError(
            f"world size {world} is not divisible by TP x PP x CP = {tp} x {pp} x {cp}")
    if source.kind == "standalone" and tp * pp * cp > 1:
        raise EvalInputError(
            f"{source.path} is a standalone directory, evaluated data parallel only; for TP/PP "
            "> 1 evaluate a trainer checkpoint (bd3-convert --standalone DIR --to checkpoint "
            "makes one)")
    if source.kind == "checkpoint":
        m = source.run_config.model
        for name, value, size in (("num_layers", m.num_layers, pp),
                                  ("num_attention_heads", m.num_attention_heads, tp),
                                  ("num_query_groups", m.num_query_groups or 0, tp)):
            if value % size:
                raise EvalInputError(f"the layout does not divide the model: {name} {value} is "
                                     f"not a multiple of {'PP' if size == pp else 'TP'} {size}")


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run everything `args` asks for; returns the results (the same on every rank)."""
    from megatron_bd3.data.sources import SourceOptions
    from megatron_bd3.evaluation.data import open_dataset
    from megatron_bd3.evaluation.likelihood import check_batching, evaluate_likelihood
    from megatron_bd3.evaluation.loss_model import StandaloneLossModel, megatron_loss_model
    from megatron_bd3.evaluation.source import EvalInputError, open_source
    from megatron_bd3.parallel import ParallelConfig, initialize_parallel
    from megatron_bd3.training.batches import NoiseSettings
    from megatron_bd3.training.optimizer import detect_machine, resolve_precision

    if not args.data and args.num_samples < 1:
        raise EvalInputError("nothing to evaluate: give --data (likelihood, --grad-variance) "
                             "or --num-samples N (generation)")
    source = open_source(args.model, raw_weights=args.raw_weights, tokenizer=args.tokenizer,
                         ignore_bos=args.ignore_bos)
    _check_layout(args, source)
    try:
        options = SourceOptions.from_arguments(args)
    except ValueError as error:
        raise EvalInputError(str(error)) from None
    datasets = [open_dataset(text, seq_length=source.seq_length, tokenizer=source.tokenizer,
                             tokenizer_fingerprint=source.tokenizer_fingerprint,
                             source_options=options, document_ids=source.document_mask)
                for text in args.data]
    from megatron_bd3.evaluation.variance import requested_clip_ranges

    variance_ranges = requested_clip_ranges(args, source)  # refused here, before any work
    # the torch-only network, before any process group (a checkpoint converts in-process)
    generating = args.num_samples > 0
    if args.context_parallel_size > 1 and (generating or variance_ranges):
        raise EvalInputError(
            f"--context-parallel-size {args.context_parallel_size} serves the likelihood only; "
            "generation and the gradient variance run with --context-parallel-size 1")
    network = (source.standalone_network()
               if source.kind == "standalone" or generating else None)
    sampling = scorer = None
    if generating:
        from megatron_bd3.cli.sample import sampling_from_args
        from megatron_bd3.evaluation.scorers import ScorerError, load_scorer

        sample_args = argparse.Namespace(**{**vars(args), "batch_size": args.sample_batch_size,
                                            "seed": args.sample_seed})
        sampling = sampling_from_args(_Refuse, sample_args, network, source.tokenizer)
        if args.scorer is not None:
            try:
                scorer = load_scorer(args.scorer)
            except ScorerError as error:
                raise EvalInputError(str(error)) from None

    info = initialize_parallel(ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size, seed=args.seed))
    rank0 = info.rank == 0
    micro = args.micro_batch_size or max(1, args.batch_size // info.dp_size)
    check_batching(args.batch_size, micro, info.dp_size)
    results: dict[str, Any] = {
        "model": source.record(),
        "layout": {"world_size": info.world_size, "tp": info.tp_size, "pp": info.pp_size,
                   "cp": info.cp_size, "dp": info.dp_size},
        "likelihood": [],
    }
    if rank0:
        print(f"bd3-eval: {source.describe()}; layout TP {info.tp_size} x PP {info.pp_size} x "
              f"DP {info.dp_size}", file=sys.stderr, flush=True)
    if datasets:
        if source.kind == "standalone":
            loss_model, noise = StandaloneLossModel(network), None
        else:
            machine = detect_machine()
            loss_model, model_config = megatron_loss_model(
                source, info, device_type=machine.device_type,
                precision=resolve_precision(source.run_config, machine))
            noise = NoiseSettings.from_model_config(model_config)
        if noise is None:  # standalone: the forward-process settings of its block size
            noise = NoiseSettings(block_size=source.block_size, mask_token_id=source.mask_token_id,
                                  schedule="loglinear", ignore_bos=source.ignore_bos,
                                  resample=False, antithetic=True,
                                  fixed_t=1.0 if source.preset == "ar" else None)
        for dataset in datasets:
            start = time.perf_counter()
            row = evaluate_likelihood(
                loss_model, dataset, noise=noise, ignore_bos=source.ignore_bos,
                global_batch_size=args.batch_size, micro_batch_size=micro,
                samples=args.nelbo_samples, seed=args.seed, dp_rank=info.dp_rank,
                dp_size=info.dp_size, progress=rank0 and not args.no_progress)
            row["seconds"] = time.perf_counter() - start
            row["tokens_per_s"] = (row["tokens"] * args.nelbo_samples) / max(row["seconds"], 1e-9)
            results["likelihood"].append(row)
        if variance_ranges:
            from megatron_bd3.evaluation.variance import variance_for_cli

            results["variance"] = variance_for_cli(
                args, source, loss_model, noise, datasets, variance_ranges, info,
                progress=rank0 and not args.no_progress)
    if generating:
        results["generation"] = _generate(args, source, network, sampling, scorer, info)
    return results


def _generate(args, source, network, sampling, scorer, info) -> dict[str, Any] | None:
    """Samples sharded over every rank (exactly once), gathered; scored on rank 0."""
    from megatron_bd3.evaluation.generation import (
        gather_samples,
        generate_samples,
        generation_report,
    )

    sampler_config, length, prompt = sampling
    progress = info.rank == 0 and not args.no_progress
    records = generate_samples(
        network, source.tokenizer, sampler_config, num_samples=args.num_samples,
        seed=args.sample_seed, rank=info.rank, world_size=info.world_size, length=length,
        prompts=[prompt] if prompt else None, batch_size=args.sample_batch_size,
        progress=progress)
    samples = gather_samples(records, args.num_samples)
    if info.rank != 0:
        return None
    report = generation_report(samples, scorer, max_length=length, progress=progress)
    report["length"] = length
    report["sampler"] = {"sampler": sampler_config.sampler, "top_p": sampler_config.top_p,
                         "block_size": sampler_config.block_size or source.block_size,
                         "steps": sampler_config.steps}
    return report


def report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Rank 0: table, JSON, plots, wandb."""
    from megatron_bd3.evaluation import report as rep

    out = args.output
    if results["likelihood"]:
        print(rep.likelihood_table(results["likelihood"]), flush=True)
    if results.get("variance"):
        print(rep.variance_table(results["variance"]), flush=True)
    if results.get("generation"):
        print(rep.generation_table(results["generation"]), flush=True)
    path = rep.write_json(out / "eval.json", results)
    written = [str(path)]
    if not args.no_plots and results["likelihood"]:
        written.append(str(rep.plot_likelihood(results["likelihood"], out / "likelihood.png")))
    if not args.no_plots and results.get("generation"):
        written.append(str(rep.plot_generation(results["generation"]["samples"],
                                               out / "generation.png")))
    if not args.no_plots and results.get("variance"):
        written.append(str(rep.plot_variance(results["variance"], out / "variance.png")))
    print(f"bd3-eval: wrote {', '.join(written)}", file=sys.stderr, flush=True)
    if args.wandb != "disabled":
        logged = rep.log_wandb(results, mode=args.wandb, project=args.wandb_project,
                               directory=out)
        print(f"bd3-eval: {logged}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    children_exit_with_this_process()  # no orphan outlives this process (megatron_bd3.lifetime)
    if launched_by_agent():  # the rank ends with its launcher
        exit_with_parent(f"bd3-eval: rank {os.environ.get('RANK', '?')}: its launcher (pid "
                         "{parent_pid}) is gone; stopping")
    args = build_parser().parse_args(argv)
    _quiet()
    from megatron_bd3.checkpoint import CheckpointError
    from megatron_bd3.evaluation.source import EvalInputError
    from megatron_bd3.parallel import destroy_parallel, parallel_info

    try:
        results = evaluate(args)
        if int(os.environ.get("RANK", "0")) == 0:
            report(args, results)
    except (EvalInputError, CheckpointError) as error:
        return _fail(str(error))
    finally:
        if parallel_info() is not None:
            destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
elif __name__ == "__mp_main__":
    # This module re-imported as the main module of a multiprocessing child started with
    # "spawn" (megatron's checkpoint writer starts its Manager so): it ends with its rank.
    exit_with_parent()
