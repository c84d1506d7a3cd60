"""``python -m tests.train.run_configs CONFIGS_JSON``: run the training configurations one after another in one
process (under torchrun: on every rank), so that one launch serves several runs.

CONFIGS_JSON is a JSON list of flat configurations (``crate_kernels.train.config.from_flat``'s dotted keys). The
process group joins once and stays for all of them: gloo cannot be relied on to rejoin in the same process.
"""

import json
import sys

import torch.distributed as dist

from crate_kernels.train import distributed
from crate_kernels.train.config import from_flat
from crate_kernels.train.loop import train

if __name__ == "__main__":
    distributed.teardown = lambda ctx: None
    for flat in json.loads(sys.argv[1]):
        train(from_flat(flat))
    if dist.is_initialized():
        dist.destroy_process_group()
