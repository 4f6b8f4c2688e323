"""Time to accuracy: the small-data configs against the tutorial baseline, on the same photos and wall-clock budget.

    python bench/time_to_accuracy.py configs/small_data/standard.yaml --seeds 3
    python bench/time_to_accuracy.py configs/small_data/*.yaml --seeds 3 --budgets 2 5 10 --work bench-work
    python bench/time_to_accuracy.py configs/small_data/standard.yaml configs/small_data/pointwise.yaml@10 --work w
    python bench/time_to_accuracy.py configs/small_data/standard.yaml --no-baseline
    python bench/time_to_accuracy.py configs/small_data/standard.yaml --baseline-run-on 16

Every run trains on the 2,000 training photos of --data. The 1,000 validation photos are split in two fixed,
class-balanced halves, A and B: the *picking* half is the run's validation set (it chooses the best checkpoint and
gives the per-epoch curve), the *held-out* half is never seen until the best checkpoint is scored on it at the end.
Seeds take turns: even seeds pick on A and are scored on B, odd seeds the other way round. Two sets of 500 photos
differ in difficulty by themselves (here A scored 1.6 points above B on the same weights, on average over six runs),
and taking turns cancels that out of the mean gap between the two figures, which leaves what the gap is meant to
show: how much picking the best epoch flatters the figure. The halves are folders of symbolic links under --work,
so nothing is copied. Training never sees either half, so every run is also scored the other way round: each epoch's
checkpoint is kept (`run.keep_every_epoch`) and scored on the held-out half after the run, outside the budget; the
half that did not pick then picks too, and the seed's gap is the mean of the two ways round. That cancels the
halves' difference in difficulty seed by seed, which alternating seeds do only on average (an even number of them).

With --work, results accumulate in its results.json, each run saved as it ends: a later invocation in the same
folder (same --budget) adds its runs to the earlier ones, so `--first-seed 3 --seeds 2` adds seeds 3 and 4 to a table
and keeps the baseline run that the speed-ups are measured against. With --resume, the same command run again skips
the runs the folder already holds of the same config (what its file sets, by a SHA-256 of the parsed YAML, so a new
comment does not count) on the same machine: a table that takes hours can be stopped and finished later, and the
command printed stays the one that makes the table.

Each config runs through `train.py` (a fresh process per seed, as a user runs it). The baseline is the
"Deep Learning with Python" (ch. 8) convnet trained the way the TensorFlow tutorial does it: 180x180 images from
`image_dataset_from_directory`, RandomFlip / RandomRotation(0.1) / RandomZoom(0.2), Rescaling, Conv2D 32-64-128-256-256
with max pooling, Flatten, Dropout(0.5), a sigmoid unit, RMSprop, batch 32.

Each budget (`CONFIG@MINUTES` for one config, else --budgets, else the config's `training.time_budget`) is a full
run of that config with that `training.time_budget`, so its learning-rate schedule and progressive stages end with
it: such a run stops itself after the step that spends the budget, and every epoch that started within the budget
counts. The table has a row per config and budget. The baseline is stopped from outside, and one run of it serves
every budget: its row at a budget counts the epochs that ended within it and scores the best of those. It may be
told to train on past the largest budget (`--baseline-run-on`), so that the speed-up to 75% has a measured time on
both sides rather than a lower bound.

The figure to compare configs by is *held-out, both ways*: per seed, the mean of the picked checkpoint scored on the
held-out half and the checkpoint the held-out half would pick scored on the picking half (every epoch is scored on
both), so neither half's difficulty nor the luck of picking flatters it. The anytime figure (--figure, by default
anytime.png in --work) plots each run's accuracy against minutes, a line per budget, with that figure at each
budget's end. The bench prints the command that regenerates its table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BASELINE_SIZE = 180  # the tutorial's image size
sys.path.insert(0, str(REPO))  # the project's own model report, for MACs
from cnnlab.console import machine_summary  # noqa: E402
from cnnlab.runs import RunDir  # noqa: E402  (reads no TensorFlow)

SHARED = REPO.parent / "shared" / "data" / "cats_vs_dogs"
THRESHOLDS = (0.75, 0.80, 0.85, 0.90)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def fail(message: str) -> None:
    """Bad input: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def split_folder(data: Path, work: Path) -> dict[str, Path]:
    """Two data roots under `work/data`, keyed by the half that picks: train/ -> data/train, val/ = the picking half
    and test/ = the held-out half of data/val (A and B under "A", B and A under "B")."""
    root = work / "data"
    val_dir = next((data / d for d in ("val", "validation") if (data / d).is_dir()), None)
    if not (data / "train").is_dir() or val_dir is None:
        fail(f"--data {data} needs train/ and val/ (or validation/) folders")
    folds = (root / "pick_a", root / "pick_b")
    if not folds[1].exists():
        for class_dir in sorted(p for p in val_dir.iterdir() if p.is_dir()):
            files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            for half, picked in (("half_a", files[0::2]), ("half_b", files[1::2])):
                (root / half / class_dir.name).mkdir(parents=True, exist_ok=True)
                for f in picked:
                    (root / half / class_dir.name / f.name).symlink_to(f.resolve())
        for fold, (pick, held_out) in zip(folds, (("half_a", "half_b"), ("half_b", "half_a"))):
            fold.mkdir()
            (fold / "train").symlink_to((data / "train").resolve(), target_is_directory=True)
            (fold / "val").symlink_to(root / pick, target_is_directory=True)
            (fold / "test").symlink_to(root / held_out, target_is_directory=True)
    return dict(zip("AB", folds))


