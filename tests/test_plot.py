import json

import pytest
import torch
from PIL import Image

from mnist_dist.plot import confusion_figure, main, mistakes_figure


def fake_run(folder, accs, reached=True):
    folder.mkdir()
    epochs = [{"epoch": i + 1, "train_loss": 1 / (i + 1), "train_acc": a - 0.3, "val_loss": 0.8 / (i + 1),
               "val_acc": a} for i, a in enumerate(accs)]
    metrics = {"target_acc": 99.41, "reached_target": reached, "stop_epoch": len(accs), "final_val_acc": accs[-1],
               "epochs": epochs}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_redraws_one_run_into_its_folder(tmp_path, capsys):
    run = fake_run(tmp_path / "a", [97.0, 98.9, 99.3, 99.45])
    main([str(run)])
    with Image.open(run / "curves.png") as png:
        assert png.size[0] >= 1000 and png.size[1] >= 400  # readable at README width


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
