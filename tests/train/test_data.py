import dataclasses
import pickle

import numpy as np
import pytest
import torch

from crate_kernels.train import streams
from crate_kernels.train.augment import Augment, center_box, crop_box, draw_shift, mix_pairs, rand_augment
from crate_kernels.train.config import DataConfig, from_flat
from crate_kernels.train.data import ImageFolder, ImageSet, TextSet, decode_text, encode_text, load_dataset
from crate_kernels.train.distributed import Context
from crate_kernels.train.loader import (
    Position,
    TrainBatches,
    UnreadableFiles,
    eval_batches,
    global_batches,
    rank_micro_batches,
)


def _steps(n: int, batch_size: int, seed: int, count: int, start: Position | None = None) -> list[torch.Tensor]:
    steps = global_batches(n, batch_size, seed, start or Position())
    return [next(steps)[1] for _ in range(count)]


def test_streams_are_named_and_keyed():
    assert streams.seed("augment", 0, 1, 2) == streams.seed("augment", 0, 1, 2)
    seeds = {streams.seed(tag, *range(len(keys))) for tag, keys in streams.KEYS.items()}
    assert len(seeds) == len(streams.KEYS)  # every tag its own stream
    assert streams.seed("mask", 0, 1, 2) != streams.seed("mask", 0, 2, 1)
    with pytest.raises(ValueError, match="tag must be one of"):
        streams.seed("agument", 0, 1, 2)
    with pytest.raises(ValueError, match=r"keyed by \('seed', 'epoch', 'sample'\)"):
        streams.seed("augment", 0, 1)
    with streams.fork("report"):
        inside = torch.rand(3)
    with streams.fork("report"):
        assert torch.equal(torch.rand(3), inside)


def test_data_order_epochs_and_position():
    a, b = _steps(100, 16, 0, 8), _steps(100, 16, 0, 8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert len(set(torch.cat(a[:6]).tolist())) == 96  # 6 full batches per epoch, no sample twice
    assert not torch.equal(a[0], a[6])  # epoch 1 reshuffled
    assert not torch.equal(a[0], _steps(100, 16, 1, 1)[0])  # another seed
    position = Position()
    for _ in range(7):
        position = position.advance(100, 16)[2]
    assert position == Position(epoch=1, offset=16)
    assert torch.equal(_steps(100, 16, 0, 1, start=position)[0], a[7])  # the position alone resumes the order


def _image_set(n: int = 40) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 10, 10, torch.zeros(1), torch.ones(1))


def test_data_rank_shares_do_not_depend_on_world_size():
    """Ranks × micro-batches split one global batch, with the same crops and ids, whatever the world size."""
    data, augment = _image_set(), Augment(seed=0, crop_scale=0.5, hflip=True, randaugment=2)
    ids = torch.randperm(40)[:8]
    single = rank_micro_batches(data, 3, ids, augment, 1, (0, 1))[0]
    parts = [b for r in range(2) for b in rank_micro_batches(data, 3, ids, augment, 2, (r, 2))]
    assert [len(p) for p in parts] == [2, 2, 2, 2] and all(p.epoch == 3 for p in parts)
    assert torch.equal(torch.cat([p.ids for p in parts]), single.ids) and torch.equal(single.ids, ids)
    torch.testing.assert_close(torch.cat([p.inputs for p in parts]), single.inputs, rtol=0, atol=0)
    other_epoch = rank_micro_batches(data, 4, ids, augment, 1, (0, 1))[0]
    assert not torch.equal(other_epoch.inputs, single.inputs)  # a new epoch, new crops


def test_data_crop_box_and_flip():
    g = torch.Generator().manual_seed(0)
    shares = []
    for _ in range(400):
        top, left, h, w = crop_box(30, 50, 0.08, g, whole_pixels=True)
        assert all(isinstance(v, int) for v in (top, left, h, w))
        assert 0 <= top <= 30 - h and 0 <= left <= 50 - w and h * w >= 0.08 * 1500 * 0.75 - 50
        top, left, h, w = crop_box(8, 8, 0.5, g, whole_pixels=False)
        assert 0 <= top <= 8 - h + 1e-9 and 0 <= left <= 8 - w + 1e-9 and 0.5 * 3 / 4 * 64 - 1e-9 <= h * w <= 64
        shares.append(h * w / 64)
    assert 0.45 < min(shares) < 0.55 and max(shares) > 0.95 and 0.65 < np.mean(shares) < 0.8  # spread over [0.5, 1]
    assert center_box(300, 200) == (62, 12, 175, 175)  # shorter side 200 · 224/256
    images = torch.arange(16.0).view(1, 1, 4, 4) / 16
    data = ImageSet(images.expand(64, 1, 4, 4), torch.zeros(64, dtype=torch.long), 1, torch.zeros(1), torch.ones(1))
    out = data.batch(torch.arange(64), epoch=0, augment=Augment(seed=0, hflip=True)).inputs
    flipped = [bool(torch.equal(x, images[0].flip(-1))) for x in out]
    assert all(f or torch.equal(x, images[0]) for f, x in zip(flipped, out, strict=True))
    assert 16 < sum(flipped) < 48  # about half mirrored


