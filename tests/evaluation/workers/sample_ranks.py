"""torchrun worker: every rank generates its shard of the sample set, the records are gathered,
and rank 0 writes them as JSON lines.

    torchrun --nproc_per_node=2 sample_ranks.py MODEL_DIR OUT.jsonl NUM_SAMPLES BATCH_SIZE SEED
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from megatron_bd3.data.tokenizer import load_tokenizer
from megatron_bd3.evaluation.generation import gather_samples, generate_samples
from megatron_bd3.standalone import BD3Network, SamplerConfig
from tests.evaluation.workers.sample_settings import LENGTH, sampler_config


def main() -> None:
    model_dir, out, num_samples, batch_size, seed = sys.argv[1:6]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    network = BD3Network.from_pretrained(model_dir)
    tokenizer = load_tokenizer(f"{model_dir}/tokenizer")
    config: SamplerConfig = sampler_config()
    records = generate_samples(network, tokenizer, config, num_samples=int(num_samples),
                               seed=int(seed), rank=dist.get_rank(),
                               world_size=dist.get_world_size(), length=LENGTH,
                               batch_size=int(batch_size))
    assert {r.rank for r in records} <= {dist.get_rank()}
    gathered = gather_samples(records, num_samples=int(num_samples))
    if dist.get_rank() == 0:
        with open(out, "w") as handle:
            for record in gathered:
                handle.write(json.dumps(record.to_dict()) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
