"""Block-by-block BD3-LM generation (Algorithm 2, docs/method.md §3), torch only.

The sequence grows one block of ``B`` tokens at a time. A new block starts all [MASK]; a sampler
reveals its tokens over several network calls, each call seeing the clean context before the
block (from a KV cache) and the whole noisy block (bidirectionally). When the block is clean its
keys/values join the cache and the next block starts.

Samplers (§3.3):

* ``first_hitting`` (default, the reference's): every call reveals exactly one token, at a masked
  position chosen uniformly at random, drawn from the model's distribution at that position. NFE
  per block = number of masked tokens. (The reference also tracks the first-hitting time
  ``t <- t * u**(1/n)``; the network is not time-conditioned, so it changes nothing and is not
  computed here.) The position is chosen *before* the call, so only its row is projected to the
  vocabulary.
* ``ancestral``: the T-step sampler on the grid ``t_k = 1 - k/T``: in step ``t -> s`` each masked
  token is revealed with probability ``1 - m(s)/m(t)`` (``m`` = the schedule's masking rate),
  taking a token drawn from the model. The reference keeps the last probabilities when a step
  changes nothing and calls the network only after a change (its NFE). We go one step further:
  the steps until the next change do not need the network at all, so for each masked token we
  draw the step at which it will be revealed (``P(still masked after step k) = m(t_{k+1})/m(t_i)``
  telescopes) and jump to the earliest one. Same distribution, one network call per change, and
  no loop over the unchanged steps. (The reference's grid ``linspace(1, 0, T)`` with ``dt = 1/T``
  ends on a degenerate step at ``t = 0``; ours ends exactly at ``s = 0``, so every block finishes
  within T steps.)

Token distribution at a revealed position: logits / temperature, SUBS (the [MASK] logit is
suppressed), probabilities in float64, nucleus filtering as the reference (sorted descending,
keep tokens whose cumulative probability is <= top_p, always the top one, renormalise), then one
exact categorical draw by inversion in float64: the token is the first index whose cumulative
probability exceeds ``u`` times the total. The reference draws with the 64-bit Gumbel race
``argmax(log p + G)``, one Gumbel variate per vocabulary entry; both are exact draws from the
same float64 probabilities (the 64-bit precision is what the Gumbel fix of Zheng et al. is
about), and inversion needs one uniform per row instead of V, which was a quarter of a batched
call's time at V = 8192.

Randomness and batching: sample ``i`` owns a ``torch.Generator`` seeded with ``seeds[i]``. Per
network call it draws (1) the reveal choice (first-hitting: one ``torch.randint(n_masked)``;
ancestral: ``torch.rand(n_masked, float64)``), then (2) ``torch.rand(r, float64)``, one uniform
for each of its ``r`` revealed rows. Nothing else draws from it, so a sample's tokens are the
same whether it runs alone or in a batch, with or without the cache. Samples in a batch progress
independently (their own block, cache length and stop); finished samples leave the batch.

KV cache (``use_cache=True``): one preallocated buffer per layer, written in place at slot
``position % capacity`` (a ring: rotary is applied before caching, so slot order is irrelevant
and sliding the window copies nothing). Each call feeds only the tokens not yet cached: the noisy
block, plus, right after a block finished, that clean block, whose keys/values are written in the
same call (so the cache write costs no extra call, and the last block is never written).

Beyond the training context L (§3.5), the reference keeps a window of at most L tokens ending at
the current block. Two semantics, both the reference's:

* ``use_cache=True`` (reference ``kv_cache=true``): cached keys/values stay as they were computed,
  with the context the window had then. This equals one pass with a *sliding-window*
  block-causal mask: a query in block ``b`` sees positions ``[end_b - L, end_b)``.
* ``use_cache=False`` (reference ``kv_cache=false``): every call recomputes the whole window from
  its tokens (positions relative to the window start), so old context is really forgotten.
  ``window_refresh=True`` gives exactly this with the cache: when the window slides, the window's
  cache is recomputed once per block, then reused for the block's calls.

Within the context the three agree exactly (the cache is exact, issue #26).

Prompts: prompt tokens fill the first positions; the block holding the end of the prompt is the
first noisy block, with the prompt's tokens in it already unmasked (as the reference treats BOS
at position 0). By default an unconditional sample starts with ``[bos_token_id]`` like the
reference. ``length`` is the total length (prompt included); a last partial block reveals only the
positions below ``length``.

Stopping (per sample, checked when a block is complete): ``stop_eos_count`` EOS tokens among the
generated tokens (cut right after the last one counted; the reference's "2 EOS" counts the BOS at
position 0 because GPT-2's BOS == EOS, i.e. ``stop_eos_count=1`` here); ``stop_on_low_entropy``:
once more than ``entropy_window`` tokens exist, unigram entropy (nats) of the last
``entropy_window`` tokens below ``entropy_threshold`` stops and cuts those tokens (the reference's
var-length rule, 256 tokens / 4 nats); otherwise ``length``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megatron_bd3.diffusion import get_noise_schedule, masked_position_log_probs
from megatron_bd3.standalone.model import BD3Network, KVCache

__all__ = ["SamplerConfig", "Sample", "generate", "nucleus_filter"]

SAMPLERS = ("first_hitting", "ancestral")


@dataclass
class SamplerConfig:
    """How to sample. Defaults follow the reference except ``top_p`` (1.0 = the model's own
    distribution; the paper's samples use 0.9)."""

    sampler: str = "first_hitting"  # or "ancestral"
    steps: int = 5000  # ancestral: diffusion steps T per block (first-hitting ignores it)
    top_p: float = 1.0
    temperature: float = 1.0  # 0 = greedy (argmax)
    block_size: int | None = None  # default: the model's block size
    use_cache: bool = True
    window_refresh: bool = False  # with the cache: recompute the window when it slides
    noise_schedule: str = "loglinear"  # ancestral masking-rate schedule
    stop_eos_count: int | None = None
    stop_on_low_entropy: bool = False
    entropy_window: int = 256
    entropy_threshold: float = 4.0

    def validate(self, network: BD3Network) -> int:
        """Check the options against the model; return the block size to sample with."""
        config = network.config
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is not one of {SAMPLERS}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        block_size = config.block_size if self.block_size is None else self.block_size
        if block_size < 1 or config.seq_length % block_size:
            raise ValueError(
                f"block_size {block_size} must divide the model's seq_length {config.seq_length} "
                "(the sliding window is a whole number of blocks)"
            )
        if self.stop_eos_count is not None:
            if self.stop_eos_count < 1:
                raise ValueError(f"stop_eos_count must be >= 1, got {self.stop_eos_count}")
            if config.eos_token_id is None:
                raise ValueError("stop_eos_count needs eos_token_id in the model config")
        if self.entropy_window < 1:
            raise ValueError(f"entropy_window must be >= 1, got {self.entropy_window}")
        return block_size


@dataclass
class Sample:
    """One generated sequence (prompt included) and what it cost."""

    tokens: list[int]
    prompt_length: int
    nfe: int  # denoising network calls; each one changed the state (the reference's count)
    tokens_processed: int  # tokens this sample pushed through the network
    stop_reason: str  # "length" | "eos" | "low_entropy"
    seconds: float  # from the start of generate() until this sample finished

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_length:]


