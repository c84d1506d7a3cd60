"""Tables and figures: PNG files, and one convention (layers ℓ = 1..L, R^c lower = more compressed, sparsity =
fraction of zeros, higher = sparser) in crate-measure's figure, training's figure and the table."""

import pytest
import torch

from crate_kernels import measure, plots
from reference import crate as ref_crate
from tests.utils import seeded


@pytest.fixture(scope="module")
def rows():
    torch.manual_seed(0)
    model = ref_crate.CRATE(
        image_size=8, patch_size=2, num_classes=10, dim=16, depth=3, heads=2, channels=1, dim_head=8
    )
    return measure.layerwise(model, torch.rand(4, 1, 8, 8, generator=seeded(5)))


def _figure_of(monkeypatch, draw) -> list:
    """The axes of the figure ``draw()`` saves."""
    saved = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path, dpi: (saved.append(fig.axes), real_save(fig, path, dpi))[1])
    draw()
    return saved[0]


def test_plots_write_png_files(tmp_path, rows):
    path = plots.plot_layerwise({"init": rows, "again": rows}, tmp_path / "layers.png", title="t")
    maps = torch.rand(3, 4, 4, generator=seeded(6))
    att = plots.plot_attention_maps(maps, torch.rand(3, 32, 32, generator=seeded(7)), tmp_path / "att.png", title="t")
    grid = plots.image_grid([torch.rand(4, 1, 8, 8, generator=seeded(8))] * 2, ["a", "b"], tmp_path / "grid.png")
    run = plots.plot_run([{"step": 1, "train_loss": 2.0, "lr": 1e-3}], rows, tmp_path / "run.png")
    for p in (path, att, grid, run):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["att.png", "grid.png", "layers.png", "run.png"]  # no temp


def test_layerwise_and_training_figures_share_one_convention(tmp_path, monkeypatch, rows):
    measured = _figure_of(monkeypatch, lambda: plots.plot_layerwise({"m": rows}, tmp_path / "a.png"))
    records = [{"step": 1, "train_loss": 2.0, "lr": 1e-3}, {"step": 1, "eval_loss": 2.1, "eval_accuracy": 0.3}]
    trained = _figure_of(monkeypatch, lambda: plots.plot_run(records, rows, tmp_path / "b.png"))[2:]
    for ax_c, ax_s in (measured, trained):
        assert "lower = more compressed" in ax_c.get_ylabel() and "higher = sparser" in ax_s.get_ylabel()
        assert ax_c.get_xlabel() == ax_s.get_xlabel() == "layer ℓ"
        for ax, key in ((ax_c, "compression"), (ax_s, "sparsity")):
            x, y = ax.lines[0].get_data()
            assert list(x) == [1, 2, 3] and list(y) == pytest.approx([r[key] for r in rows])
    curves = _figure_of(monkeypatch, lambda: plots.plot_run(records, [], tmp_path / "c.png"))
    assert [ax.get_ylabel() for ax in curves] == ["loss (lower = better)", "accuracy (higher = better)"]


def test_table_numbers_layers_from_one_and_says_which_way_is_better(rows):
    lines = plots.format_table(rows).splitlines()
    assert "layer ℓ" in lines[0] and "R^c (↓)" in lines[0] and "sparsity (↑)" in lines[0]
    body = [line.split() for line in lines[2:-2]]
    assert [int(cells[0]) for cells in body] == [1, 2, 3]
    assert [float(cells[3]) for cells in body] == pytest.approx([r["sparsity"] for r in rows], abs=1e-4)
    assert "lower = more compressed" in lines[-2] and "higher = sparser" in lines[-1]


def test_shapes_samples_and_mask_overlays(tmp_path):
    images = torch.rand(3, 3, 8, 8)
    masks = torch.zeros(3, 8, 8, dtype=torch.uint8)
    masks[:, 2:5, 2:5] = 2
    painted = plots.overlay_masks(images, masks)
    assert painted.shape == (3, 3, 8, 8)
    assert torch.equal(painted[:, :, 0, 0], images[:, :, 0, 0])  # background untouched
    assert not torch.equal(painted[:, :, 3, 3], images[:, :, 3, 3])
    path = plots.plot_shapes_samples(images, masks, tmp_path / "shapes.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_trend_sentence_reads_the_slopes_and_scores_table():
    def layers(compression, sparsity):
        return [
            {"layer": i + 1, "compression": c, "sparsity": s}
            for i, (c, s) in enumerate(zip(compression, sparsity, strict=True))
        ]

    paper = layers([3.0, 2.0, 1.5], [0.1, 0.3, 0.2])
    assert measure.depth_slopes(paper) == pytest.approx((-0.75, 0.05))
    sentence = plots.format_trend(layers([1.0, 2.0, 3.0], [0.3, 0.2, 0.1]), paper)
    assert sentence.endswith(".") and "\n" not in sentence  # one sentence
    assert "through layers 1..3): the trained model shows it (R^c falls, -0.75 per layer; sparsity rises" in sentence
    assert "at initialisation it does not show it (R^c rises, +1.00 per layer; sparsity falls" in sentence
    flat = plots.format_trend(paper, layers([2.0, 2.0, 2.001], [0.1, 0.2, 0.3]))
    assert "the trained model shows half of it (R^c is flat, +0.00 per layer; sparsity rises" in flat
    scores = [{"model": "crate", "accuracy": 0.98, "fit_s": 30.0}, {"model": "k-NN", "accuracy": 0.5, "fit_s": 0.01}]
    table = plots.format_scores(scores)
    assert table.splitlines()[1].split() == ["crate", "98.00%", "30.00"] and len(table.splitlines()) == 3
