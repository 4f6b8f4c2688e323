"""evaluate.py and predict.py: metrics that agree with the predictions, files, plots, errors, comparisons."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from cnnlab import config
from cnnlab.evaluation import compute_metrics, roc_auc, roc_curve
from tests.conftest import REPO, assert_user_error, make_image_folder, run_cli, run_cli_in_process

SMOKE = "configs/smoke.yaml"


def train_in_process(config_file: str, *overrides: str) -> Path:
    """A run trained in this process (the CLI's own process is tested in test_training.py)."""
    from cnnlab.training import train

    return train(config.resolve([str(REPO / config_file)], list(overrides)), [config_file])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    return train_in_process(SMOKE, f"run.dir={runs}", "run.name=s", "training.epochs=2")


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_metrics_json_agrees_with_metrics_recomputed_from_predictions_csv(smoke_run):
    proc = run_cli("evaluate.py", "--run", str(smoke_run), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = smoke_run / "eval" / "test"
    metrics = json.loads((out / "metrics.json").read_text())
    rows = read_csv(out / "predictions.csv")
    names = metrics["class_names"]
    true = np.array([names.index(r["true_label"]) for r in rows])
    pred = np.array([names.index(r["predicted_label"]) for r in rows])
    p1 = np.array([float(r[f"p_{names[1]}"]) for r in rows])
    size = config.resolve([str(REPO / SMOKE)])["data"]["synthetic_size"]
    assert metrics["num_examples"] == len(rows) == size // 4  # the synthetic test split is a quarter of train
    assert metrics["accuracy"] == pytest.approx((true == pred).mean(), abs=1e-9)
    confusion = np.array(metrics["confusion_matrix"])
    assert confusion.sum() == len(rows)
    for i in range(2):
        for j in range(2):
            assert confusion[i, j] == np.sum((true == i) & (pred == j))
    tp = np.sum((true == 1) & (pred == 1))
    assert metrics["per_class"][names[1]]["precision"] == pytest.approx(tp / np.sum(pred == 1), abs=1e-9)
    assert metrics["per_class"][names[1]]["recall"] == pytest.approx(tp / np.sum(true == 1), abs=1e-9)
    # ROC-AUC as the fraction of (positive, negative) pairs ranked correctly, ties half: brute force
    pos, neg = p1[true == 1], p1[true == 0]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert metrics["roc_auc"] == pytest.approx(pairs, abs=1e-4)  # CSV rounds probabilities to 6 decimals
    p_true = np.where(true == 1, p1, 1 - p1)
    assert metrics["log_loss"] == pytest.approx(-np.log(np.clip(p_true, 1e-7, 1)).mean(), abs=1e-4)
    for name in ("confusion_matrix.png", "roc.png", "worst_mistakes.png", "training_curves.png"):
        assert (out / name).stat().st_size > 1000
    assert "accuracy" in proc.stdout and f"Wrote {out / 'metrics.json'}" in proc.stdout


def test_evaluation_goes_to_tensorboard_under_eval(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not (smoke_run / "eval" / "test" / "metrics.json").exists():
        assert run_cli("evaluate.py", "--run", str(smoke_run), timeout=120).returncode == 0
    acc = EventAccumulator(str(smoke_run / "logs" / "eval"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert "eval/test/accuracy" in tags and "eval/test/confusion_matrix" in tags
    import tensorflow as tf

    logged = float(tf.make_ndarray(acc.Tensors("eval/test/accuracy")[-1].tensor_proto))
    assert logged == pytest.approx(json.loads((smoke_run / "eval/test/metrics.json").read_text())["accuracy"])


def test_flip_tta_changes_the_probabilities(smoke_run, tmp_path, capsys):
    for name, *flag in (("plain",), ("tta", "--tta")):
        args = ("--run", str(smoke_run), *flag, "--out", str(tmp_path / name))
        assert run_cli_in_process(capsys, "evaluate.py", *args).returncode == 0
    plain = [float(r["probability"]) for r in read_csv(tmp_path / "plain" / "predictions.csv")]
    tta = [float(r["probability"]) for r in read_csv(tmp_path / "tta" / "predictions.csv")]
    assert len(plain) == len(tta) and not np.allclose(plain, tta)
    assert json.loads((tmp_path / "tta" / "metrics.json").read_text())["tta"] is True


def test_several_runs_print_one_comparison_table(smoke_run, tmp_path, capsys):
    second = train_in_process(SMOKE, f"run.dir={tmp_path}", "run.name=t", "training.epochs=1",
                              "model.standard.filters=[4,8]")
    proc = run_cli_in_process(capsys, "evaluate.py", "--run", str(smoke_run), "--run", str(second))
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[-2:]}
    assert set(table) == {"s", "t"}
    for name in ("s", "t"):
        metrics = json.loads((Path(smoke_run.parent if name == "s" else tmp_path) / name / "eval/test/metrics.json")
                             .read_text())
        assert float(table[name][3]) == pytest.approx(metrics["accuracy"], abs=1e-4)
        assert int(table[name][2].replace(",", "")) == metrics["params"]


def test_roc_helpers_on_known_cases():
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    fpr, tpr = roc_curve(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    m = compute_metrics(np.array([0, 1, 2, 2]), np.eye(3)[[0, 2, 2, 1]], ["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 0, 1], [0, 1, 1]] and "roc_auc" not in m


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory, shared_data) -> Path:
    """The smoke config's tiny CNN trained on the shared photos at 48x48 for 4 epochs: 52-61% val, in seconds."""
    runs = tmp_path_factory.mktemp("photo_runs")
    return train_in_process(SMOKE, "data.source=folder", f"data.path={shared_data}", "data.image_size=[48,48]",
                            "training.epochs=4", f"run.dir={runs}", "run.name=p", "runtime.log_histograms=false")


def test_evaluating_a_run_on_the_shared_photos_writes_every_file(photo_run, capsys):
    proc = run_cli_in_process(capsys, "evaluate.py", "--run", str(photo_run), "--split", "val")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = photo_run / "eval" / "val"
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion_matrix.png", "metrics.json", "predictions.csv", "roc.png", "training_curves.png",
        "worst_mistakes.png"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_examples"] == 1000 and metrics["class_names"] == ["cats", "dogs"]
    trained = json.loads((photo_run / "metrics.json").read_text())  # every shared photo decoded and used
    assert trained["num_train"] == 2000 and trained["num_val"] == 1000
    assert sum(map(sum, metrics["confusion_matrix"])) == 1000
    assert {Path(r["file"]).parent.name for r in read_csv(out / "predictions.csv")} == {"cats", "dogs"}
    # the folder has no test split: asking for it falls back to val with a notice
    proc = run_cli_in_process(capsys, "evaluate.py", "--run", str(photo_run), "--out", str(photo_run / "fallback"))
    assert "no test split; evaluating on val" in proc.stdout
    assert json.loads((photo_run / "fallback" / "metrics.json").read_text())["split"] == "val"


def test_predict_on_a_folder_gives_the_same_probabilities_as_evaluate(photo_run, shared_data, tmp_path, capsys):
    val_eval = photo_run / "eval" / "val" / "predictions.csv"
    if not val_eval.exists():
        assert run_cli_in_process(capsys, "evaluate.py", "--run", str(photo_run), "--split", "val").returncode == 0
    expected = {r["file"]: float(r["p_dogs"]) for r in read_csv(val_eval)}
    proc = run_cli_in_process(capsys, "predict.py", str(shared_data / "val"), "--run", str(photo_run), "--csv",
                              str(tmp_path / "p.csv"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = {r["file"]: float(r["p_dogs"]) for r in read_csv(tmp_path / "p.csv")}
    assert set(got) == set(expected)
    assert max(abs(got[f] - expected[f]) for f in got) < 1e-5
    first = sorted(got)[0]
    assert f"{first}" in proc.stdout


def test_an_int8_export_predicts_the_keras_models_class_on_the_shared_val_photos(photo_run, tmp_path, capsys):
    proc = run_cli_in_process(capsys, "export.py", "--run", str(photo_run), "--format", "tflite_int8", "--out",
                              str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for source in (["--run", str(photo_run)], ["--model", str(tmp_path / "tflite_int8")]):
        proc = run_cli_in_process(capsys, "evaluate.py", *source, "--split", "val", "--out",
                                  str(tmp_path / source[0][2:]))
        assert proc.returncode == 0, proc.stderr[-3000:]
    keras_rows, int8_rows = (read_csv(tmp_path / name / "predictions.csv") for name in ("run", "model"))
    assert [r["file"] for r in keras_rows] == [r["file"] for r in int8_rows] and len(keras_rows) == 1000
    same = np.mean([k["predicted_label"] == q["predicted_label"] for k, q in zip(keras_rows, int8_rows)])
    assert same >= 0.97, same
    keras_acc, int8_acc = (json.loads((tmp_path / name / "metrics.json").read_text())["accuracy"]
                           for name in ("run", "model"))
    assert abs(int8_acc - keras_acc) <= 0.02
    # the agreement means something: the model's probabilities spread and it says both classes
    p_keras = np.array([float(r["p_dogs"]) for r in keras_rows])
    assert p_keras.std() > 0.02 and {r["predicted_label"] for r in keras_rows} == {"cats", "dogs"}
    # int8 is not the float model: its probabilities differ, a little
    diffs = np.abs(p_keras - np.array([float(r["p_dogs"]) for r in int8_rows]))
    assert 1e-4 < diffs.max() < 0.25


def test_bad_inputs_are_one_line_errors(smoke_run, tmp_path, capsys):
    # The same `main` through `cli.run` in this process, as `python evaluate.py ...` runs it (a real process of each
    # CLI runs in the tests above and below).
    def evaluate(*args):
        return run_cli_in_process(capsys, "evaluate.py", *args)

    def predict(*args):
        return run_cli_in_process(capsys, "predict.py", *args)

    assert_user_error(evaluate("--checkpoint", str(tmp_path / "none.keras"), "--config", SMOKE), "no such file")
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    assert_user_error(predict(str(text), "--run", str(smoke_run)), "notes.jpg is not a readable image")

    assert_user_error(evaluate("--run", str(tmp_path)), "is not a run directory")
    best = str(smoke_run / "checkpoints" / "best.keras")
    assert_user_error(evaluate("--checkpoint", best, "--config", SMOKE, "--set", "data.image_size=[40,40]"),
                      "takes 32x32 images", "data.image_size is [40, 40]")
    assert_user_error(evaluate("--checkpoint", best, "--config", SMOKE, "--set", "data.synthetic_classes=3"),
                      "predicts 2 classes", "has 3")
    empty = tmp_path / "empty"
    (empty / "train" / "cats").mkdir(parents=True)
    (empty / "train" / "dogs").mkdir(parents=True)
    assert_user_error(evaluate("--run", str(smoke_run), "--set", "data.source=folder", "--set", f"data.path={empty}"),
                      "holds no images")
    classless = tmp_path / "classless"
    classless.mkdir()
    assert_user_error(evaluate("--run", str(smoke_run), "--set", "data.source=folder",
                               "--set", f"data.path={classless}"), "holds no class sub-folders")
    assert_user_error(predict(str(tmp_path / "nothing"), "--run", str(smoke_run)), "no such file")
    assert_user_error(predict(str(empty), "--run", str(smoke_run)), "holds no images")


def test_predict_labels_with_the_runs_class_names_and_skips_unreadable_files(smoke_run, tmp_path):
    make_image_folder(tmp_path / "imgs", splits=("",), classes=("x",), per_class=3, size=32)
    (tmp_path / "imgs" / "x" / "broken.png").write_text("nope")
    proc = run_cli("predict.py", str(tmp_path / "imgs"), "--run", str(smoke_run))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("orientation_")]
    assert len(lines) == 3 and "skipped: " in proc.stderr and "broken.png is not a readable image" in proc.stderr


def test_predict_averages_with_the_mirror_image_where_the_run_validated_that_way(smoke_run, tmp_path, capsys):
    make_image_folder(tmp_path / "imgs", splits=("",), classes=("x",), per_class=3, size=32)
    flip_run = tmp_path / "flip_run"  # the same weights, in a run that validated with augment.tta: flip
    shutil.copytree(smoke_run, flip_run)
    saved = yaml.safe_load((flip_run / "config.yaml").read_text())
    saved["augment"]["tta"] = "flip"
    (flip_run / "config.yaml").write_text(yaml.safe_dump(saved))

    def probabilities(run, *args):
        out = tmp_path / "p.csv"
        proc = run_cli_in_process(capsys, "predict.py", str(tmp_path / "imgs"), "--run", str(run), "--csv", str(out),
                                  *args)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return np.array([[float(r[k]) for k in r if k.startswith("p_")] for r in read_csv(out)])

    averaged = probabilities(flip_run)
    assert np.allclose(averaged, probabilities(smoke_run, "--tta"), atol=1e-6)
    assert np.allclose(probabilities(flip_run, "--no-tta"), probabilities(smoke_run), atol=1e-6)
    assert not np.allclose(averaged, probabilities(smoke_run), atol=1e-4)