def test_data_shift_moves_images_and_split_is_stratified():
    g = torch.Generator().manual_seed(0)
    shifts = torch.tensor([draw_shift(8, 8, 0.0625, g) for _ in range(200)])
    assert shifts.abs().max() <= 0.5 and shifts.abs().max() > 0.45 and draw_shift(8, 8, 0.0, g) == (0.0, 0.0)
    image = torch.zeros(1, 1, 8, 8)
    image[..., 2:6, 3] = 1.0  # a vertical stroke
    data = ImageSet(image.expand(32, 1, 8, 8), torch.zeros(32, dtype=torch.long), 1, torch.zeros(1), torch.ones(1))
    out = data.batch(torch.arange(32), epoch=0, augment=Augment(seed=0, translate=0.125)).inputs
    columns = (out.sum(dim=(1, 2)) * torch.arange(8.0)).sum(-1) / out.sum(dim=(1, 2, 3))  # the stroke's centre
    assert torch.allclose(out.sum(dim=(1, 2, 3)), torch.full((32,), 4.0), atol=1e-4)  # moved, not lost
    assert (columns - 3).abs().max() <= 1 + 1e-4 and (columns - 3).abs().max() > 0.5
    train, val = load_dataset(DataConfig(name="digits"), text=False)
    counts = torch.bincount(val.labels) / torch.bincount(torch.cat([train.labels, val.labels]))
    assert len(val) == 359 and ((counts - 0.2).abs() < 0.02).all()  # each class holds out a fifth


def test_data_rand_augment_ops():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 12, 12, generator=g) * 0.5 + 0.25
    for _ in range(20):
        out = rand_augment(image, 2, 9, g)
        assert out.shape == image.shape and out.min() >= 0 and out.max() <= 1
    from crate_kernels.train import augment

    turned = augment._OPS["rotate"](image, 3.0)  # 90°: nearest sampling lands on pixel centres exactly
    assert any(torch.equal(turned, torch.rot90(image, k, (1, 2))) for k in (1, 3))
    assert torch.equal(augment._OPS["solarize"](image, 0.5), torch.where(image >= 0.5, 1 - image, image))
    narrow = torch.rand(3, 64, 64, generator=g) * 0.2 + 0.4
    stretched = augment._OPS["equalize"](narrow, 0.0)  # spread over the whole range, each level in order
    assert stretched.amin() < 0.05 and stretched.amax() > 0.95
    for before, after in zip(narrow, stretched, strict=True):  # per channel
        assert (torch.diff(after.flatten()[before.flatten().argsort()]) >= 0).all()


def test_data_mixup_and_cutmix_pair_neighbours():
    g = torch.Generator().manual_seed(0)
    x, ids = torch.rand(4, 3, 8, 8, generator=g), torch.tensor([7, 3, 9, 1])
    mixed, partner, lam = mix_pairs(x, ids, 0, 2, mixup=0.8, cutmix=0.0)
    assert partner.tolist() == [1, 0, 3, 2] and ((lam > 0) & (lam < 1)).all()
    torch.testing.assert_close(mixed, lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[partner])
    halves = [mix_pairs(x[lo : lo + 2], ids[lo : lo + 2], 0, 2, 0.8, 0.0)[0] for lo in (0, 2)]
    assert torch.equal(torch.cat(halves), mixed)  # a pair's mix does not depend on the rest of the batch
    mixed, _, lam = mix_pairs(x, ids, 0, 2, mixup=0.0, cutmix=1.0)
    pasted = (mixed != x).any(1).flatten(1).sum(1)  # pixels taken from the partner
    assert torch.equal(pasted.float(), (1 - lam) * 64)
    with pytest.raises(ValueError, match="even number"):
        mix_pairs(x[:3], ids[:3], 0, 2, 0.8, 0.0)


def test_data_text_windows_and_encoding():
    ids = encode_text("héllo\x7f")
    assert decode_text(ids) == "h?llo?" and int(ids.max()) < 127  # 127 stays free for [MASK]
    data = TextSet(torch.arange(21), block_size=5)
    assert len(data) == 4
    batch = data.batch(torch.tensor([1, 3]))
    assert torch.equal(batch.inputs[0], torch.arange(5, 10)) and torch.equal(batch.targets[0], torch.arange(6, 11))
    assert batch.ids.tolist() == [1, 3]


def test_data_embedded_sets():
    train, val = load_dataset(DataConfig(name="digits", val_fraction=0.2), text=False)
    assert train.image_shape == (1, 8, 8) and len(train) + len(val) == 1797 and len(val) == 359
    assert train.num_classes == 10
    train, val = load_dataset(DataConfig(name="lfw", image_size=16), text=False)
    assert train.image_shape == (1, 16, 16) and train.num_classes == 2
    train, val = load_dataset(DataConfig(name="pydoc"), text=True)
    assert train.tokens.numel() > 300_000 and val.tokens.numel() > 50_000


