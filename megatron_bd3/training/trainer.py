"""The training loop: `train(config) -> summary`.

Start-up: resolve the environment and refuse impossible combinations (before any process group
exists) -> parallel state -> data manifest (vocabulary, [MASK] id, L) -> the model config, the
one description of the network and its noise -> model chunks of this rank -> optional warm start
(`checkpoint.init_from`, resharded) -> parallelize (DeepSpeed engine or megatron optimizer) ->
EMA -> resume. Per step: pull this data-parallel rank's micro-batches, noise them (keyed by seed,
step and global-batch position), forward/backward through megatron's forward_backward_func, one
optimizer step at lr(step), EMA update, log, validate (clip search) and checkpoint when due.

The pieces live in their own modules: model_config (config -> BD3Config), parallelize (chunks and
optimizer), state (trainer state, clip range, RNG), validation (Validator), logging
(MetricsLogger), checkpoint.manager (save/load of the stepper and the components).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_bd3.checkpoint import (
    load_model_weights,
    load_training_state,
    resolve_resume,
    save_training_state,
)
from megatron_bd3.checkpoint.manager import layout_change, select_resume
from megatron_bd3.data import BD3DataLoader, load_manifest, load_tokenizer
from megatron_bd3.model import forward_step
from megatron_bd3.parallel import all_reduce_host, destroy_parallel
from megatron_bd3.paths import resolve_path
from megatron_bd3.training import parallelize as par
from megatron_bd3.training.batches import NoiseSettings, make_batch
from megatron_bd3.training.config import RunConfig, dump_config
from megatron_bd3.training.ema import ExponentialMovingAverage
from megatron_bd3.training.flops import default_peak_flops, training_flops_per_sequence
from megatron_bd3.training.logging import MetricsLogger, memory_usage_gib
from megatron_bd3.training.lr_schedule import lr_from_config
from megatron_bd3.training.model_config import build_model_config, model_identity
from megatron_bd3.training.optimizer import resolve_environment
from megatron_bd3.training.profiling import StepProfiler
from megatron_bd3.training.state import ClipRangeState, RNGState, TrainerState
from megatron_bd3.training.step import train_step
from megatron_bd3.training.validation import Validator

logger = logging.getLogger("megatron_bd3.train")


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


class Trainer:
    """Holds the state of one run; `setup()` builds it, `run()` trains to training.train_iters."""

    def __init__(self, config: RunConfig, *, stop_after: int | None = None) -> None:
        self.config = config
        self.stop_after = stop_after  # stop (with a checkpoint) after this many steps this run
        self.metrics: MetricsLogger | None = None
        self._owns_parallel = False

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        cfg, t = self.config, self.config.training
        self.env = resolve_environment(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        self.info, self._owns_parallel = par.initialize_from_config(cfg)
        _setup_python_logging(self.info.rank)
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * self.info.dp_size)

        # data: vocabulary and [MASK] id come from the manifest the shards were written with
        self.manifest_path = resolve_path(cfg.data.manifest, "data.manifest")
        self.manifest_tokenizer = load_manifest(self.manifest_path).tokenizer
        self.model_config = build_model_config(
            cfg,
            vocab_size=int(self.manifest_tokenizer["vocab_size"]),
            mask_token_id=int(self.manifest_tokenizer["special_ids"]["mask_id"]),
            precision=self.env.precision,
        )
        self.noise = NoiseSettings.from_model_config(self.model_config)
        self._build_loaders()

        # model chunks of this rank, optional warm start, optimizer, EMA
        chunks = par.build_model_chunks(self.model_config, device_type=self.env.device_type)
        self.identity = model_identity(
            cfg, self.model_config, str(self.manifest_tokenizer.get("fingerprint"))
        )
        # verified, and a mismatch refused, before the expensive set-up
        self.resume_dir, resume_marker, skipped = select_resume(
            cfg.checkpoint_dir, cfg.checkpoint.resume, self._record()
        )
        if self.info.rank == 0:
            for reason in skipped:
                logger.warning(f"checkpoint.resume=auto skips a checkpoint that is not intact: "
                               f"{reason}")
        change = None if self.resume_dir is None else layout_change(resume_marker, self._record())
        if change is not None:
            # an elastic resume: the weights come resharded from the checkpoint's model/ before
            # the optimizer is built (it takes its master copy from them); the optimizer state
            # and the rest follow in load_training_state
            load_model_weights(self.resume_dir, chunks, record={"model": self.identity})
        elif self.resume_dir is None and cfg.checkpoint.init_from:
            self._init_from(chunks, cfg.checkpoint.init_from)
        self.stepper = par.parallelize(
            cfg, self.model_config, chunks, environment=self.env,
            num_microbatches=self.num_microbatches, data_parallel_size=self.info.dp_size,
        )
        self.ema = None
        if t.ema_decay > 0:
            self.ema = ExponentialMovingAverage(
                par.iterate_named_parameters(self.stepper.chunks), decay=t.ema_decay
            )

        # what a checkpoint carries besides the stepper's own state
        self.state = TrainerState(global_batch_size=t.global_batch_size)
        self.clip = ClipRangeState(self.model_config.clip_range)
        self.rng = RNGState(seed=self.info.seed)
        self.components = {"trainer": self.state, "clip_range": self.clip,
                           "loader": self.train_loader, "rng": self.rng}
        if self.ema is not None:
            self.components["ema"] = self.ema
        if self.resume_dir is not None:
            resharded = load_training_state(self.resume_dir, stepper=self.stepper,
                                            components=self.components, record=self._record(),
                                            marker=resume_marker)
            self._log0(f"resumed from {self.resume_dir} at step {self.state.step} (clip range "
                       f"[{self.clip.value.eps_min}, {self.clip.value.eps_max}])")
            if resharded is not None:
                self._log0(f"elastic resume: {resharded}")
        self._setup_metrics()

    def _build_loaders(self) -> None:
        cfg, info = self.config, self.info
        tokenizer_fingerprint = None
        if cfg.data.tokenizer:
            tokenizer = load_tokenizer(resolve_path(cfg.data.tokenizer, "data.tokenizer"))
            tokenizer_fingerprint = tokenizer.fingerprint()
        common = dict(
            dp_rank=info.dp_rank,
            dp_size=info.dp_size,
            expected_tokenizer_fingerprint=tokenizer_fingerprint,
            expected_seq_length=cfg.model.seq_length,
            num_workers=cfg.data.num_workers,
            document_ids=cfg.data.document_mask,
        )
        self.train_loader = BD3DataLoader(
            self.manifest_path, cfg.data.train_split, cfg.training.micro_batch_size,
            seed=cfg.training.seed, num_microbatches=self.num_microbatches, **common,
        )
        self.validator = None
        v = cfg.validation
        if v.interval > 0 or v.at_end:
            valid_loader = BD3DataLoader(
                self.manifest_path, cfg.data.valid_split,
                v.micro_batch_size or cfg.training.micro_batch_size, seed=v.seed,
                # the interleaved pipeline schedule needs at least PP micro-batches per call
                num_microbatches=cfg.parallel.pipeline_model_parallel_size, max_epochs=1,
                **common,
            )
            self.validator = Validator(cfg, self.noise, self.model_config.stream_length,
                                       valid_loader, reports_loss=info.reports_loss)

    def _record(self) -> dict[str, Any]:
        info = self.info
        return {
            "layout": {
                "tp": info.tp_size,
                "pp": info.pp_size,
                "vpp": info.vpp_size,
                "cp": info.cp_size,
                "dp": info.dp_size,
                "optimizer_backend": self.config.optimizer.backend,
                "zero_stage": self.env.zero_stage,
            },
            "model": self.identity,
            "config": self.config.to_dict(),
            "world_size": info.world_size,
        }

    def _init_from(self, chunks: list[torch.nn.Module], source: str) -> None:
        path = resolve_path(source, "checkpoint.init_from")
        directory = resolve_resume(path, str(path)) or path
        use_ema = self.config.checkpoint.init_from_ema
        marker = load_model_weights(directory, chunks, use_ema=use_ema,
                                    record={"model": self.identity})
        self._log0(f"initialised weights from {directory} (step {marker.get('step')}, "
                   f"{'EMA' if use_ema else 'raw'} weights)")

    def _setup_metrics(self) -> None:
        cfg, mc, info = self.config, self.model_config, self.info
        self.flops_per_step = cfg.training.global_batch_size * training_flops_per_sequence(mc)
        if cfg.logging.peak_flops_per_device:
            self.peak_flops, how = cfg.logging.peak_flops_per_device, "logging.peak_flops_per_device"
        else:
            self.peak_flops, how = default_peak_flops(self.env.device_type, self.env.precision)
        self.metrics = MetricsLogger.from_config(
            cfg, rank=info.rank, start_step=self.state.step,
            resumed_at=self.state.step if self.resume_dir is not None else None,
        )
        self.profiler = StepProfiler(cfg.logging.profile_steps, cfg.run_dir / "profile",
                                     info.rank, self.env.device_type)
        if info.rank == 0:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            (cfg.run_dir / "config.yaml").write_text(dump_config(cfg))
        n_params = sum(p.numel() for c in self.stepper.chunks for p in c.parameters())
        t = cfg.training
        self._log0(
            f"run {cfg.logging.run_name}: world {info.world_size} = TP {info.tp_size} x PP "
            f"{info.pp_size}{f' x CP {info.cp_size}' if info.cp_size > 1 else ''} x DP "
            f"{info.dp_size}"
            f"{f' (VPP {info.vpp_size})' if info.vpp_size else ''}"
            f"; {self.env.device_type} {self.env.precision}; optimizer {self.stepper.describe()};"
            f" {n_params:,} parameters on rank 0; global batch {t.global_batch_size} = micro "
            f"{t.micro_batch_size} x {self.num_microbatches} micro-batches x DP {info.dp_size}; "
            f"L {mc.seq_length}, B {mc.block_size}, vocab {mc.vocab_size}; "
            f"{self.flops_per_step / t.global_batch_size:.3g} FLOPs/sequence; peak "
            f"{self.peak_flops:.3g} FLOP/s per device ({how})"
        )

    def _log0(self, message: str) -> None:
        if self.info.rank == 0:
            logger.info(message)

    # ------------------------------------------------------------------ loop
    def _microbatches(self, iterator) -> list[dict[str, Any]]:
        t = self.config.training
        return [
            make_batch(next(iterator), settings=self.noise, clip_range=self.clip.value,
                       seed=t.seed, step=self.state.step, global_batch_size=t.global_batch_size)
            for _ in range(self.num_microbatches)
        ]

    def _reduce_loss(self, reports: list[dict[str, torch.Tensor]]) -> float:
        total = torch.zeros(2, dtype=torch.float64)  # [loss sum, token count]
        if self.info.reports_loss:
            for report in reports:
                total += report["lm loss"].double().cpu()
        if dist.is_initialized():
            all_reduce_host(total)
        return float(total[0]) / max(float(total[1]), 1.0)

    def _validate(self) -> None:
        result = self.validator.run(self.stepper.eval_models, ema=self.ema)
        step = self.state.step
        self.metrics.info(Validator.summary(result, step))
        record = {"step": step, "val_nll": result["nll"], "val_ppl": result["ppl"],
                  "val_tokens": result["tokens"]}
        if "clip_range" in result:
            self.clip.value = result["clip_range"]
            record["clip"] = [self.clip.value.eps_min, self.clip.value.eps_max]
        self.metrics.log(record, console=False)
        self.state.last_validation = {"nll": result["nll"], "ppl": result["ppl"], "step": step}

    def _save(self) -> Path:
        cfg = self.config
        start = time.perf_counter()
        path = save_training_state(
            cfg.checkpoint_dir,
            self.state.step,
            stepper=self.stepper,
            components=self.components,
            ema=self.ema,
            record={
                **self._record(),
                "clip_range": [self.clip.value.eps_min, self.clip.value.eps_max],
                "special_ids": self.manifest_tokenizer.get("special_ids"),
                "tokenizer_source": self.manifest_tokenizer.get("source"),
            },
            keep_last=cfg.checkpoint.keep_last,
            layout_independent=cfg.checkpoint.save_layout_independent,
        )
        self.metrics.info(f"saved checkpoint {path} ({time.perf_counter() - start:.1f}s)")
        return path

    def _log_step(self, loss: float, lr: float, grad_norm, window_steps: int, elapsed: float):
        tokens_per_step = self.config.training.global_batch_size * self.config.model.seq_length
        flops = self.flops_per_step * window_steps / max(elapsed, 1e-9)
        self.metrics.log({
            "step": self.state.step,
            "loss": loss,
            "ppl": math.exp(loss) if loss < 50 else math.inf,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_step * window_steps / max(elapsed, 1e-9),
            "mfu": flops / (self.peak_flops * self.info.world_size),
            "mem_gib": memory_usage_gib(self.env.device_type),
            "clip": (self.clip.value.eps_min, self.clip.value.eps_max),
        })

    def run(self) -> dict[str, Any]:
        cfg, t, state = self.config, self.config.training, self.state
        iterator = iter(self.train_loader)
        window_start, window_steps = time.perf_counter(), 0
        last_loss, last_ckpt, steps_this_run = math.nan, None, 0
        run_start = time.perf_counter()
        if state.step == 0 and cfg.checkpoint.save_initial:
            last_ckpt = self._save()
        self.rng.restore()  # resumed: continue every RNG stream exactly
        while state.step < t.train_iters:
            lr = lr_from_config(state.step, cfg.optimizer, cfg.schedule, t.train_iters)
            self.profiler.before_step(state.step + 1)
            reports, grad_norm = train_step(
                self.stepper, forward_step, self._microbatches(iterator), lr=lr,
                seq_length=self.model_config.stream_length, micro_batch_size=t.micro_batch_size,
            )
            if self.ema is not None:
                self.ema.update()
            last_loss = self._reduce_loss(reports)
            state.step += 1
            self.profiler.after_step(state.step)
            steps_this_run += 1
            window_steps += 1
            self.metrics.advance()
            done = state.step >= t.train_iters
            if state.step % cfg.logging.interval == 0 or done:
                elapsed = time.perf_counter() - window_start
                self._log_step(last_loss, lr, grad_norm, window_steps, elapsed)
                window_start, window_steps = time.perf_counter(), 0
            stop = self.stop_after is not None and steps_this_run >= self.stop_after
            if self.validator is not None and self.validator.due(state.step, done):
                self._validate()  # before the checkpoint, so it records the new clip range
            interval = cfg.checkpoint.interval
            if (interval and state.step % interval == 0) or (done and cfg.checkpoint.save_final) \
                    or stop:
                last_ckpt = self._save()
            if stop:
                break
        if (state.step >= t.train_iters and steps_this_run == 0 and self.validator is not None
                and cfg.validation.at_end and state.last_validation.get("step") != state.step):
            self._validate()  # resumed a finished run: report its validation
        wall = time.perf_counter() - run_start
        tokens = steps_this_run * t.global_batch_size * cfg.model.seq_length
        summary = {
            "step": state.step,
            "train_loss": last_loss,
            "val_nll": state.last_validation.get("nll"),
            "val_ppl": state.last_validation.get("ppl"),
            "clip_range": [self.clip.value.eps_min, self.clip.value.eps_max],
            "checkpoint": str(last_ckpt) if last_ckpt else None,
            "steps_this_run": steps_this_run,
            "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "mfu": (self.flops_per_step * steps_this_run / wall
                    / (self.peak_flops * self.info.world_size)) if wall > 0 else 0.0,
            "run_dir": str(cfg.run_dir),
        }
        self._log0(f"done: {summary}")
        return summary

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self._owns_parallel:
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
