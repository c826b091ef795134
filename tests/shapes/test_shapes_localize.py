"""The localization benchmark (``attnscope shapes localize``) and the segmentation-folder harness
(``attnscope localize``) on the bundled shapes model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from attnscope.cli import main
from attnscope.dataset import DatasetError, read_folder
from attnscope.segmentation import mean_scores, score_pair
from attnscope.shapes import localize as benchmark
from attnscope.shapes.render import render_scene


def test_pair_scores_against_hand_counts() -> None:
    truth = np.zeros((4, 4), bool)
    truth[:2, :2] = True
    heat = truth.astype(float) * 0.9 + 0.05
    heat[3, 3] = 0.99  # one background pixel ranked above the object
    predicted = heat > 0.5
    scores = score_pair(heat, predicted, truth)
    assert scores.iou == pytest.approx(4 / 5) and scores.pixel_acc == pytest.approx(15 / 16)
    # the 4 tied object pixels form one threshold step: precision 4/5 at recall 1
    assert scores.auroc == pytest.approx(1 - 4 / (4 * 12)) and scores.ap == pytest.approx(0.8)
    empty = score_pair(heat, predicted, np.zeros((4, 4), bool))
    assert np.isnan(empty.ap) and np.isnan(empty.auroc)
    table = mean_scores([scores, empty])
    assert table["pairs"] == 2 and table["map"] == pytest.approx(scores.ap)


def test_benchmark_writes_its_tables_and_figures(tmp_path, monkeypatch, one_thread) -> None:
    # A small slice of the protocol: one scene per object count, one flow time, two prompts at one seed.
    monkeypatch.setattr(benchmark, "RENDERED_PER_COUNT", 1)
    monkeypatch.setattr(benchmark, "EXPLAIN_TS", (0.2, 0.3))
    monkeypatch.setattr(benchmark, "GENERATED_SEEDS", (500,))
    monkeypatch.setattr("attnscope.shapes.metrics.TWO_OBJECT_PROMPTS",
                        ("a red circle and a blue square", "a red circle and a red square"))
    out = tmp_path / "localize"
    assert main(["shapes", "localize", "--out", str(out)]) == 0
    result = json.loads((out / "localize.json").read_text())
    assert result["protocol"] == benchmark.LOCALIZE_PROTOCOL and result["readout"]["threshold"] == 0.55
    rendered = result["rendered"]["0.3"]
    assert {"default", "naive", "raw.double-mean", "raw.best", "output-space", "raw.double.3",
            "raw.single.1"} <= set(rendered)
    assert rendered["default"]["pairs"] == rendered["raw.double.0"]["pairs"] >= 6
    assert rendered["default"]["miou"] > 0.6 and rendered["default"]["auroc"] > 0.95
    assert rendered["raw.best"]["layer"] in {k.removeprefix("raw.") for k in rendered}
    generated = result["generated"]
    assert generated["all"]["default"]["pairs"] > generated["same-colour"]["default"]["pairs"] > 0
    assert (generated["same-colour/colour-words"]["default"]["pairs"]
            + generated["same-colour/shape-words"]["default"]["pairs"]) == generated["same-colour"]["default"]["pairs"]
    assert 0 < generated["all"]["output-space"]["pairs"] <= 7  # red, circle, blue, square; red, circle, square
    assert len(result["generated_by_step"]["miou"]) == 20
    assert {"localize_layers.png", "localize_steps.png", "sample_0.png"} <= {p.name for p in out.iterdir()}


def _binary_folder(root, n: int = 3):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    lines = []
    for i in range(n):
        scene = render_scene(100 + i, n_objects=1)
        obj = scene.objects[0]
        Image.fromarray(scene.image).resize((64, 64), Image.NEAREST).save(root / "images" / f"im{i}.png")
        Image.fromarray(obj.mask.astype(np.uint8) * 255).resize((64, 64), Image.NEAREST).save(
            root / "masks" / f"im{i}.png")
        lines.append(f"im{i} {obj.shape}")
    (root / "classes.txt").write_text("\n".join(lines) + "\n")
    return root


def _voc_folder(root):
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    image = np.full((48, 48, 3), 200, np.uint8)
    classes = np.zeros((48, 48), np.uint8)
    classes[5:20, 5:20] = 8  # cat
    classes[30:40, 30:40] = 12  # dog
    classes[0, :] = 255  # void border
    Image.fromarray(image).save(root / "JPEGImages" / "2007_000001.jpg")
    palette = Image.fromarray(classes, mode="P")
    palette.putpalette([v for i in range(256) for v in (i, i, i)])
    palette.save(root / "SegmentationClass" / "2007_000001.png")
    return root


def test_folders_in_both_layouts_are_read(tmp_path) -> None:
    binary = read_folder(_binary_folder(tmp_path / "binary"))
    assert [item.label for item in binary] == [render_scene(100 + i, n_objects=1).objects[0].shape for i in range(3)]
    assert binary[0].image.shape == (64, 64, 3) and binary[0].mask.dtype == bool and binary[0].mask.any()
    voc = read_folder(_voc_folder(tmp_path / "voc"))
    assert [item.label for item in voc] == ["cat", "dog"]
    assert voc[0].mask.sum() == 15 * 15 and voc[1].mask.sum() == 100


def test_bad_folders_are_one_clear_error(tmp_path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        read_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="neither layout"):
        read_folder(tmp_path / "empty")
    folder = _binary_folder(tmp_path / "missing")
    (folder / "masks" / "im1.png").unlink()
    with pytest.raises(DatasetError, match="mask of 'im1' is missing"):
        read_folder(folder)
    (folder / "classes.txt").unlink()
    with pytest.raises(DatasetError, match="no classes.txt"):
        read_folder(folder)


def test_localize_command_scores_a_folder(tmp_path, capsys, one_thread) -> None:
    folder = _binary_folder(tmp_path / "data")
    out = tmp_path / "out"
    code = main(["localize", "--dataset", str(folder), "--prompt-template", "a {}",
                 "--competitors", "circle,square,triangle", "--samples", "2", "--out", str(out)])
    assert code == 0
    record = json.loads((out / "localize.json").read_text())
    assert record["items"] == 3 and record["size"] == 32
    assert record["raw"]["pairs"] == record["output-space"]["pairs"] == 3
    assert record["raw"]["miou"] > 0.6
    assert set(record["per_class"]) == {item.label for item in read_folder(folder)}

    (folder / "masks" / "im2.png").unlink()
    assert main(["localize", "--dataset", str(folder), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "im2" in err and not (tmp_path / "never").exists()