def picking_half(seed: int) -> str:
    """The half of val ("A" or "B") that picks a seed's checkpoint: seeds take turns."""
    return "AB"[seed % 2]


def first_time(history: list[dict], threshold: float) -> float | None:
    """Minutes of training until val accuracy first reached `threshold`, or None."""
    # Keras logs accuracy as float32: 450/500 arrives as 0.89999998, which must count as 90%.
    return next((h["elapsed"] / 60 for h in history if h["val_accuracy"] >= threshold - 1e-6), None)


# ---------------------------------------------------------------------------------------------------------------
# The project's configs, through train.py and evaluate.py


def config_budget(config_file: str) -> float:
    """A config's `training.time_budget` in minutes, or 10 for a config without one."""
    from cnnlab.config import resolve

    return resolve([config_file])["training"]["time_budget"] or 10.0


def config_budgets(arg: str, budgets_min: list[float] | None) -> tuple[str, list[float]]:
    """A CONFIG argument's file and budgets: `file@5,10` its own, else --budgets, else the file's
    `training.time_budget`, else 10 minutes."""
    config_file, _, own = arg.partition("@")
    if not Path(config_file).is_file():
        fail(f"{config_file}: no such config file")
    if own:
        try:
            return config_file, sorted({float(b) for b in own.split(",")})
        except ValueError:
            fail(f"{arg}: the budgets after @ must be minutes separated by commas, e.g. {config_file}@5,10. "
                 f"Received: {own}")
    return config_file, sorted(set(budgets_min or [config_budget(config_file)]))


def run_name(config_name: str, budget_min: float, seed: int) -> str:
    return f"{config_name}-{budget_min:g}min-seed{seed}"


def run_config(config_file: str, seed: int, folds: dict[str, Path], work: Path, budget_s: float) -> dict:
    name = run_name(Path(config_file).stem, budget_s / 60, seed)
    data_root = folds[picking_half(seed)]
    # Every epoch's checkpoint is kept, so that each can be scored on the held-out half after the run.
    # The run's own time budget is the bench's, so its schedule ends with the budget (training.time_budget).
    overrides = [f"data.path={data_root}", f"run.seed={seed}", f"run.dir={work / 'runs'}", f"run.name={name}",
                 "run.keep_every_epoch=true", f"training.time_budget={budget_s / 60:g}"]
    cmd = [sys.executable, str(REPO / "train.py"), "--config", config_file, "--overwrite"]
    for o in overrides:
        cmd += ["--set", o]
    print(f"\n$ {' '.join(cmd)}", flush=True)
    run_dir = work / "runs" / name
    try:
        # The budget covers training; start-up and the one-off image scan get a minute on top.
        subprocess.run(cmd, cwd=REPO, timeout=budget_s + 60, check=False)
    except subprocess.TimeoutExpired:
        print(f"(stopped at the budget of {budget_s / 60:.1f} min)")
    rows = RunDir(run_dir).history()  # the committed epochs, also of a run stopped at the bench's time limit
    history = [{"epoch": int(r["epoch"]), "elapsed": float(r["elapsed_seconds"]),
                "epoch_seconds": float(r["epoch_seconds"]), "val_accuracy": float(r["val_accuracy"])}
               for r in rows]
    # A budgeted run stops itself after the step that spends the budget: its last epoch started within it.
    history = [h for h in history if h["elapsed"] - h["epoch_seconds"] < budget_s]
    held_out = None
    if history:
        best = max(history, key=lambda h: h["val_accuracy"])
        # The best checkpoint is scored only when it was chosen within the budget (the run may go on past it).
        if best["val_accuracy"] >= max(float(r["val_accuracy"]) for r in rows):
            held_out = evaluate_held_out(run_dir)
    return {"seed": seed, "run": name, "picks_on": picking_half(seed), "history": history, "held_out": held_out,
            "size": trained_size(run_dir), "config_sha": file_sha(config_file), "machine": machine_summary()}


