"""How fast gradcam.py explains a folder of photos: images per second for each family's small-data model.

    python bench/gradcam.py                      # 100 shared val photos at 160x160, each small-data config
    python bench/gradcam.py --images 200 --configs configs/small_data/standard.yaml

The speed of a map does not depend on what the weights learnt, so each config's model is built untrained (saved as
a checkpoint) and gradcam.py is run on it as a user runs it; the table shows the rate gradcam.py reports (reading,
maps and figures; the one-off start-up and model loading not counted) and the whole command's wall time.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data" / "cats_vs_dogs"
CONFIGS = ["configs/small_data/standard.yaml", "configs/small_data/pointwise.yaml",
           "configs/small_data/separable.yaml"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--data", default=str(SHARED / "val"), help="a folder of photos (searched recursively)")
    args = parser.parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"error: --data: no such folder: {args.data}", file=sys.stderr)
        return 2

    from cnnlab.console import machine_summary, start_tensorflow

    start_tensorflow()  # TensorFlow's start-up notices held back, as the tools do
    from cnnlab import config
    from cnnlab.images import find_images
    from cnnlab.modeling import build_model

    found, _ = find_images(args.data)
    photos = found[:: max(1, len(found) // args.images)][: args.images]  # spread over the classes
    print(f"gradcam.py on {len(photos)} photos at {args.size}x{args.size}; {machine_summary()}")
    print(f"{'config':<40} {'images/s':>9} {'wall s':>8}")
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "photos"
        folder.mkdir()
        for i, photo in enumerate(photos):  # links: the photos stay where they are
            os.symlink(os.path.abspath(photo), folder / f"{i:04d}{Path(photo).suffix}")
        for config_file in args.configs:
            cfg = config.resolve([str(REPO / config_file)], [f"data.image_size=[{args.size},{args.size}]"])
            checkpoint = Path(work) / f"{Path(config_file).stem}.keras"
            build_model(cfg, 2).save(checkpoint)
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, str(REPO / "gradcam.py"), str(folder), "--checkpoint",
                                   str(checkpoint), "--out", str(Path(work) / "out")], capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            rate = float(re.search(r"([\d.]+) images/s", proc.stdout).group(1))
            print(f"{config_file:<40} {rate:>9.1f} {wall:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
