"""benchmarks/ablation.py's table: every difference is judged against the recipe's seed-to-seed range."""

import json
from pathlib import Path

import pytest

from tests._benchmarks import load_benchmark


@pytest.fixture(scope="module")
def ablation():
    return load_benchmark("ablation")


def _kept_run(results: Path, ablation, variant: str, seed: int, knn: float, linear: float | None, rate: int):
    folder = results / ablation.slug(variant) / f"seed{seed}"
    folder.mkdir(parents=True)
    history = [{"epoch": 15, "knn_top1": knn - 0.1}, {"epoch": 30, "knn_top1": knn}]
    (folder / "eval.json").write_text(json.dumps({"knn_top1": knn, "history": history}))
    if linear is not None:
        (folder / "linear.json").write_text(json.dumps({"linear_top1": linear}))
    (folder / "run.json").write_text(json.dumps({"variant": variant, "seed": seed, "median_images_per_s": rate}))


def _rows(text: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_the_table_states_differences_against_the_recipes_seed_range(ablation, tmp_path, capsys):
    # recipe kNN 50 / 51 / 52 % (range 2.00, mean 51.00), linear 55 / 55.5 / 56 % (range 1.00, mean 55.50)
    for seed, (knn, lin) in enumerate([(0.50, 0.55), (0.51, 0.555), (0.52, 0.56)]):
        _kept_run(tmp_path, ablation, ablation.RECIPE, seed, knn, lin, rate=400 + seed)
    _kept_run(tmp_path, ablation, "no smoothing", 0, 0.525, 0.54, rate=500)         # +1.50 kNN, -1.50 linear
    _kept_run(tmp_path, ablation, "K=1 eps=0.2", 0, 0.49, None, rate=441)
    _kept_run(tmp_path, ablation, "K=1 eps=0.2", 1, 0.49, None, rate=444)            # median img/s 442.5
    _kept_run(tmp_path, ablation, "no raw-feature init", 0, 0.48, None, rate=450)   # -3.00 kNN, no probe
    ablation.report(ablation.load(tmp_path), tmp_path, "title")
    rows = _rows(capsys.readouterr().out)

    assert rows["recipe"] == ["0,1,2", "51.00 (50.00-52.00)", "seed range 2.00", "55.50 (55.00-56.00)",
                              "seed range 1.00", "401"]
    assert rows["no smoothing"] == ["0", "52.50", "+1.50 no measurable effect", "54.00", "-1.50", "500"]
    assert rows["no raw-feature init"] == ["0", "48.00", "-3.00", "", "", "450"]
    assert rows["K=1 eps=0.2"][-1] == "442"   # a median of two runs' rates is printed as a whole number
    assert list(rows) == ["recipe", "no smoothing", "no raw-feature init", "K=1 eps=0.2"]   # the study's order
    assert (tmp_path / "knn_curves.png").stat().st_size > 0


def test_with_one_recipe_seed_no_difference_is_called_an_effect(ablation, tmp_path, capsys):
    _kept_run(tmp_path, ablation, ablation.RECIPE, 0, 0.50, None, rate=400)
    _kept_run(tmp_path, ablation, "K=1 eps=0.2", 0, 0.45, None, rate=400)
    ablation.report(ablation.load(tmp_path), tmp_path, "title")
    rows = _rows(capsys.readouterr().out)
    assert rows["recipe"][2] == ""
    assert rows["K=1 eps=0.2"][2] == "-5.00 (one recipe seed: no spread yet)"
