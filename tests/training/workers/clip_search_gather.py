"""Each rank holds half of every batch's (sequence, block) losses; the all-reduced variance must
equal torch.var over the concatenated halves, computed here on one process."""

import torch
import torch.distributed as dist

from megatron_bd3.training.clip_search import ClipSearchAccumulator, select_clip_range


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(7)
    candidates = [(0.0, 0.5), (0.3, 0.8), (0.5, 1.0)]
    full = (
        torch.randn(len(candidates), 3, 8, 4, generator=g)
        * torch.tensor([2.0, 0.7, 1.3])[:, None, None, None]
    )
    acc = ClipSearchAccumulator(candidates)
    for c in range(len(candidates)):
        for b in range(3):
            acc.add(c, full[c, b, rank * 4 : (rank + 1) * 4])  # this rank's 4 sequences
    got = acc.variances()
    expected = [
        float(full[c].double().reshape(3, -1).var(dim=1, unbiased=True).mean()) for c in range(3)
    ]
    match = all(abs(a - b) < 1e-9 * max(1.0, abs(b)) for a, b in zip(got, expected, strict=True))
    choice = select_clip_range(candidates, got)
    line = f"CLIP rank={rank} got={got} expected={expected} choice={choice} match={match}"
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, line)  # rank 0 prints all: no interleaved output
    if rank == 0:
        print("\n".join(lines), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