def file_sha(path: str | Path) -> str:
    """A short fingerprint of what a config file sets (its parsed YAML; comments and layout do not count): a run
    records its config's, so that --resume reuses only runs of the config as it is now."""
    import yaml

    text = Path(path).read_text()
    content = yaml.safe_load(text) if Path(path).suffix in (".yaml", ".yml") else text
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]


def trained_size(run_dir: Path) -> int | None:
    """The network input height a run trained at, from its saved config: under `training.downsize` the budget
    chooses it (None when the run saved no config)."""
    from cnnlab.config import as_size

    if not (run_dir / RunDir.CONFIG).is_file():
        return None
    cfg = RunDir(run_dir).saved_config()
    return as_size(cfg["augment"]["crop"] or cfg["data"]["image_size"])[0]


def row_cost(config_file: str, runs: list[dict], work: Path, data_root: Path) -> tuple[int, int]:
    """(MACs per image, parameters) of a row: of the model its runs trained, at the size most of them trained at
    (it follows the budget under `training.downsize`), else of the config as written."""
    sizes = [r["size"] for r in runs if r.get("size")]
    if not sizes:
        return config_cost(config_file, data_root)
    common = max(set(sizes), key=sizes.count)
    run = next(r for r in runs if r.get("size") == common)
    return config_cost(str(work / "runs" / run["run"] / RunDir.CONFIG), data_root)


def evaluate_held_out(run_dir: Path) -> float:
    """The run's best checkpoint scored on the held-out half (the folder's test split), through evaluate.py."""
    out = run_dir / "eval" / "held_out"
    subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--run", str(run_dir), "--split", "test",
                    "--out", str(out)], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())["accuracy"]


def score_epochs(run_dir: Path, epochs: list[int]) -> dict[int, float]:
    """Every kept epoch checkpoint (`run.keep_every_epoch`) scored on the held-out half, as evaluate.py scores the
    best one (with flip test-time augmentation where the config validates with it): {epoch: accuracy}, for the
    epochs whose checkpoint is there."""
    from cnnlab.config import flip_tta
    from cnnlab.evaluation import predict_split
    from cnnlab.runs import load_checkpoint

    run = RunDir(run_dir)
    cfg = run.saved_config()
    kept = run.kept_epochs()
    scores = {}
    for epoch in epochs:
        path = kept.get(epoch)
        if path is None:
            continue
        # Each checkpoint is loaded whole: a progressive-resizing stage's model resizes the images to its own size
        # first, as its val epochs did, and under a time budget the stage of an epoch follows the clock, not the plan.
        model = load_checkpoint(path)
        preds, _ = predict_split(model, cfg, "test", flip_tta(cfg))
        scores[epoch] = float((preds.predicted == preds.labels).mean())
    return scores


