"""Reading image files: EXIF orientation, photos too big for a full decode, and decompression bombs."""

import io
import resource
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from cnnlab import config, data
from cnnlab.evaluation import predict_files
from cnnlab.images import UnreadableImage, read_header, read_image, scan_images
from cnnlab.modeling import build_model
from tests.conftest import REPO, make_image_folder


def asymmetric_photo(height: int = 60, width: int = 90) -> np.ndarray:
    """A picture whose every turn and mirror image differs: a bright block in the top-left corner, a red ramp
    across, a green ramp down."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = np.linspace(0, 255, width)[None, :]
    image[..., 1] = np.linspace(0, 160, height)[:, None]
    image[: height // 3, : width // 4] = 255
    return image


def save_with_orientation(path: Path, image: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, "JPEG", quality=95, exif=exif)


def as_a_viewer_shows_it(path: Path, size) -> np.ndarray:
    """Pillow's own reading of the EXIF orientation, resized as the project resizes."""
    upright = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    return tf.cast(tf.round(tf.image.resize(upright, size)), tf.uint8).numpy()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_read_as_pillow_shows_the_photo(orientation, tmp_path):
    path = tmp_path / f"o{orientation}.jpg"
    save_with_orientation(path, asymmetric_photo(), orientation)
    assert read_header(str(path)).orientation == orientation
    ours = read_image(str(path), (40, 40), 50).astype(float)
    pillow = as_a_viewer_shows_it(path, (40, 40)).astype(float)
    assert np.abs(ours - pillow).mean() < 3  # the two JPEG decoders differ by a level or two
    # ... while any other turn of the same photo is far off: the comparison can tell orientations apart.
    for other in set(range(1, 9)) - {orientation}:
        other_path = tmp_path / f"x{other}.jpg"
        save_with_orientation(other_path, asymmetric_photo(), other)
        assert np.abs(ours - as_a_viewer_shows_it(other_path, (40, 40))).mean() > 20, other


def test_training_evaluation_and_prediction_read_a_sideways_photo_upright(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = make_image_folder(tmp_path / "photos", per_class=2, size=24)
    sideways = root / "train" / "cats" / "phone.jpg"
    save_with_orientation(sideways, asymmetric_photo(), 6)  # stored turned, as phones store portrait photos
    cfg = config.resolve([], ["data.source=folder", f"data.path={root}", "data.image_size=[40,40]"])
    splits, _ = data.source_splits(cfg["data"], seed=0)
    trained = {i.decode(): image for image, _, i in splits["train"][0].as_numpy_iterator()}
    upright = as_a_viewer_shows_it(sideways, (40, 40)).astype(float)
    assert np.abs(trained[str(sideways)].astype(float) - upright).mean() < 3
    assert np.abs(np.rot90(trained[str(sideways)]).astype(float) - upright).mean() > 20
    # predict.py (and the filters script) read files with the same function as training's pipeline
    assert np.array_equal(read_image(str(sideways), (40, 40), 50), trained[str(sideways)])
    model = build_model(config.resolve([str(REPO / "configs" / "smoke.yaml")], ["data.image_size=[40,40]"]), 2)
    rows, unreadable = predict_files(model, [str(sideways)], ["cats", "dogs"], 50)
    expected = model.predict(trained[str(sideways)][None].astype(np.float32), verbose=0)[0, 0]
    assert not unreadable and rows[0]["p_dogs"] == pytest.approx(float(expected), abs=1e-5)


def test_a_200_megapixel_photo_is_read_at_reduced_scale_by_the_scan_and_the_pipeline(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = make_image_folder(tmp_path / "photos", per_class=2, size=24)
    big = root / "train" / "dogs" / "phone_200mp.jpg"
    pixels = np.zeros((12288, 16384, 3), np.uint8)  # 201 megapixels: TensorFlow will not decode it in full
    pixels[:, 8192:] = 200
    Image.fromarray(pixels).save(big, quality=50)
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.decode_image(tf.io.read_file(str(big)), channels=3, expand_animations=False)
    paths = [str(p) for p in root.rglob("*.jpg")]
    scan = scan_images(paths, (64, 64), 50)
    assert scan.left_out == set() and str(big) in scan.orientation
    image = read_image(str(big), (64, 64), 50)
    assert image[:, :28].max() < 20 and image[:, 36:].min() > 180  # dark left half, bright right half


def png_bomb(path: Path, side: int) -> None:
    """A valid PNG of side x side black RGB pixels: a megabyte or so on disk, 3 * side**2 bytes once decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * side)  # filter byte, then the row
    rows_at_once = 256
    body = b"".join(packer.compress(row * rows_at_once) for _ in range(side // rows_at_once))
    body += packer.compress(row * (side % rows_at_once)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_left_out_before_it_is_decoded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = make_image_folder(tmp_path / "photos", per_class=3, size=24)
    bomb = root / "train" / "cats" / "bomb.png"
    png_bomb(bomb, 12000)  # 144 megapixels: 432 MB decoded, from half a megabyte of file
    assert bomb.stat().st_size < 1_000_000 and read_header(str(bomb)).width == 12000
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    cfg = config.resolve([str(REPO / "configs" / "smoke.yaml")],
                         ["data.source=folder", f"data.path={root}", "data.image_size=[32,32]", "training.epochs=1",
                          f"run.dir={tmp_path / 'runs'}", "run.name=b"])
    from cnnlab.training import train

    run_dir = train(cfg, ["smoke.yaml"])
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200_000  # it never took 432 MB
    assert str(bomb) in (run_dir / "bad_images.txt").read_text().split()
    out = capsys.readouterr().out
    assert "1 would decode to more than data.max_image_megapixels" in out
    with pytest.raises(UnreadableImage, match="would decode to 144 megapixels, over data.max_image_megapixels"):
        read_image(str(bomb), (32, 32), 50)
    # The budget is the user's to set: a big trusted scan is read once the budget allows its size.
    scan = tmp_path / "scan.png"
    png_bomb(scan, 2000)
    assert scan_images([str(scan)], (32, 32), 3).left_out == {str(scan)}
    assert scan_images([str(scan)], (32, 32), 5).left_out == set()
