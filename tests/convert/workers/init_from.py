"""Start the real trainer from two checkpoints with `checkpoint.init_from` and print the first
training loss of each (one process, one step each, same seed, data and noise).

argv: run config yaml, output dir, then NAME=CHECKPOINT pairs. Prints "LOSS <name> <loss>".
The step-1 loss is computed with the initial weights, so two checkpoints holding the same network
give the same loss to the last bit.
"""

import sys
from pathlib import Path

from megatron_bd3.training.config import load_config
from megatron_bd3.training.trainer import train


def main() -> None:
    config_path, out = sys.argv[1], Path(sys.argv[2])
    for pair in sys.argv[3:]:
        name, checkpoint = pair.split("=", 1)
        config = load_config(config_path, [
            "parallel.pipeline_model_parallel_size=1",
            "parallel.tensor_model_parallel_size=1",
            f"checkpoint.init_from={checkpoint}",
            "checkpoint.resume=none",
            "checkpoint.save_final=false",
            f"checkpoint.dir={out / name / 'ckpt'}",
            f"logging.output_dir={out / name}",
            "training.train_iters=1",
            "validation.at_end=false",
        ])
        summary = train(config)
        print(f"LOSS {name} {summary['train_loss']!r}", flush=True)


if __name__ == "__main__":
    main()