def add_held_out_curves(rows: dict[str, dict], work: Path, save) -> None:
    """Adds `held_out_accuracy` to each epoch of the runs whose every epoch checkpoint was kept and not yet scored,
    then deletes those checkpoints (a standard run's would take 0.5 GB; the figures are kept in results.json). Each
    run's scores are saved (`save()`) before its checkpoints go, so a failure later loses nothing."""
    for name, row in rows.items():
        for run in row["runs"]:
            history = run["history"]
            run_dir = work / "runs" / run.get("run", f"{name}-seed{run['seed']}")
            if history and "held_out_accuracy" not in history[-1] and RunDir(run_dir).kept_epochs():
                scores = score_epochs(run_dir, [h["epoch"] for h in history])
                if len(scores) == len(history):
                    for h in history:
                        h["held_out_accuracy"] = scores[h["epoch"]]
                    save()
                    RunDir(run_dir).drop_kept_epochs()


def both_ways_picks(history: list[dict]) -> tuple[dict, dict] | None:
    """The epoch the picking half chooses and the one the held-out half would choose (ties to the earliest epoch, as
    train.py's best.keras), or None unless every epoch was scored on both halves."""
    if not history or "held_out_accuracy" not in history[-1]:
        return None
    return (max(history, key=lambda h: h["val_accuracy"]), max(history, key=lambda h: h["held_out_accuracy"]))


def both_ways_gap(history: list[dict]) -> float | None:
    """Points by which the best epoch flatters a run, picking on each half in turn and scoring on the other, averaged.

    Training never sees either half, so one run answers both ways round (the per-epoch figures of the half that did
    not pick come from `add_held_out_curves`). Averaging the two cancels the difference in difficulty between the
    halves exactly, seed by seed, and leaves what the gap is meant to show. Ties go to the earliest epoch, as in
    train.py's choice of best.keras.
    """
    if not (picks := both_ways_picks(history)):
        return None
    picked, other = picks
    return 100 * ((picked["val_accuracy"] - picked["held_out_accuracy"])
                  + (other["held_out_accuracy"] - other["val_accuracy"])) / 2


def both_ways_held_out(history: list[dict]) -> float | None:
    """A run's accuracy on photos that did not pick its checkpoint, both ways round: the mean of the checkpoint the
    picking half chose scored on the held-out half, and the one the held-out half would choose scored on the picking
    half (ties to the earliest epoch). None unless every epoch was scored on both halves."""
    if not (picks := both_ways_picks(history)):
        return None
    picked, other = picks
    return (picked["held_out_accuracy"] + other["val_accuracy"]) / 2


def macs_of(model) -> int:
    """MACs per image of a Keras model, from the project's own model report."""
    from cnnlab.report import model_report, totals

    return int(totals(model_report(model))["macs"])


def config_cost(config_file: str, data_root: Path) -> tuple[int, int]:
    """(MACs per image, parameters) of a config's model."""
    from cnnlab import config
    from cnnlab.modeling import build_model, family_network

    cfg = config.resolve([config_file], ["model.transfer.weights=null", f"data.path={data_root}"])
    model = family_network(build_model(cfg, 2))
    return macs_of(model), model.count_params()


# ---------------------------------------------------------------------------------------------------------------
# The tutorial baseline (run in a child process of this script: `--baseline-child`)


