"""Resume a run (argv: run config yaml, checkpoint dir) in the config's layout and save a
checkpoint at once, without training a step: what the elastic resume loaded, as the new layout
saves it."""

import sys

from megatron_bd3.training.config import load_config
from megatron_bd3.training.trainer import Trainer

if __name__ == "__main__":  # dist_checkpointing's save starts worker processes
    config = load_config(sys.argv[1], [f"checkpoint.resume={sys.argv[2]}"])
    trainer = Trainer(config)
    try:
        trainer.setup()
        print(f"RESAVED {trainer._save()}")
    finally:
        trainer.close()
