"""Config: defaults, layering of files and --set, and validation that names the file, key and bad value."""

from pathlib import Path

import pytest
import yaml

from cnnlab import config
from cnnlab.errors import UserError
from cnnlab.runs import config_for_training
from tests.conftest import REPO, assert_user_error, run_cli_in_process


def write(tmp_path: Path, name: str, data: dict) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_resolve_and_every_config_in_the_repo_is_valid(tmp_path):
    assert config.resolve([])["data"]["source"] == "tfds"
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(configs) >= 2
    for path in configs:
        # Folder configs name the folder a user unpacks the photos into; here it need not exist.
        is_folder = (yaml.safe_load(path.read_text()) or {}).get("data", {}).get("source") == "folder"
        config.resolve([str(path)], [f"data.path={tmp_path}"] if is_folder else [])


def test_later_files_and_set_overrides_win_in_order(tmp_path):
    a = write(tmp_path, "a.yaml", {"data": {"batch_size": 8, "image_size": [64, 64]}, "training": {"epochs": 3}})
    b = write(tmp_path, "b.yaml", {"data": {"batch_size": 16}})
    cfg = config.resolve([a, b], ["training.epochs=5", "data.image_size=[48, 40]", "training.epochs=7"])
    assert cfg["data"]["batch_size"] == 16          # b overrides a
    assert cfg["data"]["image_size"] == [48, 40]    # --set parsed as YAML
    assert cfg["training"]["epochs"] == 7           # the last --set wins
    assert cfg["training"]["optimizer"] == config.load_defaults()["training"]["optimizer"]  # untouched default


def test_experiment_files_state_only_what_differs_from_the_defaults():
    defaults = config.load_defaults()

    def same_as_default(data, base, prefix=""):
        for key, value in data.items():
            if isinstance(value, dict):
                yield from same_as_default(value, base[key], f"{prefix}{key}.")
            elif value == base[key]:
                yield f"{prefix}{key}"

    for path in sorted((REPO / "configs").rglob("*.yaml")):
        if path.name == "defaults.yaml":
            continue
        redundant = list(same_as_default(yaml.safe_load(path.read_text()) or {}, defaults))
        assert not redundant, f"{path.name} repeats defaults: {redundant}"


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("data.sorce=folder", ["unknown key 'data.sorce'", "did you mean 'data.source'"]),
        ("data.batch_size=0", ["data.batch_size must be an integer >= 1", "Received: 0"]),
        ("data.batch_size=abc", ["data.batch_size", "Received: 'abc'"]),
        ("training.learning_rate=-1", ["training.learning_rate must be a number > 0"]),
        ("data.validation_split=1.5", ["data.validation_split must be a number in (0, 1)"]),
        ("data.source=web", ["data.source must be one of 'tfds', 'folder', 'synthetic'", "Received: 'web'"]),
        ("model.standard.padding=full", ["model.standard.padding must be one of 'same', 'valid'"]),
        ("model.standard.filters=[8, -1]", ["model.standard.filters"]),
        ("data.image_size=[1,2,3]", ["data.image_size must be [height, width]"]),
        ("runtime.precision=float8", ["runtime.precision must be one of"]),
        ("augment.test_crop_fraction=1.5", ["augment.test_crop_fraction must be a number in (0, 1], or null",
                                            "Received: 1.5"]),
        ("augment.test_crop_fraction=0.8", ["augment.test_crop_fraction needs augment.crop", "Received: 0.8"]),
        ("training.downsize.sizes=[4]", ["training.downsize.sizes must be a list of network input heights, each an "
                                         "integer >= 8", "Received: [4]"]),
        ("training.downsize.min_epochs=0", ["training.downsize.min_epochs must be an integer >= 1", "Received: 0"]),
        ("augment.tta=crops", ["augment.tta must be one of 'none', 'flip'", "Received: 'crops'"]),
        ("model.standard.kernel_initializer=bogus", ["model.standard.kernel_initializer must be a Keras initializer",
                                                     "Received: 'bogus'"]),
        ("model.separable.kernel_initializer={stddev: 1}", ["must be an initializer name or {class_name"]),
    ],
)
def test_bad_values_name_the_flag_key_and_value(override, fragments):
    with pytest.raises(UserError) as info:
        config.resolve([str(REPO / "configs" / "smoke.yaml")], [override])
    message = str(info.value)
    assert message.startswith(f"--set {override}:")
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_a_bad_value_in_a_file_names_that_file(tmp_path):
    bad = write(tmp_path, "bad.yaml", {"training": {"epochs": "many"}})
    with pytest.raises(UserError, match=r"bad\.yaml: training\.epochs must be an integer >= 1\. Received: 'many'"):
        config.resolve([bad])