def baseline_child(data_root: Path, seed: int, budgets_min: list[float], run_on_s: float, out: Path) -> None:
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    kwargs = dict(image_size=(BASELINE_SIZE, BASELINE_SIZE), batch_size=32, label_mode="binary", verbose=False)
    train_ds = keras.utils.image_dataset_from_directory(data_root / "train", seed=seed, **kwargs)
    val_ds = keras.utils.image_dataset_from_directory(data_root / "val", shuffle=False, **kwargs)
    test_ds = keras.utils.image_dataset_from_directory(data_root / "test", shuffle=False, **kwargs)
    augmentation = keras.Sequential([layers.RandomFlip("horizontal"), layers.RandomRotation(0.1),
                                     layers.RandomZoom(0.2)])
    net_in = keras.Input(shape=(BASELINE_SIZE, BASELINE_SIZE, 3))
    x = layers.Rescaling(1.0 / 255)(net_in)
    for filters in (32, 64, 128, 256):
        x = layers.Conv2D(filters, 3, activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(256, 3, activation="relu")(x)
    x = layers.Dropout(0.5)(layers.Flatten()(x))
    net = keras.Model(net_in, layers.Dense(1, activation="sigmoid")(x))
    inputs = keras.Input(shape=(BASELINE_SIZE, BASELINE_SIZE, 3))
    model = keras.Model(inputs, net(augmentation(inputs)))
    model.compile(loss="binary_crossentropy", optimizer="rmsprop", metrics=["accuracy"])

    # The best weights within each budget: one run of the baseline serves every row.
    history, best = [], {b: {"acc": -1.0, "weights": None} for b in budgets_min}

    class Clock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start = self.epoch_start = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            now = time.perf_counter()
            history.append({"epoch": epoch + 1, "elapsed": now - self.start, "epoch_seconds": now - self.epoch_start,
                            "val_accuracy": float(logs["val_accuracy"])})
            print(f"baseline epoch {epoch + 1}: {history[-1]['elapsed']:.0f} s, val_accuracy "
                  f"{logs['val_accuracy']:.4f}", flush=True)
            for budget_min, kept in best.items():
                if logs["val_accuracy"] > kept["acc"] and now - self.start <= budget_min * 60:
                    kept.update(acc=logs["val_accuracy"], weights=self.model.get_weights())
            # Stop once the next epoch could not end inside the time it may run.
            if now - self.start + history[-1]["epoch_seconds"] > max(max(budgets_min) * 60, run_on_s):
                self.model.stop_training = True

    model.fit(train_ds, validation_data=val_ds, epochs=1000, callbacks=[Clock()], verbose=0)
    held_out = {}
    for budget_min, kept in best.items():
        if kept["weights"] is not None:  # None: not even one epoch ended within this budget
            model.set_weights(kept["weights"])
            held_out[f"{budget_min:g}"] = float(model.evaluate(test_ds, verbose=0, return_dict=True)["accuracy"])
    out.write_text(json.dumps({"history": history, "held_out": held_out, "params": model.count_params(),
                               "macs": macs_of(net)}))


def run_baseline(folds: dict[str, Path], seed: int, work: Path, budgets_min: list[float],
                 run_on_s: float) -> dict[float, dict]:
    """One run of the tutorial baseline for every budget: {budget in minutes: that budget's view of the run}."""
    out = work / f"baseline-seed{seed}.json"
    data_root = folds[picking_half(seed)]
    print(f"\n$ tutorial baseline (seed {seed})", flush=True)
    subprocess.run([sys.executable, __file__, "--baseline-child", "--data", str(data_root), "--seed", str(seed),
                    "--budgets", *map(str, budgets_min), "--baseline-run-on", str(run_on_s / 60), "--work", str(out)],
                   check=True, timeout=max(max(budgets_min) * 60, run_on_s) + 300)
    return baseline_views(json.loads(out.read_text()), seed, budgets_min)


def baseline_views(result: dict, seed: int, budgets_min: list[float]) -> dict[float, dict]:
    """Each budget's view of one baseline run: the epochs that ended within it, and the held-out score of the best
    of those; `run_on` keeps the whole run (for the time to 75% past the budget)."""
    return {b: {"seed": seed, "picks_on": picking_half(seed), "run_on": result["history"],
                "history": [h for h in result["history"] if h["elapsed"] <= b * 60],
                "held_out": result["held_out"].get(f"{b:g}"), "params": result["params"], "macs": result["macs"],
                "size": BASELINE_SIZE, "config_sha": file_sha(__file__), "machine": machine_summary()}
            for b in budgets_min}


# ---------------------------------------------------------------------------------------------------------------
# The table


def summarise(runs: list[dict], num_train: int) -> dict:
    def stat(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))

    out = {"best": stat([max((h["val_accuracy"] for h in r["history"]), default=None) for r in runs]),
           "held_out": stat([r["held_out"] for r in runs]),
           "both_ways": stat([both_ways_held_out(r["history"]) for r in runs]),
           "stop": stat([r["history"][-1]["elapsed"] / 60 for r in runs if r["history"]]),
           "rate": stat([num_train / statistics.median(h["epoch_seconds"] for h in r["history"][1:] or r["history"])
                         for r in runs if r["history"]])}
    for t in THRESHOLDS:
        times = [first_time(r["history"], t) for r in runs]
        out[t] = (stat(times), sum(x is None for x in times))
    return out


