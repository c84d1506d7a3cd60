import pickle

import numpy as np
import pytest
import torch

from crate_kernels.train.config import DataConfig
from crate_kernels.train.data import (
    ImageSet,
    TextSet,
    decode_text,
    encode_text,
    global_batch,
    load_dataset,
    random_affine,
    rank_micro_batches,
)


def test_data_order_is_a_function_of_the_step():
    a, b = global_batch(5, 100, 16, seed=0), global_batch(5, 100, 16, seed=0)
    assert torch.equal(a, b)
    epoch0 = torch.cat([global_batch(s, 100, 16, seed=0) for s in range(6)])  # 6 full batches per epoch
    assert len(set(epoch0.tolist())) == 96  # no sample twice within an epoch
    assert not torch.equal(global_batch(0, 100, 16, seed=0), global_batch(6, 100, 16, seed=0))  # reshuffled
    assert not torch.equal(global_batch(0, 100, 16, seed=0), global_batch(0, 100, 16, seed=1))


def test_data_rank_shares_do_not_depend_on_world_size():
    """Ranks × micro-batches split one global batch, with the same crops, whatever the world size."""
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.rand(40, 1, 8, 8, generator=g), torch.arange(40) % 10, 10, torch.zeros(1), torch.ones(1))
    cfg = DataConfig(crop_scale=0.5, hflip=True)
    single = rank_micro_batches(data, 3, cfg, 8, 1, 0, (0, 1))[0][0]
    parts = [x for r in range(2) for x, _ in rank_micro_batches(data, 3, cfg, 8, 2, 0, (r, 2))]
    assert [p.shape[0] for p in parts] == [2, 2, 2, 2]
    torch.testing.assert_close(torch.cat(parts), single, rtol=0, atol=0)


def test_data_augmentation_crop_and_flip():
    g = torch.Generator().manual_seed(0)
    assert random_affine(4, 1.0, False, g) is None
    theta = random_affine(256, 0.5, True, g)
    sx, sy = theta[:, 0, 0].abs(), theta[:, 1, 1]
    assert (sx * sy).min() >= 0.5 - 1e-6 and sx.max() <= 1 and sy.max() <= 1  # area share in [0.5, 1]
    assert (theta[:, 0, 2].abs() <= 1 - sx + 1e-6).all()  # the crop stays inside the image
    assert 0.3 < (theta[:, 0, 0] < 0).float().mean() < 0.7  # about half flipped
    images = torch.arange(16.0).view(1, 1, 4, 4)
    data = ImageSet(images, torch.zeros(1, dtype=torch.long), 1, torch.zeros(1), torch.ones(1))
    flip = torch.tensor([[[-1.0, 0, 0], [0, 1, 0]]])
    torch.testing.assert_close(data.batch(torch.tensor([0]), flip)[0], images.flip(-1))


def test_data_text_windows_and_encoding():
    ids = encode_text("héllo\x7f")
    assert decode_text(ids) == "h?llo?" and int(ids.max()) < 127  # 127 stays free for [MASK]
    data = TextSet(torch.arange(21), block_size=5)
    assert len(data) == 4
    x, y = data.batch(torch.tensor([1, 3]))
    assert torch.equal(x[0], torch.arange(5, 10)) and torch.equal(y[0], torch.arange(6, 11))


def test_data_embedded_sets():
    train, val = load_dataset(DataConfig(name="digits", val_fraction=0.2), text=False)
    assert train.images.shape[1:] == (1, 8, 8) and len(train) + len(val) == 1797 and len(val) == 359
    assert train.num_classes == 10
    train, val = load_dataset(DataConfig(name="lfw", image_size=16), text=False)
    assert train.images.shape[1:] == (1, 16, 16) and train.num_classes == 2
    train, val = load_dataset(DataConfig(name="pydoc"), text=True)
    assert train.tokens.numel() > 300_000 and val.tokens.numel() > 50_000


def test_data_local_paths(tmp_path):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / "folder" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((6, 6, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "folder" / label / f"{i}.png")
    train, val = load_dataset(DataConfig(name=str(tmp_path / "folder"), val_fraction=0.34), text=False)
    assert train.images.shape[1:] == (3, 6, 6) and len(train) + len(val) == 6 and train.num_classes == 2

    cifar = tmp_path / "cifar"
    cifar.mkdir()
    for name, n in (("data_batch_1", 4), ("data_batch_2", 4), ("test_batch", 2)):
        batch = {b"data": np.zeros((n, 3072), dtype=np.uint8), b"labels": list(range(n))}
        (cifar / name).write_bytes(pickle.dumps(batch))
    train, val = load_dataset(DataConfig(name=str(cifar)), text=False)
    assert train.images.shape == (8, 3, 32, 32) and val.images.shape == (2, 3, 32, 32)

    text = tmp_path / "book.txt"
    text.write_text("abc" * 100)
    train, val = load_dataset(DataConfig(name=str(text), val_fraction=0.1), text=True)
    assert train.tokens.numel() == 270 and decode_text(val.tokens[:3]) == "abc"


def test_data_bad_names():
    with pytest.raises(ValueError, match="neither an embedded set"):
        load_dataset(DataConfig(name="/no/such/path"), text=False)
    with pytest.raises(ValueError, match="needs 'pydoc' or a text file"):
        load_dataset(DataConfig(name="digits"), text=True)


def test_data_crafted_cifar_batch_runs_nothing(tmp_path):
    from tests.train.test_faults import WritesAFile

    cifar, marker = tmp_path / "cifar", tmp_path / "ran"
    cifar.mkdir()
    for name in ("data_batch_1", "test_batch"):
        batch = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 1]}
        (cifar / name).write_bytes(pickle.dumps(batch, protocol=2))  # the python batches' own protocol
    assert load_dataset(DataConfig(name=str(cifar)), text=False)[0].images.shape == (2, 3, 32, 32)
    hostile = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": WritesAFile(marker)}
    (cifar / "data_batch_1").write_bytes(pickle.dumps(hostile, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_1' is not a CIFAR python batch \(refused \S+\.exec:"):
        load_dataset(DataConfig(name=str(cifar)), text=False)
    assert not marker.exists()
    pickle.loads((cifar / "data_batch_1").read_bytes())  # the crafted file does run code when plainly unpickled
    assert marker.exists()
