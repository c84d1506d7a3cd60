"""The image-folder loader beside the training step it feeds: images/s at 224 px with 0, 1 and 2 DataLoader workers,
and crate-train's step time of CRATE-T/16 and CRATE-B/16 at the same batch, on this machine.

Loader rows read a generated folder of photograph-sized JPEGs (300–500 px a side, mixed sizes) through
``crate_kernels.train.loader.TrainBatches`` with the paper's training transform (random resized crop, scale
(0.08, 1), to 224 px, horizontal flip): one call is one global batch, so the report's items/s is the loader's
images/s (the workers keep decoding between calls, as they do while a step runs). Step rows time crate-train's
classification step (label-smoothed cross-entropy, backward, AdamW) of crate_kernels' model on one such batch. A
loader whose images/s exceeds the step's keeps the model fed.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

import crate_kernels
from benchmarks.shapes import (
    TORCH_PATH,
    TRITON,
    BenchShape,
    Provider,
    data_shapes,
    optimizer_step,
    parameter_bytes,
    providers,
    train_step_flops,
)
from crate_kernels.train.config import from_flat
from crate_kernels.train.data import Batch, load_dataset
from crate_kernels.train.loader import TrainBatches
from crate_kernels.train.optim import build_optimizer
from crate_kernels.train.tasks import Classify

_FOLDER_IMAGES = 96  # more than the batches in flight (2 workers × 2 prefetched), fewer than a long generation
_WORKERS = (0, 1, 2)


@pytest.fixture(scope="session")
def jpeg_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four classes of JPEGs of random sizes: smooth colour fields with noise, which compress like photographs."""
    from PIL import Image

    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for i in range(_FOLDER_IMAGES):
        h, w = (int(v) for v in rng.integers(300, 501, size=2))
        y, x = np.mgrid[0:h, 0:w]
        colour = rng.uniform(0, 255, (3, 1, 1)) * (0.5 + 0.5 * np.sin(x / rng.uniform(20, 80) + y / 50))
        noisy = colour.transpose(1, 2, 0) + rng.normal(0, 12, (h, w, 3))
        (root / f"class{i % 4}").mkdir(exist_ok=True)
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(root / f"class{i % 4}" / f"{i:03d}.jpg", quality=90)
    return root


@pytest.mark.parametrize("workers", _WORKERS, ids=lambda w: f"loader_{w}_workers")
@pytest.mark.parametrize("shape", data_shapes()[:1], ids=str)
def bench_data_loader(bench, shape: BenchShape, workers: int, jpeg_folder: Path) -> None:
    values = {"data.name": str(jpeg_folder), "data.image_size": shape.model.image_size, "data.val_fraction": 0.1}
    values |= {"data.crop_scale": 0.08, "data.hflip": True, "data.workers": workers, "optim.batch_size": shape.B}
    cfg = from_flat(values)
    train_set, _ = load_dataset(cfg.data, text=False)
    batches = TrainBatches(train_set, cfg, (0, 1), pin=bench.device.type == "cuda")
    try:
        bench(
            lambda: next(batches),
            lambda: (),
            mode="load",
            provider=Provider(f"loader_{workers}_workers", ours=True),
            op="data_loader",
            shape=shape,
            dtype=torch.float32,
            flops=0.0,
            nbytes=shape.B * 3 * shape.model.image_size**2 * 4,  # the batch it hands over
        )
    finally:
        batches.close()


@pytest.mark.parametrize("provider", providers(TORCH_PATH, TRITON))
@pytest.mark.parametrize("shape", data_shapes(), ids=str)
def bench_data_train_step(bench, shape: BenchShape, provider: Provider) -> None:
    device, m = bench.device, shape.model
    cfg = from_flat({"model.name": m.name, "optim.batch_size": shape.B})
    torch.manual_seed(0)
    model = crate_kernels.create_model(m.name).to(device)
    optimizer, task = build_optimizer(model, cfg), Classify(cfg)

    def make_inputs() -> tuple[Batch]:
        images = torch.randn(shape.B, m.channels, m.image_size, m.image_size, device=device)
        return (Batch(images, torch.randint(0, m.head_out, (shape.B,), device=device), torch.arange(shape.B), 0),)

    bench(
        optimizer_step(optimizer, lambda batch: task.loss(model, batch)),
        make_inputs,
        mode="train_step",
        provider=provider,
        op="train_step",
        shape=shape,
        dtype=torch.float32,
        flops=train_step_flops(shape),
        nbytes=10 * parameter_bytes(model),  # forward, backward and AdamW pass over the parameters ~10 times
    )
