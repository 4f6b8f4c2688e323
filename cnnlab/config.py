"""Configuration: defaults, YAML files, `--set` overrides and validation.

The defaults live in one file, `configs/defaults.yaml`, which doubles as the reference listing every key. A resolved
config is built in three layers, later ones winning:

    configs/defaults.yaml  <-  each --config file, in order  <-  each --set key.sub=value, in order

Every value remembers where it came from, so a bad value is reported as, for example:

    configs/mine.yaml: data.batch_size must be an integer >= 1. Received: 0

Example:

    >>> cfg = resolve(["configs/smoke.yaml"], ["training.epochs=1"])
    >>> cfg["training"]["epochs"]
    1
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from cnnlab.errors import UserError

DEFAULTS_FILE = Path(__file__).resolve().parent.parent / "configs" / "defaults.yaml"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, made strict where a config file can go wrong quietly or slowly.

    YAML 1.1 reads `1e-5` (no dot) as a string; people write learning rates that way, so it reads as a float. A key
    given twice in one mapping is an error (PyYAML keeps the last one silently). Aliases are limited, so a small
    file cannot expand into billions of nodes ("billion laughs").
    """

    MAX_ALIASES = 100

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases = getattr(self, "_aliases", 0) + 1
            if self._aliases > self.MAX_ALIASES:
                raise yaml.composer.ComposerError(None, None, f"more than {self.MAX_ALIASES} aliases (*name)",
                                                  self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+][0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _load_yaml(text_or_file):
    return yaml.load(text_or_file, Loader=_Loader)


def load_defaults() -> dict:
    """Returns a fresh copy of the defaults from `configs/defaults.yaml`."""
    with open(DEFAULTS_FILE) as f:
        return _load_yaml(f)


def leaf_keys() -> dict[str, list[str]]:
    """Each key name of the defaults (`epochs`) with the dotted keys that end in it, shallowest only
    (`["training.epochs"]`, not `training.fine_tune.epochs`): what a user most likely meant by `--epochs`."""
    found: dict[str, list[str]] = {}

    def walk(section: dict, prefix: str) -> None:
        for key, value in section.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                found.setdefault(key, []).append(f"{prefix}{key}")

    walk(load_defaults(), "")
    return {k: [d for d in v if d.count(".") == min(x.count(".") for x in v)] for k, v in found.items()}


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{path}: config file not found.")
    try:
        with open(path) as f:
            data = _load_yaml(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must hold a mapping of sections. Received: {type(data).__name__}")
    return data


def _closest(key: str, candidates: Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def _merge(base: dict, override: dict, origin: str, origins: dict, prefix: str = "") -> None:
    """Merges `override` into `base` in place, refusing keys `base` does not have."""
    for key, value in override.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            allowed = [f"{prefix}{k}" for k in base]
            raise UserError(f"{origin}: unknown key '{dotted}'{_closest(dotted, allowed)}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise UserError(f"{origin}: {dotted} must be a mapping of keys. Received: {value!r}")
            _merge(base[key], value, origin, origins, dotted + ".")
        else:
            base[key] = value
            origins[dotted] = origin


def parse_set(item: str) -> tuple[str, Any]:
    """Parses one `--set key.sub=value` into its dotted key and YAML-parsed value."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item}: expected key.sub=value.")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(dotted: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Validation. Types come from the defaults; the rules below add what a type cannot say (choices, ranges, nulls).
# A rule returns None when the value is fine, else the "must be ..." phrase. Keys with `*` match any family.


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _choice(*allowed: str) -> Callable:
    return lambda v: None if v in allowed else "one of " + ", ".join(repr(a) for a in allowed)


def _int_at_least(low: int) -> Callable:
    return lambda v: None if _is_int(v) and v >= low else f"an integer >= {low}"


def _num_at_least(low: float) -> Callable:
    return lambda v: None if _is_num(v) and v >= low else f"a number >= {low}"


def _num_in(low: float, high: float, low_open=False, high_open=True, nullable=False) -> Callable:
    def rule(v):
        if v is None and nullable:
            return None
        ok = _is_num(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        return None if ok else (f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
                                + (", or null" if nullable else ""))

    return rule


def _size(nullable: bool) -> Callable:
    def rule(v):
        if v is None and nullable:
            return None
        if _is_int(v) and v >= 1:
            return None
        if isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= 1 for x in v):
            return None
        return "[height, width] (or one integer) of positive integers" + (", or null" if nullable else "")

    return rule


def _range_pair(low: float, high: float | None, nullable: bool) -> Callable:
    """A `[lo, hi]` pair with low < lo <= hi (<= high when given)."""

    def rule(v):
        if v is None and nullable:
            return None
        if (isinstance(v, list) and len(v) == 2 and all(_is_num(x) for x in v) and low < v[0] <= v[1]
                and (high is None or v[1] <= high)):
            return None
        bound = f"{low} < lo <= hi" + (f" <= {high}" if high is not None else "")
        return f"a pair [lo, hi] with {bound}" + (", or null" if nullable else "")

    return rule


def _optional_str(v):
    return None if v is None or isinstance(v, str) else "a string or null"


def _run_name(v) -> str | None:
    """A run's folder name under run.dir: one plain name, so that nothing a user types reaches outside run.dir."""
    if v is None:
        return None
    plain = (isinstance(v, str) and v.strip() == v and v not in ("", ".", "..") and not re.search(r"[/\\\x00]", v)
             and not v.startswith("~"))
    return None if plain else "a plain folder name (no '/', '\\', '..' or leading '~'), or null"


def _cache(v) -> str | None:
    """`memory`, `none`, or the path of a cache file (a name with a '/' or ending in .cache), so that a misspelt
    `memroy` is not taken for a cache file in the working folder."""
    if v in ("memory", "none") or (isinstance(v, str) and ("/" in v or v.endswith(".cache"))):
        return None
    return "'memory', 'none' or a cache file path (with a '/' or ending in .cache)"


def _positive_number(v):
    return None if _is_num(v) and v > 0 else "a number > 0"


def _initializer(v) -> str | None:
    """A Keras initializer: a name (`he_normal`) or a serialized one (`{class_name: RandomNormal, config: {...}}`)."""
    import keras  # only for the config-checking of this one key

    if not isinstance(v, (str, dict)) or (isinstance(v, dict) and "class_name" not in v):
        return "an initializer name or {class_name: ..., config: {...}}"
    try:
        keras.initializers.get(v)
    except (ValueError, TypeError) as e:
        return f"a Keras initializer ({str(e).splitlines()[0][:80]})"
    return None


def _per_stage(check: Callable, unit: str = "stage") -> Callable:
    """A model key that takes one value for every stage, or a list with one value per stage."""

    def rule(v):
        values = v if isinstance(v, list) else [v]
        if not values:
            return "a value or a non-empty list"
        for item in values:
            problem = check(item)
            if problem:
                return f"{problem} (or a list of them, one per {unit})"
        return None

    return rule


def _per_conv(check: Callable) -> Callable:
    """A stem key: one value, or a list with one value per stem conv."""
    return _per_stage(check, unit="stem conv")


RULES: dict[str, Callable] = {
    "data.source": _choice("tfds", "folder", "synthetic"),
    "data.data_dir": _optional_str,
    "data.cache": _cache,
    "data.path": _optional_str,
    "data.image_size": _size(nullable=False),
    "data.batch_size": _int_at_least(1),
    "data.validation_split": _num_in(0, 1, low_open=True),
    "data.test_split": _num_in(0, 1),
    "data.shuffle_buffer": _int_at_least(1),
    "data.on_bad_image": _choice("skip", "fail"),
    "data.max_image_megapixels": _positive_number,
    "data.synthetic_size": _int_at_least(8),
    "data.synthetic_classes": _int_at_least(2),
    "augment.flip": _choice("none", "horizontal", "vertical", "horizontal_and_vertical"),
    "augment.crop": _size(nullable=True),
    "augment.tta": _choice("none", "flip"),
    "augment.crop_scale": _range_pair(0, 1, nullable=True),
    "augment.crop_ratio": _range_pair(0, None, nullable=False),
    "augment.test_crop_fraction": _num_in(0, 1, low_open=True, high_open=False, nullable=True),
    "augment.mixup": _num_at_least(0),
    "augment.cutmix": _num_at_least(0),
    "augment.rotation": _num_in(0, 1),
    "augment.zoom": _num_in(0, 1),
    "augment.contrast": _num_in(0, 1),
    "augment.brightness": _num_in(0, 1, high_open=False),
    "augment.saturation": _num_in(0, 1),
    "augment.hue": _num_in(0, 0.5, high_open=False),
    "augment.erasing": _num_in(0, 1, high_open=False),
    "augment.erasing_scale": _range_pair(0, 1, nullable=False),
    "model.head_dropout": _num_in(0, 1),
    "model.first_conv_init": _choice("random", "pca"),
    "model.*.filters": _per_stage(_int_at_least(1)),
    "model.*.blocks": _per_stage(_int_at_least(1)),
    "model.*.kernel_size": _per_stage(_int_at_least(1)),
    "model.*.strides": _per_stage(_int_at_least(1)),
    "model.*.dilation_rate": _per_stage(_int_at_least(1)),
    "model.*.padding": _per_stage(_choice("same", "valid")),
    "model.*.pooling": _per_stage(_choice("max", "avg", "none")),
    "model.*.dropout": _per_stage(_num_in(0, 1)),
    "model.*.batch_norm": _per_stage(lambda v: None if isinstance(v, bool) else "true or false"),
    "model.*.weight_decay": _num_in(0, 1),
    "model.*.bn_momentum": _num_in(0, 1),
    "model.standard.kernel_initializer": _per_stage(_initializer),
    "model.*.kernel_initializer": _initializer,
    "model.*.stem_filters": _per_conv(_int_at_least(1)),
    "model.*.stem_kernel_size": _per_conv(_int_at_least(1)),
    "model.*.stem_strides": _per_conv(_int_at_least(1)),
    "model.*.bottleneck_ratio": _per_stage(_num_in(0, 1, low_open=True, high_open=False)),
    "model.*.depth_multiplier": _per_stage(_int_at_least(1)),
    "model.*.head": _choice("dense", "conv"),
    "model.transfer.backbone": _choice("vgg16", "resnet50"),
    "model.transfer.weights": _optional_str,
    "model.transfer.pooling": _choice("avg", "max"),
    "model.transfer.head_units": _int_at_least(0),
    "training.epochs": _int_at_least(1),
    "training.time_budget": lambda v: None if v is None or (_is_num(v) and v > 0) else (
        "a number of minutes > 0, or null"),
    "training.optimizer": _choice("adam", "adamw", "sgd", "rmsprop"),
    "training.learning_rate": _positive_number,
    "training.schedule": _choice("constant", "cosine"),
    "training.warmup_epochs": _int_at_least(0),
    "training.weight_decay": _num_in(0, 1),
    "training.momentum": _num_in(0, 1),
    "training.label_smoothing": _num_in(0, 1),
    "training.ema": _num_in(0, 1),
    "training.progressive.sizes": lambda v: None if isinstance(v, list) and all(
        _size(nullable=False)(item) is None for item in v) else "a list of sizes (each a number or [height, width])",
    "training.progressive.epochs": lambda v: None if (_is_int(v) and v >= 0) or (
        isinstance(v, list) and v and all(_is_int(e) and e >= 1 for e in v)) else (
        "a number of epochs >= 0, or a list of them (one per size, each >= 1)"),
    "training.downsize.sizes": lambda v: None if isinstance(v, list) and all(_is_int(h) and h >= 8 for h in v) else (
        "a list of network input heights, each an integer >= 8"),
    "training.downsize.min_epochs": _int_at_least(1),
    "training.fine_tune.epochs": _int_at_least(0),
    "training.fine_tune.learning_rate": _positive_number,
    "training.fine_tune.unfreeze": lambda v: None if (_is_int(v) and v >= 0) or (isinstance(v, str) and v) else (
        "a number of layers >= 0 or a layer name"),
    "run.name": _run_name,
    "run.seed": lambda v: None if _is_int(v) and 0 <= v < 2 ** 32 else "an integer in [0, 2**32 - 1]",
    "runtime.precision": _choice("float32", "mixed_float16", "mixed_bfloat16", "auto"),
    "runtime.jit_compile": lambda v: None if isinstance(v, bool) or v == "auto" else "true, false or 'auto'",
    "runtime.strategy": _choice("auto", "default", "mirrored", "multi_worker"),
    "runtime.log_cam_images": _int_at_least(0),
}


def _type_problem(value: Any, default: Any) -> str | None:
    """What `value` must be, judged by the type of the default, or None when it fits."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return None if _is_int(value) else "an integer"
    if isinstance(default, float):
        return None if _is_num(value) else "a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    if isinstance(default, list):
        if not isinstance(value, list):
            return "a list"
        if default:
            for item in value:
                problem = _type_problem(item, default[0])
                if problem:
                    return f"a list whose items are each {problem}"
    return None


def _rule_for(dotted: str) -> Callable | None:
    if dotted in RULES:
        return RULES[dotted]
    parts = dotted.split(".")
    if len(parts) == 3 and parts[0] == "model":
        return RULES.get(f"model.*.{parts[2]}")
    return None


def _validate(cfg: dict, defaults: dict, origins: dict, prefix: str = "") -> None:
    for key, default in defaults.items():
        dotted = f"{prefix}{key}"
        value = cfg[key]
        if isinstance(default, dict):
            _validate(value, default, origins, dotted + ".")
            continue
        rule = _rule_for(dotted)
        problem = rule(value) if rule else _type_problem(value, default)
        if problem:
            origin = origins.get(dotted, str(DEFAULTS_FILE))
            raise UserError(f"{origin}: {dotted} must be {problem}. Received: {value!r}")


def _check_cross_keys(cfg: dict, origins: dict) -> None:
    def fail(key, message):
        raise UserError(f"{origins.get(key, str(DEFAULTS_FILE))}: {message}")

    model = cfg["model"]
    if model["name"] not in model or not isinstance(model[model["name"]], dict):
        families = [k for k, v in model.items() if isinstance(v, dict)]
        fail("model.name", f"model.name must be one of {', '.join(families)}. Received: {model['name']!r}")
    if model["name"] == "transfer":
        for key, default in (("first_conv_init", "random"), ("first_conv_trainable", True)):
            if model[key] != default:
                fail(f"model.{key}", f"model.{key} is for the from-scratch families (standard, pointwise, "
                     f"separable); a transfer backbone's first conv comes pretrained. Received: {model[key]!r} "
                     f"with model.name 'transfer'")
    data = cfg["data"]
    if data["source"] == "folder" and not data["path"]:
        fail("data.source", "data.source is 'folder' but data.path is not set; pass --set data.path=DIR.")
    if data["validation_split"] + data["test_split"] >= 1:
        fail("data.test_split", "data.validation_split + data.test_split must be < 1. "
             f"Received: {data['validation_split']} + {data['test_split']}")
    if cfg["training"]["warmup_epochs"] >= cfg["training"]["epochs"] > 1:
        fail("training.warmup_epochs", "training.warmup_epochs must be < training.epochs. "
             f"Received: {cfg['training']['warmup_epochs']}")
    runtime = cfg["runtime"]
    if runtime["strategy"] == "multi_worker" or (runtime["strategy"] == "auto" and os.environ.get("TF_CONFIG")):
        if not cfg["run"]["name"]:
            fail("run.name", "training on several machines needs an explicit run.name, so that every worker "
                 "agrees on the run directory; pass --set run.name=NAME.")
    if cfg["training"]["fine_tune"]["epochs"] and model["name"] != "transfer":
        fail("training.fine_tune.epochs", "training.fine_tune.epochs needs model.name: transfer (a pretrained "
             f"backbone to unfreeze). Received: {cfg['training']['fine_tune']['epochs']} with "
             f"model.name {model['name']!r}")
    progressive = cfg["training"]["progressive"]
    if progressive["sizes"]:
        sizes, epochs = progressive["sizes"], progressive["epochs"]
        per_stage = _stage_epochs(progressive)
        if len(per_stage) != len(sizes) or not all(per_stage):
            fail("training.progressive.epochs", "training.progressive.epochs must be >= 1, one number for every "
                 f"stage or a list with one per size ({len(sizes)}). Received: {epochs!r}")
        if sum(per_stage) >= cfg["training"]["epochs"]:
            fail("training.progressive.epochs", "training.progressive.epochs must leave epochs at the config's own "
                 f"size: their sum must be < training.epochs ({cfg['training']['epochs']}). Received: {epochs!r}")
        crop = cfg["augment"]["crop"]
        fh, fw = as_size(crop if crop is not None else data["image_size"])
        for size in sizes:
            h, w = as_size(size)
            if h > fh or w > fw:
                fail("training.progressive.sizes", "training.progressive.sizes must each fit inside the config's "
                     f"own network input size {[fh, fw]} (augment.crop, else data.image_size). Received: {size!r}")
    crop = cfg["augment"]["crop"]
    if crop is not None:
        h, w = as_size(crop)
        ih, iw = as_size(data["image_size"])
        if h > ih or w > iw:
            fail("augment.crop", f"augment.crop must fit inside data.image_size {[ih, iw]}. Received: {crop!r}")
    elif cfg["augment"]["test_crop_fraction"] is not None:
        fail("augment.test_crop_fraction", "augment.test_crop_fraction needs augment.crop (it sizes the crop at "
             f"inference). Received: {cfg['augment']['test_crop_fraction']} with augment.crop null")


def check_environment(cfg: dict) -> None:
    """The checks of a config that need this machine: the data folder and a transfer weights file exist.

    `resolve` checks only what the config says (keys, types, ranges), so a config can be printed, sized and dry-run
    anywhere; the commands that read data or weights call this first.

    Raises:
        UserError: one line naming the key, the value and what to do.
    """
    data = cfg["data"]
    if data["source"] == "folder" and not os.path.isdir(data["path"]):
        raise UserError(f"data.path must be an existing folder. Received: {data['path']!r} (get the photos as the "
                        "README's 'Train on cats vs dogs' says, or pass --set data.path=DIR)")
    model = cfg["model"]
    weights = model["transfer"]["weights"]
    if model["name"] == "transfer" and weights not in (None, "imagenet") and not os.path.isfile(weights):
        raise UserError("model.transfer.weights must be 'imagenet', null or an existing weights file. "
                        f"Received: {weights!r}")


def _stage_epochs(progressive: dict) -> list[int]:
    epochs = progressive["epochs"]
    return epochs if isinstance(epochs, list) else [epochs] * len(progressive["sizes"])


def flip_tta(cfg: dict) -> bool:
    """Whether a config asks for flip test-time augmentation (`augment.tta: flip`): a resolved config, or a run's
    config.yaml as saved (read without resolving, which would need the run's data at hand; older runs lack the key)."""
    return (cfg.get("augment") or {}).get("tta") == "flip"


def progressive_stages(training_cfg: dict) -> list[tuple[int | list, int]]:
    """The early stages of a validated `training.progressive` as (size, epochs) pairs; [] when it is off."""
    progressive = training_cfg["progressive"]
    return list(zip(progressive["sizes"], _stage_epochs(progressive)))


def as_size(value: int | list) -> tuple[int, int]:
    """Normalises an image size given as `n` or `[h, w]` to `(h, w)`."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def resolve(config_files: list[str], overrides: list[str] = (), base: dict | None = None) -> dict:
    """Builds a validated config from the defaults, config files and `--set` overrides.

    Args:
        config_files: YAML files applied in order; later files override earlier ones.
        overrides: `key.sub=value` strings, applied after the files; values are parsed as YAML.
        base: a complete config to start from instead of the defaults (e.g. a run's saved config.yaml).

    Returns:
        The resolved config as nested dicts.

    Raises:
        UserError: one line naming the file or flag, the key, what is allowed and what was received.
    """
    cfg = copy.deepcopy(base) if base is not None else load_defaults()
    origins: dict[str, str] = {}
    for path in config_files:
        _merge(cfg, _read_yaml(path), path, origins)
    for item in overrides:
        key, value = parse_set(item)
        _merge(cfg, _nest(key, value), f"--set {item}", origins)
    _validate(cfg, load_defaults(), origins)
    _check_cross_keys(cfg, origins)
    return cfg


def dump(cfg: dict) -> str:
    """The config as YAML text, in the defaults' key order."""
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