def fmt_stat(s, percent=False, digits=1) -> str:
    if s is None:
        return "-"
    mean, std, n = s
    scale = 100 if percent else 1
    return f"{mean * scale:.{digits}f}" + (f" ± {std * scale:.{digits}f}" if n > 1 else "")


def resumable(rows: dict, config_name: str, budget_min: float, seed: int, sha: str, machine: str) -> bool:
    """Whether --resume keeps a run: the results (`rows`, as results.json holds them) have this seed's run of the
    config as it is now (`sha`, see `file_sha`) at this budget, made on this machine (`machine_summary()`), with at
    least one epoch."""
    runs = rows.get(row_key(config_name, budget_min), {}).get("runs", [])
    return any(r["seed"] == seed and r.get("config_sha") == sha and r.get("machine") == machine and r["history"]
               for r in runs)


def row_key(config_name: str, budget_min: float) -> str:
    return f"{config_name} @ {budget_min:g} min"


def print_table(rows: dict[str, dict]) -> None:
    cells = {}
    for name, r in rows.items():
        cells[name] = []
        for t in THRESHOLDS:
            stat, missed = r["summary"][t]
            cell = fmt_stat(stat, digits=2) if stat else f"> {r['budget']:g}"
            cells[name].append(cell + (f" ({missed} miss)" if stat and missed else ""))
    # A column widens for "mean ± std (n miss)" rather than push the cells after it out of line.
    widths = [max([13] + [len(c[i]) for c in cells.values()]) for i in range(len(THRESHOLDS))]
    head = (f"{'model':<22} {'budget':>6} {'stops at':>11} {'px':>7} {'MACs':>7} {'params':>7} {'img/s':>9} {'best val %':>12} "
            f"{'held-out %':>12} {'both ways %':>12}"
            + "".join(f" {'min to ' + str(int(t * 100)) + '%':>{w}}" for t, w in zip(THRESHOLDS, widths)))
    print("\nTime to accuracy (stops at = minutes of training when the run ended; px = the network input the runs "
          "trained at; val = the picking half; held-out = "
          "the other half; both ways = the mean of picking on each half and scoring on the other; mean ± std over "
          "seeds)")
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        s = r["summary"]
        sizes = "/".join(str(size) for size in sorted({run["size"] for run in r["runs"] if run.get("size")})) or "-"
        print(f"{r['config']:<22} {r['budget']:>4g} m {fmt_stat(s['stop'], digits=2):>11} {sizes:>7} {r['macs'] / 1e6:>6.0f}M {r['params'] / 1e3:>6.0f}k "
              f"{fmt_stat(s['rate'], digits=0):>9} {fmt_stat(s['best'], True):>12} {fmt_stat(s['held_out'], True):>12} "
              f"{fmt_stat(s['both_ways'], True):>12}" + "".join(f" {c:>{w}}" for c, w in zip(cells[name], widths)))


def print_gaps(rows: dict[str, dict]) -> None:
    """Per row, how far the held-out half falls below the picking half's best epoch: by which half picked, and,
    where every epoch was scored on both halves, each seed both ways round (the figure to read)."""
    print("\nBest val minus held-out, points (seeds alternate the picking half; where each seed could be scored both"
          " ways round, that mean is the figure to read):")
    for name, r in rows.items():
        gaps = {"A": [], "B": []}
        for run in r["runs"]:
            if run["held_out"] is not None and run["history"]:
                best = max(h["val_accuracy"] for h in run["history"])
                gaps[run.get("picks_on", "A")].append(100 * (best - run["held_out"]))
        both = gaps["A"] + gaps["B"]
        if both:
            ways = ", ".join(f"picking on {k}: {' '.join(f'{g:.1f}' for g in v)}" for k, v in gaps.items() if v)
            print(f"  {name:<28} mean {statistics.mean(both):.2f} over {len(both)} ({ways})")
        each = [both_ways_gap(run["history"]) for run in r["runs"]]
        if each and None not in each:
            print(f"  {'':<28} each seed both ways round: mean {statistics.mean(each):.2f} over {len(each)} "
                  f"(per seed: {' '.join(f'{g:.1f}' for g in each)})")


