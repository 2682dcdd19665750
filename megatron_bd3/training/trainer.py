"""The training loop: `train(config) -> summary`.

Start-up order: refuse impossible combinations (before any process group exists where possible)
-> parallel runtime -> data manifest (vocabulary, [MASK] id, L) -> model chunks for this rank's
pipeline stage(s) -> optional init_from weights (resharded) -> optimizer (DeepSpeed engine or
megatron) -> EMA -> resume. Per step: pull the micro-batches of this data-parallel rank, noise
them (keyed by seed, step and global-batch position), forward/backward through megatron's
forward_backward_func, optimizer step at lr(step), EMA update, log, validate/clip-search and
checkpoint when due.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_bd3.parallel.runtime import all_reduce_host
from megatron_bd3.training.config import RunConfig, dump_config
from megatron_bd3.training.profiling import StepProfiler

logger = logging.getLogger("megatron_bd3.train")


@dataclass
class Layout:
    rank: int
    world_size: int
    tp_rank: int
    tp: int
    pp_rank: int
    pp: int
    vpp: int | None
    dp_rank: int
    dp: int

    @property
    def contributes(self) -> bool:
        """This rank's loss reports count once: last pipeline stage, TP rank 0."""
        return self.pp_rank == self.pp - 1 and self.tp_rank == 0


def _find_path(text: str | None, config: RunConfig) -> Path | None:
    """A path the run config names, resolved by megatron_bd3.paths.resolve_path: cwd-relative;
    only `deepspeed.config` may fall back to a shipped JSON by name."""
    from megatron_bd3.paths import resolve_path

    if text is None:
        return None
    named = {config.deepspeed.config: "deepspeed.config", config.data.tokenizer: "data.tokenizer"}
    return resolve_path(text, named.get(text, "data.manifest"))


def _setup_python_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "megatron"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:
        pass