def test_data_cifar_and_text_files(tmp_path):
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


def test_folder_reads_every_size_and_mode_and_names_unreadable_files_once(image_folder):
    """A folder of mixed sizes and modes: every sample comes out (3, 16, 16); a truncated PNG, a corrupt JPEG and a
    text file named .png are replaced in training batches (which keep their size), dropped from held-out ones, and
    named once each however often they are met."""
    root, bad = image_folder
    train, val = load_dataset(DataConfig(name=str(root), image_size=16, val_fraction=0.25), text=False)
    assert isinstance(train, ImageFolder) and train.num_classes == 2 and len(train) + len(val) == 27
    assert train.image_shape == (3, 16, 16)
    cfg = from_flat({"optim.batch_size": 4, "data.crop_scale": 0.3, "data.hflip": True, "data.workers": 0})
    batches = TrainBatches(train, cfg, (0, 1))
    for _ in range(3 * (len(train) // 4)):  # three epochs
        (batch,) = next(batches)
        assert batch.inputs.shape == (4, 3, 16, 16) and torch.isfinite(batch.inputs).all()
    held_out = [b for b, weight in eval_batches(val, 4, (0, 1), cfg) if weight]
    readable = [i for i in range(len(val)) if val.files[int(val.index[i])] not in bad]
    assert torch.cat([b.ids for b in held_out]).tolist() == readable
    met = {name.split(" (")[0] for name in train.unreadable | val.unreadable}
    assert met == {str(p) for p in bad}
    lines = []
    unreadable = UnreadableFiles(train, val)
    ctx = Context("none", 0, 1, torch.device("cpu"))
    assert unreadable.record(ctx, lines.append) == {"unreadable_files": 3}
    assert unreadable.record(ctx, lines.append) == {"unreadable_files": 3}
    assert len(lines) == 3 and all(line.startswith("skipped an unreadable file: ") for line in lines)


def test_folder_decodes_every_mode_to_rgb(tmp_path):
    from PIL import Image

    from crate_kernels.train.folder import decode

    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    expected = torch.from_numpy(rgb).permute(2, 0, 1) / 255
    cases = {
        "rgb.png": (Image.fromarray(rgb), expected),
        "grey.bmp": (Image.fromarray(rgb[..., 0]), (expected[:1]).expand(3, -1, -1)),
        "alpha.png": (Image.fromarray(np.dstack([rgb, rgb[..., :1]])), expected),  # alpha dropped
        "deep.png": (Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), (expected[:1]).expand(3, -1, -1)),
    }
    for name, (image, want) in cases.items():
        image.save(tmp_path / name)
        torch.testing.assert_close(decode(tmp_path / name), want, rtol=0, atol=1e-6, msg=name)
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png", transparency=0)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "print.jpg", quality=95)
    for name in ("palette.png", "print.jpg"):
        decoded = decode(tmp_path / name)
        assert decoded.shape == (3, 7, 9) and (decoded - expected).abs().mean() < 0.1, name


def test_folder_batches_do_not_depend_on_workers_or_resume(image_folder):
    """Decoded in 0 or 2 DataLoader workers, from the start or from a saved position mid-epoch: the same batches."""
    root, _ = image_folder
    train, _ = load_dataset(DataConfig(name=str(root), image_size=12), text=False)
    cfg = from_flat({"optim.batch_size": 6, "optim.grad_accum": 2, "data.crop_scale": 0.08, "data.hflip": True})
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, randaugment=1))
    inline = TrainBatches(train, dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, workers=0)), (0, 1))
    expected = [next(inline) for _ in range(5)]  # 3 steps per epoch: crosses into epoch 1
    workers = TrainBatches(train, dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, workers=2)), (0, 1))
    next(workers)
    state = workers.state_dict()
    assert state == {"epoch": 0, "offset": 6}
    resumed = TrainBatches(train, cfg, (0, 1))
    resumed.load_state_dict(state)
    got = [expected[0], *(next(resumed) for _ in range(4))]
    workers.close()
    for want, have in zip(expected, got, strict=True):
        for a, b in zip(want, have, strict=True):
            assert torch.equal(a.ids, b.ids) and a.epoch == b.epoch and torch.equal(a.inputs, b.inputs)
    assert len({int(i) for step in expected[:3] for b in step for i in b.ids}) == 18  # one epoch: 18 distinct


def test_data_bad_names():
    with pytest.raises(ValueError, match="neither an embedded set"):
        load_dataset(DataConfig(name="/no/such/path"), text=False)
    with pytest.raises(ValueError, match="needs 'pydoc' or a text file"):
        load_dataset(DataConfig(name="digits"), text=True)


def test_folder_without_readable_images_fails_early(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_dataset(DataConfig(name=str(tmp_path)), text=False)
    (tmp_path / "a" / "x.png").write_text("not an image")
    (tmp_path / "a" / "y.png").write_text("not an image")
    with pytest.raises(ValueError, match="no file of this set can be read"):
        load_dataset(DataConfig(name=str(tmp_path), val_fraction=0.5), text=False)


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