def speedup_to(rows: dict[str, dict], threshold: float, name: str, baseline: str) -> None:
    budget_min = rows[name]["budget"]
    ours, theirs = rows[name]["summary"][threshold][0], rows[baseline]["summary"][threshold][0]
    if ours is None:
        return
    if theirs is None:  # past the budget, where the baseline was told to run on
        late = [first_time(r["run_on"], threshold) for r in rows[baseline]["runs"]]
        if all(t is not None for t in late):
            theirs = (statistics.mean(late),)
            budget_min = max(h["elapsed"] for r in rows[baseline]["runs"] for h in r["run_on"]) / 60
    if theirs is None:
        print(f"{name} reaches {threshold:.0%} in {ours[0]:.2f} min; the baseline not within {budget_min:g} min: "
              f"more than {budget_min / ours[0]:.1f}x sooner.")
    else:
        print(f"{name} reaches {threshold:.0%} {theirs[0] / ours[0]:.1f}x sooner than the baseline "
              f"({ours[0]:.2f} vs {theirs[0]:.2f} min).")


def plot_anytime(rows: dict[str, dict], path: Path, title: str) -> None:
    """Accuracy against minutes, a panel per config: each run's val accuracy per epoch (the picking half), a colour
    per budget, and at each budget's end the mean (± std over seeds) held-out-both-ways figure, or the held-out
    figure where epochs were not scored both ways (the baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows.values()))
    budgets = sorted({r["budget"] for r in rows.values()})
    colours = dict(zip(budgets, plt.get_cmap("viridis")(np.linspace(0.0, 0.8, len(budgets)))))
    fig, axes = plt.subplots(1, len(configs), figsize=(4.2 * len(configs), 3.6), sharey=True, squeeze=False)
    for ax, config_name in zip(axes[0], configs):
        for r in (r for r in rows.values() if r["config"] == config_name):
            colour = colours[r["budget"]]
            for run in r["runs"]:
                ax.plot([h["elapsed"] / 60 for h in run["history"]], [100 * h["val_accuracy"] for h in run["history"]],
                        color=colour, alpha=0.45, lw=1)
            end = r["summary"]["both_ways"] or r["summary"]["held_out"]
            if end:
                ax.errorbar([r["budget"]], [100 * end[0]], yerr=[100 * end[1]], fmt="o", color=colour, capsize=3,
                            label=f"{r['budget']:g} min: {100 * end[0]:.1f}%")
        ax.set_title(config_name, fontsize=10)
        ax.set_xlabel("minutes of training")
        ax.set_xlim(0, 1.05 * max(budgets))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right", title="held out (dots)", title_fontsize=8)
    axes[0][0].set_ylabel("accuracy, % (lines: val each epoch)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"anytime figure: {path}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", metavar="CONFIG[@MINUTES,...]",
                        help="config files to train; `file@10` or `file@5,10` trains that one at those budgets only")
    parser.add_argument("--data", type=Path, default=SHARED, help="train/ + val/ photo folders (default: %(default)s)")
    parser.add_argument("--budgets", type=float, nargs="+", default=None, metavar="MINUTES",
                        help="wall-clock training budgets, a full run of each config for each (a config's own "
                             "@MINUTES come first; default: each config's training.time_budget, else 10)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per config and budget (seeds F..F+N-1)")
    parser.add_argument("--first-seed", type=int, default=0, help="F, the first seed (to add seeds to a result)")
    parser.add_argument("--baseline-seeds", type=int, default=1, help="runs of the tutorial baseline")
    parser.add_argument("--no-baseline", action="store_true", help="skip the tutorial baseline")
    parser.add_argument("--baseline-run-on", type=float, default=0.0,
                        help="minutes the baseline may train in all, past the largest budget, to time its 75%% "
                             "(its rows count their budgets)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs --work already holds of the same config (the values its file sets) on "
                             "the same machine instead of running them again: an interrupted table goes on where "
                             "it stopped")
    parser.add_argument("--figure", type=Path, default=None,
                        help="where the anytime figure goes (default: anytime.png in --work)")
    parser.add_argument("--baseline-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from cnnlab.console import start_tensorflow

    start_tensorflow()  # TensorFlow's start-up notices held back, as the tools do
    plans = [config_budgets(arg, args.budgets) for arg in args.configs]
    budgets = sorted({b for _, config_budgets_min in plans for b in config_budgets_min}
                     or set(args.budgets or [10.0]))
    if min(budgets) <= 0:
        fail(f"--budgets: minutes must be positive. Received: {min(budgets):g}")
    if args.baseline_child:
        return baseline_child(args.data, args.seed, budgets, args.baseline_run_on * 60, args.work)
    if args.resume and args.work is None:
        fail("--resume goes on with the runs of a --work folder: name it (--work DIR)")
    if not args.data.is_dir():
        fail(f"--data {args.data} is not a folder (the photos: train/ and val/ with cats/ and dogs/)")

    work = args.work or Path(tempfile.mkdtemp(prefix="time_to_accuracy-"))
    folds = split_folder(args.data, work)
    num_train = sum(1 for p in (folds["A"] / "train").rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    # Results accumulate in the work folder: an earlier invocation's runs of other seeds (and its baseline) stay in
    # the table, so seeds can be added later (--first-seed) and compared against the same baseline run.
    results = work / "results.json"
    rows: dict[str, dict] = json.loads(results.read_text()) if results.exists() else {}

    def save() -> None:
        results.write_text(json.dumps(rows, indent=1, default=str))

    def add(config_name: str, budget_min: float, runs: list[dict], macs: int | None = None,
            params: int | None = None) -> None:
        key = row_key(config_name, budget_min)
        row = rows.get(key, {})
        kept = [r for r in row.get("runs", []) if r["seed"] not in {run["seed"] for run in runs}]
        rows[key] = {"config": config_name, "budget": budget_min, "runs": sorted(kept + runs, key=lambda r: r["seed"]),
                     "macs": row.get("macs") if macs is None else macs,
                     "params": row.get("params") if params is None else params}
        save()

    machine = machine_summary()

    def done(config_name: str, budget_min: float, seed: int, sha: str) -> bool:
        return args.resume and resumable(rows, config_name, budget_min, seed, sha, machine)

    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for config_file, config_budgets_min in plans:
        name, sha = Path(config_file).stem, file_sha(config_file)
        for budget in config_budgets_min:
            for seed in seeds:
                if done(name, budget, seed, sha):
                    print(f"\n(--resume: {run_name(name, budget, seed)} is in {results})", flush=True)
                    continue
                # Each run is saved as it ends, so an interrupted table loses only the run in progress.
                add(name, budget, [run_config(config_file, seed, folds, work, budget * 60)])
                row = rows[row_key(name, budget)]
                row["macs"], row["params"] = row_cost(config_file, row["runs"], work, folds["A"])
                save()
    if not args.no_baseline:
        for seed in range(args.baseline_seeds):
            if all(done("tutorial baseline", budget, seed, file_sha(__file__)) for budget in budgets):
                print(f"\n(--resume: the tutorial baseline, seed {seed}, is in {results})", flush=True)
                continue
            views = run_baseline(folds, seed, work, budgets, args.baseline_run_on * 60)
            for budget in budgets:
                add("tutorial baseline", budget, [views[budget]], views[budget]["macs"], views[budget]["params"])
    add_held_out_curves(rows, work, save)
    # Rows by config (the baseline last), then budget; the summaries derive from the runs, so are never stored.
    order = sorted(rows, key=lambda k: (rows[k]["config"] == "tutorial baseline", rows[k]["config"], rows[k]["budget"]))
    rows = {k: {**rows[k], "summary": summarise(rows[k]["runs"], num_train)} for k in order}

    for name, r in rows.items():
        for run in r["runs"]:
            print(f"\n{name}, seed {run['seed']}: " + ", ".join(
                f"{h['elapsed']:.0f}s {h['val_accuracy']:.3f}" for h in run["history"]))
    print(f"\nMachine: {machine}; {time.strftime('%Y-%m-%d')}; runs in {work}")
    print(f"Regenerate: python bench/time_to_accuracy.py {shlex.join(argv)}")
    print_table(rows)
    print_gaps(rows)
    for name, r in rows.items():
        baseline = row_key("tutorial baseline", r["budget"])
        if r["config"] != "tutorial baseline" and baseline in rows:
            speedup_to(rows, 0.75, name, baseline)
    plot_anytime(rows, args.figure or work / "anytime.png", f"{machine}, {time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