class _State:
    """Bookkeeping of one sample while it is in the batch."""

    def __init__(self, index: int, prompt: list[int], length: int, block_size: int,
                 seed: int) -> None:
        self.index = index
        self.prompt_length = len(prompt)
        self.length = length
        self.block_end = (len(prompt) // block_size + 1) * block_size  # end of the noisy block
        self.cached = 0  # positions [0, cached) have their keys/values in the cache
        self.step = 0  # ancestral: grid step within the current block
        self.masked = list(range(len(prompt), min(self.block_end, length)))
        self.generator = torch.Generator().manual_seed(seed)
        self.nfe = 0
        self.tokens_processed = 0
        self.cut = length  # where the output ends once a stop rule fired


def generate(
    network: BD3Network,
    length: int,
    *,
    prompts: Sequence[Sequence[int]] | None = None,
    num_samples: int | None = None,
    seeds: Sequence[int] | None = None,
    config: SamplerConfig | None = None,
    progress: Callable[[int], None] | None = None,
    observer: Callable[[int, list[int], torch.Tensor], None] | None = None,
) -> list[Sample]:
    """Generate one batch of samples, each ``length`` tokens long (prompt included) unless it
    stops early.

    ``prompts``: one token list per sample (default: ``num_samples`` times ``[bos_token_id]``,
    or empty if the model has no BOS). ``seeds``: one per sample (default ``0..n-1``).
    ``progress(n)`` is called with the number of tokens revealed by each network call;
    ``observer(sample_index, positions, logits [r, V])`` sees every call's raw logits.
    """
    config = config or SamplerConfig()
    block_size = config.validate(network)
    model_config = network.config
    if prompts is None:
        if num_samples is None:
            raise ValueError("give prompts or num_samples")
        start = [] if model_config.bos_token_id is None else [model_config.bos_token_id]
        prompts = [start] * num_samples
    prompts = [list(map(int, p)) for p in prompts]
    seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} samples")
    _check_prompts(prompts, model_config.vocab_size, model_config.mask_token_id)
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    device = network.embedding.weight.device
    t0 = time.perf_counter()

    states = [_State(i, p, length, block_size, s)
              for i, (p, s) in enumerate(zip(prompts, seeds, strict=True))]
    last_block_end = -(-length // block_size) * block_size
    capacity_positions = max([last_block_end] + [s.block_end for s in states])
    sequence = torch.full((len(states), capacity_positions),
                          model_config.mask_token_id, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        sequence[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    results: list[Sample | None] = [None] * len(states)
    active = []
    for state in states:
        if state.prompt_length >= length:
            results[state.index] = _finish(state, sequence, length, "length", t0)
        else:
            active.append(state)

    window = model_config.seq_length
    step = _Stepper(network, config, block_size, window, sequence, device, len(active),
                    max((s.block_end for s in active), default=0), last_block_end)
    if config.use_cache and config.window_refresh:
        for state in active:
            state.cached = max(state.block_end - window, 0)
    was_training = network.training
    network.eval()
    try:
        with torch.inference_mode():
            while active:  # one network call per iteration, for every unfinished sample
                revealed = step(active, observer)
                if progress is not None:
                    progress(revealed)
                keep = []
                for row, state in enumerate(active):
                    if state.masked:  # block not done yet
                        keep.append(row)
                        continue
                    reason = _stop_reason(state, sequence[state.index], config, model_config)
                    if reason is not None:
                        results[state.index] = _finish(state, sequence, state.cut, reason, t0)
                        continue
                    _start_next_block(state, block_size, window, config)
                    keep.append(row)
                if len(keep) < len(active):
                    active = [active[row] for row in keep]
                    step.keep_rows(keep)
    finally:
        network.train(was_training)
    return results  # type: ignore[return-value]


def _start_next_block(state: _State, block_size: int, window: int,
                      config: SamplerConfig) -> None:
    state.block_end += block_size
    state.step = 0
    state.masked = list(range(state.block_end - block_size, min(state.block_end, state.length)))
    if config.use_cache and config.window_refresh and state.block_end > window:
        state.cached = state.block_end - window  # the window slid: recompute its cache


def _check_prompts(prompts: list[list[int]], vocab_size: int, mask_token_id: int) -> None:
    for i, prompt in enumerate(prompts):
        for position, token in enumerate(prompt):
            if not 0 <= token < vocab_size:
                raise ValueError(f"prompt {i} token {token} at position {position} is outside "
                                 f"the vocabulary [0, {vocab_size})")
            if token == mask_token_id:
                raise ValueError(f"prompt {i} holds the mask token {mask_token_id} at position "
                                 f"{position}; prompts must be clean text")


def _finish(state: _State, sequence: torch.Tensor, cut: int, reason: str, t0: float) -> Sample:
    return Sample(
        tokens=sequence[state.index, :cut].tolist(),
        prompt_length=state.prompt_length,
        nfe=state.nfe,
        tokens_processed=state.tokens_processed,
        stop_reason=reason,
        seconds=time.perf_counter() - t0,
    )


def _stop_reason(state: _State, tokens: torch.Tensor, config: SamplerConfig,
                 model_config) -> str | None:
    """Stop rules after a finished block (docs/method.md §3.5); sets ``state.cut``."""
    end = min(state.block_end, state.length)
    reason = None
    if config.stop_eos_count is not None:
        generated = tokens[state.prompt_length:end]
        eos_positions = (generated == model_config.eos_token_id).nonzero().flatten()
        if len(eos_positions) >= config.stop_eos_count:
            reason = "eos"
            state.cut = state.prompt_length + int(eos_positions[config.stop_eos_count - 1]) + 1
    if config.stop_on_low_entropy and end > config.entropy_window:
        _, counts = torch.unique(tokens[end - config.entropy_window:end], return_counts=True)
        frequencies = counts.double() / counts.sum()
        if float(torch.special.entr(frequencies).sum()) < config.entropy_threshold:
            reason = "low_entropy"  # the reference lets this rule override the EOS cut
            state.cut = end - config.entropy_window
    if reason is None and end >= state.length:
        reason = "length"
        state.cut = state.length
    return reason


def nucleus_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The reference's top-p: keep the most likely tokens whose cumulative probability is
    <= top_p (always the top one), zero the rest, renormalise. ``probs [..., V]``."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(dim=-1) <= top_p
    keep[..., 0] = True
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)
    return filtered / filtered.sum(dim=-1, keepdim=True)


class _Stepper:
    """One network call for every active sample: choose the positions to reveal, build the
    inputs (new tokens, rotary positions, cache slots, attention mask), run the network, draw
    the tokens."""

    def __init__(self, network: BD3Network, config: SamplerConfig, block_size: int, window: int,
                 sequence: torch.Tensor, device, batch_size: int, first_block_end: int,
                 last_block_end: int) -> None:
        self.network = network
        self.config = config
        self.block_size = block_size
        self.window = window
        self.sequence = sequence
        self.device = device
        self.mask_token_id = network.config.mask_token_id
        self.cache = None
        if config.use_cache and batch_size:
            # Ring capacity: the window plus the clean block written in the same call, unless the
            # whole sequence is shorter (then it never wraps); the first call (the whole prompt)
            # must fit as well. One extra slot takes padding rows.
            self.capacity = max(min(window + block_size, last_block_end), first_block_end)
            dtype = network.embedding.weight.dtype
            self.cache = KVCache(network.config, batch_size, self.capacity + 1, dtype, device)
        if config.sampler == "ancestral":
            schedule = get_noise_schedule(config.noise_schedule)
            grid = 1.0 - torch.arange(config.steps + 1, dtype=torch.float64) / config.steps
            self.move_probs = schedule.move_prob(grid).to(torch.float64)  # m(t_k), k = 0..T

    def keep_rows(self, rows: list[int]) -> None:
        if self.cache is not None:
            self.cache.keep_rows(torch.tensor(rows, dtype=torch.long, device=self.device))

    # ----------------------------------------------------------------- reveal choice
    def choose(self, state: _State) -> list[int]:
        """Positions this call reveals (drawn before the call: they do not depend on it)."""
        if self.config.sampler == "first_hitting":
            pick = int(torch.randint(len(state.masked), (1,), generator=state.generator))
            return [state.masked[pick]]
        m = self.move_probs
        u = torch.rand(len(state.masked), dtype=torch.float64, generator=state.generator)
        # A token masked at step i survives steps i..k with probability m[k+1]/m[i].
        survived = (m[state.step + 1:][None, :] > u[:, None] * m[state.step]).sum(dim=1)
        first = int(survived.min())
        state.step += first + 1
        return [p for p, s in zip(state.masked, survived.tolist(), strict=True) if s == first]

    # ----------------------------------------------------------------- one call
    def __call__(self, active: list[_State], observer) -> int:
        reveals = [self.choose(state) for state in active]
        logits = self.forward(active, reveals)  # [n, r_max, V]
        tokens = self.draw(active, reveals, logits, observer)
        revealed = 0
        for state, positions, new in zip(active, reveals, tokens, strict=True):
            self.sequence[state.index, positions] = torch.tensor(new)
            for p in positions:
                state.masked.remove(p)
            state.nfe += 1
            revealed += len(positions)
            if self.cache is not None:
                state.cached = state.block_end - self.block_size
        return revealed

    def forward(self, active: list[_State], reveals: list[list[int]]) -> torch.Tensor:
        B, L = self.block_size, self.window
        cache = self.cache
        end = torch.tensor([s.block_end for s in active])  # [n]
        window_start = (end - L).clamp(min=0)
        start = torch.tensor([s.cached for s in active]) if cache is not None else window_start
        width = int((end - start).max())
        positions = start[:, None] + torch.arange(width)[None, :]  # [n, W] absolute
        real = positions < end[:, None]
        rows = torch.tensor([s.index for s in active])
        tokens = self.sequence[rows[:, None], positions.clamp(max=self.sequence.shape[1] - 1)]
        tokens = torch.where(real, tokens, self.mask_token_id)
        for state, width_i in zip(active, (end - start).tolist(), strict=True):
            state.tokens_processed += width_i

        # Which keys a query may see: [lo, hi) in absolute positions. Block-causal always; the
        # window is per query block with the cache (sliding window) and the current window
        # otherwise (recomputed context).
        hi = (positions // B + 1) * B
        if cache is not None and not self.config.window_refresh:
            lo = (hi - L).clamp(min=0)
        else:
            lo = window_start[:, None].expand_as(hi)
        lo = torch.where(real, lo, 0)  # padding rows: see anything valid, output unused
        hi = torch.where(real, hi, torch.iinfo(torch.long).max)

        query_rows = [[p - int(s) for p in ps]
                      for ps, s in zip(reveals, start.tolist(), strict=True)]
        r_max = max(len(q) for q in query_rows)
        query_index = torch.tensor([q + [q[0]] * (r_max - len(q)) for q in query_rows])

        if cache is None:
            key_positions = torch.where(real, positions, -1)  # keys are the fed tokens
            mask = (key_positions[:, None, :] >= lo[..., None]) & (
                key_positions[:, None, :] < hi[..., None])
            rotary = positions - window_start[:, None]  # relative to the window, as reference
            return self.network.forward(tokens.to(self.device), rotary.to(self.device),
                                        mask.to(self.device), query_index.to(self.device))

        S = self.capacity
        kv_len = min(S, int(end.max()))
        slot = torch.arange(kv_len)
        # The latest position p < end with p % S == slot is what the ring holds there.
        held = slot[None, :] + S * torch.div(end[:, None] - 1 - slot[None, :], S,
                                             rounding_mode="floor")
        mask = (held[:, None, :] >= lo[..., None]) & (held[:, None, :] < hi[..., None])
        slots = torch.where(real, positions % S, S)  # padding rows write the spare slot
        return self.network.forward_cached(
            tokens.to(self.device), positions.to(self.device), cache, slots.to(self.device),
            mask.to(self.device), query_index.to(self.device))

    def draw(self, active, reveals, logits, observer) -> list[list[int]]:
        """Draw the revealed tokens: temperature, SUBS, float64 probabilities, top-p, inversion."""
        counts = [len(r) for r in reveals]
        rows = torch.cat([logits[i, :c] for i, c in enumerate(counts)]).double().cpu()  # [R, V]
        if observer is not None:
            offset = 0
            for state, positions, c in zip(active, reveals, counts, strict=True):
                observer(state.index, positions, rows[offset:offset + c])
                offset += c
        if self.config.temperature > 0:
            rows = rows / self.config.temperature
        # every revealed position is masked: SUBS is the zero-masking log-softmax there
        probs = nucleus_filter(masked_position_log_probs(rows, self.mask_token_id).exp_(),
                               self.config.top_p)
        if self.config.temperature == 0:
            choice = probs.argmax(dim=-1)
        else:
            uniform = torch.cat([
                torch.rand(c, dtype=torch.float64, generator=state.generator)
                for state, c in zip(active, counts, strict=True)
            ])  # [R]
            choice = categorical_by_inversion(probs, uniform)
        return [chunk.tolist() for chunk in choice.split(counts)]


def categorical_by_inversion(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One exact categorical draw per row of ``probs [R, V]`` (float64, need not sum to 1) from
    ``uniform [R]`` in [0, 1): the first index whose cumulative probability exceeds ``u`` times
    the row's total. A zero-probability entry is never chosen (its cumulative value equals the
    previous one, and the target stays strictly below the total)."""
    cdf = probs.cumsum(dim=-1)  # [R, V]
    total = cdf[:, -1:]
    target = torch.minimum(uniform[:, None] * total,
                           torch.nextafter(total, torch.zeros_like(total)))  # < total
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)
