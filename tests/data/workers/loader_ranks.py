"""torchrun worker: each rank iterates one epoch of its BD3DataLoader (2 DataLoader workers); rank 0
gathers every rank's samples and checks exactly-once coverage and equal step counts.

Usage: torchrun --nproc_per_node=N loader_ranks.py SHARDS_DIR
"""

from __future__ import annotations

import sys

import torch.distributed as dist

from megatron_bd3.data.loader import BD3DataLoader


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    loader = BD3DataLoader(
        sys.argv[1],
        "train",
        micro_batch_size=4,
        dp_rank=rank,
        dp_size=world,
        seed=3,
        num_workers=2,
        num_microbatches=2,
        max_epochs=1,
    )
    mine = []
    for batch in loader:
        mine.append((batch["sample_index"].tolist(), batch["global_batch_position"].tolist()))
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        counts = {len(batches) for batches in gathered}
        assert counts == {loader.micro_batches_per_epoch}, counts
        seen = [i for batches in gathered for indices, _ in batches for i in indices]
        assert len(seen) == len(set(seen)) == loader.num_samples - loader.samples_dropped_per_epoch
        for t in range(0, loader.micro_batches_per_epoch, 2):
            positions = sorted(
                p for batches in gathered for _, ps in batches[t : t + 2] for p in ps
            )
            assert positions == list(range(loader.global_batch_size)), positions
        print(
            f"EXACTLY_ONCE_OK ranks={world} samples={len(seen)} "
            f"dropped={loader.samples_dropped_per_epoch} steps={loader.steps_per_epoch}"
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
