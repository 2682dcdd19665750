"""torchrun worker: `bd3-eval --grad-variance` on a checkpoint in DP = 2, TP = 2 and PP = 2 and on
its standalone conversion in DP = 2, one process group for all four (the CLI reuses a group it did
not create and leaves it alone).

    variance_layouts.py CKPT STANDALONE DATA OUT_ROOT [bd3-eval options...]
        -> OUT_ROOT/{dp2,tp2,pp2,standalone_dp2}/eval.json
"""

from __future__ import annotations

import sys

import torch.distributed as dist

from megatron_bd3.cli.eval import main

LAYOUTS = {"dp2": [], "tp2": ["--tensor-model-parallel-size", "2"],
           "pp2": ["--pipeline-model-parallel-size", "2"]}

if __name__ == "__main__":
    ckpt, standalone, data, out_root, *options = sys.argv[1:]
    runs = {name: [ckpt, *layout] for name, layout in LAYOUTS.items()}
    runs["standalone_dp2"] = [standalone, "--ignore-bos"]  # as the run trained
    dist.init_process_group("gloo")
    try:
        for name, model in runs.items():
            code = main([*model, "--data", data, "--output", f"{out_root}/{name}", "--no-plots",
                         *options])
            if code != 0:
                raise SystemExit(f"bd3-eval {name} exited with {code}")
    finally:
        dist.destroy_process_group()