def test_unknown_nested_key_in_a_file_suggests_the_closest(tmp_path):
    bad = write(tmp_path, "bad.yaml", {"model": {"standard": {"kernal_size": 5}}})
    with pytest.raises(UserError, match=r"bad\.yaml: unknown key 'model\.standard\.kernal_size'; did you mean "
                                        r"'model\.standard\.kernel_size'"):
        config.resolve([bad])


def test_folder_source_needs_a_path_and_only_the_machine_check_needs_it_to_exist(tmp_path):
    with pytest.raises(UserError, match="data.path is not set"):
        config.resolve([], ["data.source=folder"])
    cfg = config.resolve([], ["data.source=folder", f"data.path={tmp_path / 'missing'}"])  # a config is just text
    with pytest.raises(UserError, match="data.path must be an existing folder"):
        config.check_environment(cfg)
    (tmp_path / "missing").mkdir()
    config.check_environment(cfg)


def test_a_transfer_weights_file_is_checked_on_the_machine_not_in_the_config(tmp_path):
    cfg = config.resolve([str(REPO / "configs/cats_vs_dogs_vgg16.yaml")],
                         [f"model.transfer.weights={tmp_path / 'w.h5'}"])
    with pytest.raises(UserError, match="model.transfer.weights must be 'imagenet', null or an existing"):
        config.check_environment(cfg)
    (tmp_path / "w.h5").write_bytes(b"")
    config.check_environment(cfg)


@pytest.mark.parametrize("value", [0, -1, ".inf", "ten"])
def test_time_budget_must_be_a_positive_number_of_minutes(value):
    with pytest.raises(UserError, match="training.time_budget must be a number of minutes > 0, or null"):
        config.resolve([], [f"training.time_budget={value}"])


def test_resume_dir_without_config_is_refused(tmp_path):
    with pytest.raises(UserError, match="is not a run directory"):
        config_for_training([], [], str(tmp_path))


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--config", "configs/smoke.yaml", "--set", "data.batch_size=-4"], ["data.batch_size", "Received: -4"]),
        (["--config", "configs/smoke.yaml", "--set", "data.sorce=x"], ["did you mean 'data.source'"]),
        (["--config", "missing.yaml"], ["missing.yaml: config file not found"]),
        (["--config", "configs/smoke.yaml", "--set", "data.source=folder", "--set", "data.path=/no/such/dir"],
         ["data.path must be an existing folder", "/no/such/dir"]),
        (["--config", "configs/smoke.yaml", "--set", "nodot"], ["--set nodot: expected key.sub=value"]),
        (["--resume", "/no/such/run"], ["/no/such/run is not a run directory"]),
        ([], ["give --config FILE"]),
    ],
)
def test_train_cli_rejects_bad_input_with_one_line_and_exit_2(args, fragments, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert_user_error(run_cli_in_process(capsys, "train.py", *args), *fragments)


def test_train_cli_rejects_invalid_yaml_with_its_line(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("data:\n  batch_size: [1, 2\n")
    assert_user_error(run_cli_in_process(capsys, "train.py", "--config", str(bad)), "broken.yaml: not valid YAML",
                      "line")


def test_print_config_prints_the_resolved_config(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    proc = run_cli_in_process(capsys, "train.py", "--config", "configs/smoke.yaml", "--set", "training.epochs=2",
                              "--print-config")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed == config.resolve([str(REPO / "configs/smoke.yaml")], ["training.epochs=2"])
