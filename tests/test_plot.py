import json

import pytest
import torch
from PIL import Image

from mnist_dist.plot import confusion_figure, curves_figure, main, mistakes_figure


def fake_run_text(accs, reached=True) -> str:
    epochs = [{"epoch": i + 1, "train_loss": 1 / (i + 1), "train_acc": a - 0.3, "val_loss": 0.8 / (i + 1),
               "val_acc": a} for i, a in enumerate(accs)]
    metrics = {"target_acc": 99.41, "reached_target": reached, "stop_epoch": len(accs), "final_val_acc": accs[-1],
               "epochs": epochs}
    return json.dumps(metrics)


def fake_run(folder, accs, reached=True):
    folder.mkdir()
    (folder / "metrics.json").write_text(fake_run_text(accs, reached))
    return folder


def test_redraws_one_run_into_its_folder(tmp_path, capsys):
    run = fake_run(tmp_path / "a", [97.0, 98.9, 99.3, 99.45])
    main([str(run)])
    with Image.open(run / "curves.png") as png:
        assert png.size[0] >= 1000 and png.size[1] >= 400  # readable at README width


def test_the_curves_are_the_runs_numbers_with_the_target_and_the_stop():
    accs = [97.0, 98.9, 99.3, 99.45]
    m = json.loads(fake_run_text(accs))
    acc_ax, loss_ax = curves_figure({"a": m}).axes
    lines = {line.get_label(): line for line in acc_ax.get_lines()}
    assert list(lines["test"].get_xdata()) == [1, 2, 3, 4] and list(lines["test"].get_ydata()) == accs
    assert list(lines["train"].get_ydata()) == [a - 0.3 for a in accs]
    assert list(lines["target 99.41%"].get_ydata()) == [99.41, 99.41]
    assert [t.get_text() for t in acc_ax.texts] == ["stop: epoch 4, 99.45%"]
    assert [line.get_label() for line in loss_ax.get_lines()][:2] == ["train", "test"]
    assert loss_ax.get_yscale() == "log"
    # A held-out validation set is named as such, and a run that missed the target has no stop mark.
    m.update(validation="5000 held-out training images", reached_target=False)
    acc_ax = curves_figure({"a": m}).axes[0]
    assert "validation" in [line.get_label() for line in acc_ax.get_lines()] and not acc_ax.texts


def test_overlays_several_runs(tmp_path):
    a = fake_run(tmp_path / "a", [97.0, 98.9, 99.45])
    b = fake_run(tmp_path / "b", [96.0, 98.0, 99.0, 99.2], reached=False)
    main([str(a), str(b), "-o", str(tmp_path / "both.png")])
    assert (tmp_path / "both.png").stat().st_size > 10_000


def test_missing_metrics_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code == 2 and "metrics.json" in capsys.readouterr().err


def test_report_figures_draw():
    confusion = torch.eye(10, dtype=torch.long) * 980
    confusion[4, 9] = 7
    assert confusion_figure(confusion).axes[0].get_xlabel() == "predicted"
    fig = mistakes_figure(torch.rand(5, 1, 28, 28), torch.tensor([4, 9, 7, 1, 2]), torch.tensor([9, 4, 1, 7, 7]))
    captions = [t.get_text() for t in fig.axes[0].texts]
    assert captions == ["4 -> 9", "9 -> 4", "7 -> 1", "1 -> 7", "2 -> 7"]