def build_model_config(config: RunConfig, *, vocab_size: int, mask_token_id: int, precision: str):
    """The BD3Config of this run (model section + parallel sizes + CPU-safe settings)."""
    from megatron_bd3.model import ar_config, bd3_config, mdlm_config, reference_architecture
    from megatron_bd3.parallel import cpu_safe_config_overrides

    m, p, t = config.model, config.parallel, config.training
    overrides: dict[str, Any] = {}
    if m.architecture == "reference":
        overrides.update(reference_architecture(dropout=m.dropout))
    else:
        overrides.update(hidden_dropout=m.dropout, attention_dropout=0.0)
    overrides.update(cpu_safe_config_overrides())
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    overrides.update(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        bf16=precision == "bf16",
        params_dtype=dtype,
        pipeline_dtype=dtype,
        attention_kernel=m.attention_kernel,
        noise_schedule=t.noise_schedule,
        clip_min=t.clip_eps_min,
        clip_max=t.clip_eps_max,
        ignore_bos=t.ignore_bos,
    )
    if m.ffn_hidden_size is not None:
        overrides["ffn_hidden_size"] = m.ffn_hidden_size
    if m.num_query_groups is not None:
        overrides["num_query_groups"] = m.num_query_groups
    if m.recompute == "full":
        overrides.update(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    elif m.recompute == "selective":
        overrides.update(recompute_granularity="selective")
    overrides.update(m.extra)
    common = dict(
        seq_length=m.seq_length,
        vocab_size=vocab_size,
        mask_token_id=mask_token_id,
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
    )
    try:
        if m.preset == "ar":
            return ar_config(**common, **overrides)
        if m.preset == "mdlm":
            return mdlm_config(**common, **overrides)
        return bd3_config(block_size=m.effective_block_size, **common, **overrides)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{config.source}: model section: {exc}") from exc


def model_identity(config: RunConfig, model_config, tokenizer_fingerprint: str) -> dict[str, Any]:
    m = config.model
    return {
        "preset": m.preset,
        "architecture": m.architecture,
        "num_layers": model_config.num_layers,
        "hidden_size": model_config.hidden_size,
        "num_attention_heads": model_config.num_attention_heads,
        "num_query_groups": model_config.num_query_groups,
        "ffn_hidden_size": model_config.ffn_hidden_size,
        "vocab_size": model_config.vocab_size,
        "mask_token_id": model_config.mask_token_id,
        "seq_length": model_config.seq_length,
        "block_size": model_config.block_size,
        "tokenizer_fingerprint": tokenizer_fingerprint,
    }


def _named_parameters(chunks: list[torch.nn.Module]):
    for index, chunk in enumerate(chunks):
        prefix = f"chunk{index}." if len(chunks) > 1 else ""
        for name, param in chunk.named_parameters():
            yield prefix + name, param


class Trainer:
    """Holds the state of one run; `run()` trains to `training.train_iters`."""

    def __init__(self, config: RunConfig, *, stop_after: int | None = None) -> None:
        self.config = config
        self.stop_after = stop_after  # stop (with a checkpoint) after this many steps this run
        self._owns_parallel = False

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        from megatron_bd3.data import load_manifest
        from megatron_bd3.diffusion import ClipRange
        from megatron_bd3.parallel import ParallelConfig, initialize_parallel, parallel_info
        from megatron_bd3.training.deepspeed_engine import load_deepspeed_json
        from megatron_bd3.training.optimizer import (
            check_combination,
            detect_machine,
            resolve_device,
            resolve_precision,
        )

        cfg = self.config
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.machine = detect_machine()
        self.device_type = resolve_device(cfg, self.machine)
        self.precision = resolve_precision(cfg, self.machine)
        self.ds_json = None
        self.ds_path = None
        if cfg.optimizer.backend == "deepspeed" and cfg.deepspeed.config:
            self.ds_path = _find_path(cfg.deepspeed.config, cfg)
            self.ds_json = load_deepspeed_json(self.ds_path)
        check_combination(cfg, self.machine, self.ds_json, world)

        info = parallel_info()
        if info is None:
            p = cfg.parallel
            info = initialize_parallel(
                ParallelConfig(
                    tensor_model_parallel_size=p.tensor_model_parallel_size,
                    pipeline_model_parallel_size=p.pipeline_model_parallel_size,
                    virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
                    sequence_parallel=p.sequence_parallel,
                    seed=cfg.training.seed,
                )
            )
            self._owns_parallel = True
        self.info = info
        self.layout = Layout(
            info.rank,
            info.world_size,
            info.tp_rank,
            info.tp_size,
            info.pp_rank,
            info.pp_size,
            info.vpp_size,
            info.dp_rank,
            info.dp_size,
        )
        _setup_python_logging(info.rank)
        t = cfg.training
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * info.dp_size)

        # data: vocabulary and [MASK] id come from the manifest the shards were written with
        self.manifest_path = _find_path(cfg.data.manifest, cfg)
        manifest = load_manifest(self.manifest_path)
        tok = manifest.tokenizer
        self.manifest_tokenizer = tok
        self.tokenizer_fingerprint = str(tok.get("fingerprint"))
        expected_fp = None
        if cfg.data.tokenizer:
            from megatron_bd3.data import load_tokenizer

            expected_fp = load_tokenizer(_find_path(cfg.data.tokenizer, cfg)).fingerprint()
        self.vocab_size = int(tok["vocab_size"])
        self.mask_token_id = int(tok["special_ids"]["mask_id"])
        self.model_config = build_model_config(
            cfg,
            vocab_size=self.vocab_size,
            mask_token_id=self.mask_token_id,
            precision=self.precision,
        )
        self._build_loaders(expected_fp)

        # model chunks of this rank, optional warm start, optimizer, EMA
        self.chunks = self._build_chunks()
        self.identity = model_identity(cfg, self.model_config, self.tokenizer_fingerprint)
        self._check_resume()
        if cfg.checkpoint.init_from and self.resume_dir is None:
            self._init_from(cfg.checkpoint.init_from)
        self.stepper = self._build_optimizer()
        self.ema = None
        if t.ema_decay > 0:
            from megatron_bd3.training.ema import ExponentialMovingAverage

            self.ema = ExponentialMovingAverage(
                _named_parameters(self.stepper.chunks), decay=t.ema_decay
            )

        from megatron_bd3.training.batches import NoiseSettings

        self.noise = NoiseSettings(
            block_size=self.model_config.block_size,
            mask_token_id=self.mask_token_id,
            schedule=t.noise_schedule,
            ignore_bos=t.ignore_bos,
            resample=t.resample,
            antithetic=t.antithetic_sampling,
            fixed_t=self.model_config.fixed_t,
        )
        self.clip_range = ClipRange(t.clip_eps_min, t.clip_eps_max)
        self.step = 0
        self.last_val: dict[str, Any] = {}
        self._pending_rng = None
        self._resume()
        self._setup_metrics()

    def _build_loaders(self, expected_fp: str | None) -> None:
        from megatron_bd3.data import BD3DataLoader

        cfg, info = self.config, self.info
        common = dict(
            dp_rank=info.dp_rank,
            dp_size=info.dp_size,
            expected_tokenizer_fingerprint=expected_fp,
            expected_seq_length=cfg.model.seq_length,
            num_workers=cfg.data.num_workers,
        )
        self.train_loader = BD3DataLoader(
            self.manifest_path,
            cfg.data.train_split,
            cfg.training.micro_batch_size,
            seed=cfg.training.seed,
            num_microbatches=self.num_microbatches,
            **common,
        )
        self.valid_loader = None
        v = cfg.validation
        if v.interval > 0 or v.at_end:
            self.valid_loader = BD3DataLoader(
                self.manifest_path,
                cfg.data.valid_split,
                v.micro_batch_size or cfg.training.micro_batch_size,
                seed=v.seed,
                # the interleaved pipeline schedule needs at least PP micro-batches per call
                num_microbatches=cfg.parallel.pipeline_model_parallel_size,
                max_epochs=1,
                **common,
            )

    def _build_chunks(self) -> list[torch.nn.Module]:
        from megatron_bd3.model import build_bd3_model

        vpp = self.config.parallel.virtual_pipeline_model_parallel_size
        if vpp:
            chunks = [build_bd3_model(self.model_config, vp_stage=i) for i in range(vpp)]
        else:
            chunks = [build_bd3_model(self.model_config)]
        if self.device_type == "cuda":
            chunks = [c.cuda() for c in chunks]
        return chunks

    def _record(self) -> dict[str, Any]:
        layout = self.layout
        return {
            "layout": {
                "tp": layout.tp,
                "pp": layout.pp,
                "vpp": layout.vpp,
                "dp": layout.dp,
                "optimizer_backend": self.config.optimizer.backend,
                "zero_stage": self._zero_stage(),
            },
            "model": self.identity,
            "config": self.config.to_dict(),
            "world_size": layout.world_size,
        }

    def _zero_stage(self) -> int | None:
        if self.config.optimizer.backend != "deepspeed" or self.ds_json is None:
            return None
        from megatron_bd3.training.deepspeed_engine import zero_stage

        return zero_stage(self.ds_json)

    def _check_resume(self) -> None:
        """Find the checkpoint to resume from and refuse a mismatch before building anything."""
        from megatron_bd3.checkpoint import resolve_resume
        from megatron_bd3.checkpoint.manager import check_resumable

        self.resume_dir = resolve_resume(self.config.checkpoint_dir, self.config.checkpoint.resume)
        self.resume_marker = None
        if self.resume_dir is not None:
            self.resume_marker = check_resumable(self.resume_dir, self._record())

    def _init_from(self, source: str) -> None:
        from megatron_bd3.checkpoint import load_model_weights, resolve_resume

        directory = resolve_resume(Path(source), source) or Path(source)
        marker = load_model_weights(
            directory,
            self.chunks,
            use_ema=self.config.checkpoint.init_from_ema,
            record={"model": self.identity},
        )
        self._log0(
            f"initialised weights from {directory} (step {marker.get('step')}, "
            f"{'EMA' if self.config.checkpoint.init_from_ema else 'raw'} weights)"
        )

    def _build_optimizer(self):
        cfg = self.config
        if cfg.optimizer.backend == "megatron":
            from megatron_bd3.training.megatron_optimizer import build_megatron_optimizer

            return build_megatron_optimizer(self.chunks, cfg, self.model_config, self.precision)
        from megatron_bd3.training.deepspeed_engine import (
            build_deepspeed_engine,
            resolve_deepspeed_config,
        )
        from megatron_bd3.training.optimizer import resolve_torch_adam

        o, t = cfg.optimizer, cfg.training
        self.ds_config = resolve_deepspeed_config(
            self.ds_json,
            micro_batch_size=t.micro_batch_size,
            gradient_accumulation_steps=self.num_microbatches,
            data_parallel_size=self.info.dp_size,
            lr=o.lr,
            betas=(o.betas[0], o.betas[1]),
            eps=o.eps,
            weight_decay=o.weight_decay,
            clip_grad=o.clip_grad,
            precision=self.precision,
            torch_adam=resolve_torch_adam(cfg, self.machine),
            overrides=cfg.deepspeed.overrides,
            source=str(self.ds_path),
            device=self.device_type,
        )
        return build_deepspeed_engine(
            self.chunks, self.ds_config, pipeline_parallel_size=self.layout.pp
        )

    def _resume(self) -> None:
        from megatron_bd3.checkpoint import load_training_state
        from megatron_bd3.diffusion import ClipRange

        directory = self.resume_dir
        if directory is None:
            return
        state = load_training_state(
            directory,
            stepper=self.stepper,
            chunks=self.stepper.chunks,
            ema=self.ema,
            record=self._record(),
            restore_rng=False,
            marker=self.resume_marker,
        )
        self._pending_rng = state.pop("rng")
        self.step = int(state["step"])
        self.clip_range = ClipRange(*state["clip_range"])
        self.train_loader.load_state_dict(state["loader"])
        self.last_val = state.get("last_val", {})
        self._log0(
            f"resumed from {directory} at step {self.step} "
            f"(clip range [{self.clip_range.eps_min}, {self.clip_range.eps_max}])"
        )

    def _setup_metrics(self) -> None:
        from megatron_bd3.training.flops import default_peak_flops, training_flops_per_sequence
        from megatron_bd3.training.logging import MetricsLogger

        cfg, mc = self.config, self.model_config
        self.flops_per_step = cfg.training.global_batch_size * training_flops_per_sequence(
            preset=cfg.model.preset if cfg.model.preset != "ar" else "bd3",
            num_layers=mc.num_layers,
            hidden_size=mc.hidden_size,
            ffn_hidden_size=mc.ffn_hidden_size,
            num_attention_heads=mc.num_attention_heads,
            num_query_groups=mc.num_query_groups,
            seq_length=mc.seq_length,
            block_size=mc.block_size,
            vocab_size=mc.vocab_size,
        )
        if cfg.logging.peak_flops_per_device:
            self.peak_flops, how = (
                cfg.logging.peak_flops_per_device,
                "logging.peak_flops_per_device",
            )
        else:
            self.peak_flops, how = default_peak_flops(self.device_type, self.precision)
        self.metrics = MetricsLogger(
            rank=self.layout.rank,
            run_dir=cfg.run_dir,
            run_name=cfg.logging.run_name,
            total_steps=cfg.training.train_iters,
            start_step=self.step,
            show_tqdm=cfg.logging.tqdm,
            wandb_mode=cfg.logging.wandb.mode,
            wandb_project=cfg.logging.wandb.project,
            wandb_entity=cfg.logging.wandb.entity,
            config_dict=cfg.to_dict(),
        )
        self.profiler = StepProfiler(cfg.logging.profile_steps, cfg.run_dir / "profile",
                                     self.layout.rank, self.device_type)
        if self.layout.rank == 0:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            (cfg.run_dir / "config.yaml").write_text(dump_config(cfg))
        n_params = sum(p.numel() for c in self.stepper.chunks for p in c.parameters())
        lay = self.layout
        self._log0(
            f"run {cfg.logging.run_name}: world {lay.world_size} = TP {lay.tp} x PP {lay.pp} x "
            f"DP {lay.dp}{f' (VPP {lay.vpp})' if lay.vpp else ''}; {self.device_type} "
            f"{self.precision}; optimizer {cfg.optimizer.backend}"
            f"{f' ZeRO-{self.stepper.zero_stage}' if cfg.optimizer.backend == 'deepspeed' else ''};"
            f" {n_params:,} parameters on rank 0; global batch {cfg.training.global_batch_size} = "
            f"micro {cfg.training.micro_batch_size} x {self.num_microbatches} micro-batches x DP "
            f"{lay.dp}; L {mc.seq_length}, B {mc.block_size}, vocab {mc.vocab_size}; "
            f"{self.flops_per_step / cfg.training.global_batch_size:.3g} FLOPs/sequence; peak "
            f"{self.peak_flops:.3g} FLOP/s per device ({how})"
        )

    def _log0(self, message: str) -> None:
        if self.layout.rank == 0:
            logger.info(message)

    # ------------------------------------------------------------------ loop
    def _microbatches(self, iterator) -> list[dict[str, Any]]:
        from megatron_bd3.training.batches import make_batch

        out = []
        for _ in range(self.num_microbatches):
            loader_batch = next(iterator)
            out.append(
                make_batch(
                    loader_batch,
                    settings=self.noise,
                    clip_range=self.clip_range,
                    seed=self.config.training.seed,
                    step=self.step,
                    global_batch_size=self.config.training.global_batch_size,
                )
            )
        return out

    def _reduce_loss(self, reports: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        total = torch.zeros(2, dtype=torch.float64)
        if self.layout.contributes:
            for report in reports:
                total += report["lm loss"].double().cpu()
        if dist.is_initialized():
            all_reduce_host(total)
        return float(total[0]), float(total[1])

    def _validate(self) -> dict[str, Any]:
        import contextlib

        from megatron_bd3.training.validation import run_validation

        cfg, v = self.config, self.config.validation
        search = (
            v.clip_search.enabled
            and not cfg.training.fix_clipping
            and self.noise.fixed_t is None
            and cfg.model.preset == "bd3"
        )
        swap = (
            self.ema.swap_in() if (self.ema is not None and v.use_ema) else contextlib.nullcontext()
        )
        start = time.perf_counter()
        with swap:
            result = run_validation(
                models=self.stepper.eval_models,
                loader=self.valid_loader,
                settings=self.noise,
                seed=v.seed,
                num_batches=v.num_batches,
                stream_length=self.model_config.stream_length,
                clip_search=search,
                clip_widths=v.clip_search.widths,
                clip_delta=v.clip_search.delta,
                clip_num_batches=v.clip_search.num_batches,
                contributes=self.layout.contributes,
            )
        message = (
            f"validation at step {self.step}: nll {result['nll']:.4f} ppl "
            f"{result['ppl']:.2f} over {result['tokens']} tokens / {result['batches']} "
            f"batches ({time.perf_counter() - start:.1f}s, "
            f"{'EMA' if self.ema is not None and v.use_ema else 'raw'} weights)"
        )
        if "clip_range" in result:
            chosen = result["clip_range"]
            variance = result["clip_variances"][(chosen.eps_min, chosen.eps_max)]
            message += (
                f"; clip search over {len(result['clip_variances'])} ranges -> "
                f"U[{chosen.eps_min:g}, {chosen.eps_max:g}] (var {variance:.4g})"
            )
            self.clip_range = chosen
        self.metrics.info(message)
        record = {
            "step": self.step,
            "val_nll": result["nll"],
            "val_ppl": result["ppl"],
            "val_tokens": result["tokens"],
        }
        if "clip_range" in result:
            record["clip"] = [self.clip_range.eps_min, self.clip_range.eps_max]
        self.metrics.log(record, console=False)
        self.last_val = {"nll": result["nll"], "ppl": result["ppl"], "step": self.step}
        return result

    def _save(self) -> Path:
        from megatron_bd3.checkpoint import save_training_state

        cfg = self.config
        start = time.perf_counter()
        state = {
            "step": self.step,
            "consumed_samples": self.step * cfg.training.global_batch_size,
            "clip_range": [self.clip_range.eps_min, self.clip_range.eps_max],
            "loader": self.train_loader.state_dict(),
            "last_val": self.last_val,
        }
        path = save_training_state(
            cfg.checkpoint_dir,
            self.step,
            stepper=self.stepper,
            chunks=self.stepper.chunks,
            ema=self.ema,
            train_state=state,
            record={
                **self._record(),
                "clip_range": [self.clip_range.eps_min, self.clip_range.eps_max],
                "special_ids": self.manifest_tokenizer.get("special_ids"),
                "tokenizer_source": self.manifest_tokenizer.get("source"),
            },
            keep_last=cfg.checkpoint.keep_last,
            layout_independent=cfg.checkpoint.save_layout_independent,
        )
        self.metrics.info(f"saved checkpoint {path} ({time.perf_counter() - start:.1f}s)")
        return path

    def run(self) -> dict[str, Any]:
        from megatron_bd3.training.logging import memory_usage_gib
        from megatron_bd3.training.lr_schedule import lr_from_config
        from megatron_bd3.training.step import train_step

        cfg, t = self.config, self.config.training
        tokens_per_step = t.global_batch_size * cfg.model.seq_length
        iterator = iter(self.train_loader)
        window_start, window_steps = time.perf_counter(), 0
        last_loss, last_ckpt, steps_this_run = math.nan, None, 0
        run_start = time.perf_counter()
        total_tokens = 0
        if self.step == 0 and cfg.checkpoint.save_initial:
            last_ckpt = self._save()
        if self._pending_rng is not None:  # resumed: continue every RNG stream exactly
            from megatron_bd3.checkpoint.rng import restore_rng_state

            restore_rng_state(self._pending_rng)
            self._pending_rng = None
        while self.step < t.train_iters:
            lr = lr_from_config(self.step, cfg.optimizer, cfg.schedule, t.train_iters)
            self.profiler.before_step(self.step + 1)
            microbatches = self._microbatches(iterator)
            reports, grad_norm = train_step(
                self.stepper,
                self._forward_step,
                microbatches,
                lr=lr,
                seq_length=self.model_config.stream_length,
                micro_batch_size=t.micro_batch_size,
                model_config=self.model_config,
            )
            if self.ema is not None:
                self.ema.update()
            loss_sum, count = self._reduce_loss(reports)
            last_loss = loss_sum / max(count, 1.0)
            self.step += 1
            self.profiler.after_step(self.step)
            steps_this_run += 1
            window_steps += 1
            total_tokens += tokens_per_step
            self.metrics.advance()
            if self.step % cfg.logging.interval == 0 or self.step == t.train_iters:
                elapsed = time.perf_counter() - window_start
                flops = self.flops_per_step * window_steps / max(elapsed, 1e-9)
                self.metrics.log(
                    {
                        "step": self.step,
                        "loss": last_loss,
                        "ppl": math.exp(last_loss) if last_loss < 50 else math.inf,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens_per_s": tokens_per_step * window_steps / max(elapsed, 1e-9),
                        "mfu": flops / (self.peak_flops * self.layout.world_size),
                        "mem_gib": memory_usage_gib(self.device_type),
                        "clip": (self.clip_range.eps_min, self.clip_range.eps_max),
                    }
                )
                window_start, window_steps = time.perf_counter(), 0
            v = cfg.validation
            done = self.step >= t.train_iters
            stop = self.stop_after is not None and steps_this_run >= self.stop_after
            periodic_val = bool(v.interval) and self.step % v.interval == 0
            if self.valid_loader is not None and (periodic_val or (done and v.at_end)):
                self._validate()  # before the checkpoint, so it records the new clip range
            periodic_ckpt = (
                bool(cfg.checkpoint.interval) and self.step % cfg.checkpoint.interval == 0
            )
            if periodic_ckpt or (done and cfg.checkpoint.save_final) or stop:
                last_ckpt = self._save()
            if stop:
                break
        if (
            self.step >= t.train_iters
            and steps_this_run == 0
            and self.valid_loader is not None
            and cfg.validation.at_end
            and self.last_val.get("step") != self.step
        ):
            self._validate()  # resumed a finished run: report its validation
        wall = time.perf_counter() - run_start
        summary = {
            "step": self.step,
            "train_loss": last_loss,
            "val_nll": self.last_val.get("nll"),
            "val_ppl": self.last_val.get("ppl"),
            "clip_range": [self.clip_range.eps_min, self.clip_range.eps_max],
            "checkpoint": str(last_ckpt) if last_ckpt else None,
            "steps_this_run": steps_this_run,
            "tokens_per_s": total_tokens / wall if wall > 0 else 0.0,
            "mfu": (
                self.flops_per_step
                * steps_this_run
                / wall
                / (self.peak_flops * self.layout.world_size)
            )
            if wall > 0
            else 0.0,
            "run_dir": str(cfg.run_dir),
        }
        self._log0(f"done: {summary}")
        return summary

    @staticmethod
    def _forward_step(data_iterator, model):
        from megatron_bd3.model import forward_step

        return forward_step(data_iterator, model)

    def close(self) -> None:
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.close()
        if self._owns_parallel:
            from megatron_bd3.parallel import destroy_parallel

            destroy_parallel()


def train(config: RunConfig, *, stop_after: int | None = None) -> dict[str, Any]:
    """Train according to `config` in this process (one rank of a torchrun/deepspeed launch, or a
    single process). Returns a summary: final step, losses, validation NLL/PPL, clip range,
    last checkpoint, throughput."""
    trainer = Trainer(config, stop_after=stop_after)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        trainer.close()
