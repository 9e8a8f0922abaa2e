"""Dataset scanning: bad inputs (counted skips, conversions, one-line errors), captions, repeats, buckets, loading."""

from __future__ import annotations

import io
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dev2pro.config import load_config
from dev2pro.data.config import DataConfig
from dev2pro.data.folders import (
    DataItem,
    apply_trigger,
    bucket_limits,
    choose_bucket,
    load_image,
    make_buckets,
    scan_dataset,
    to_rgb,
)
from dev2pro.errors import ConfigError, DataError

STEP = 8
RES = 32  # buckets: sides 16..64 in steps of 8, area <= 1024


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes | None) -> bytes:
    """A PNG written by hand (PIL cannot write 48-bit RGB or a header-only giant). rows=None: no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = png_chunk(b"IDAT", zlib.compress(rows)) if rows is not None else b""
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + idat + png_chunk(b"IEND", b"")


def solid(size, colour, mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def exif_rotated_jpeg(path: Path) -> None:
    """Stored 48x32: left half red, right half blue; EXIF orientation 6 = display rotated 90 degrees clockwise."""
    img = solid((48, 32), (255, 0, 0))
    img.paste(solid((24, 32), (0, 0, 255)), (24, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    path.write_bytes(jpeg_bytes(img, exif=exif.tobytes()))


def cfg_for(folder: Path, **kw) -> DataConfig:
    return DataConfig(dir=str(folder), resolution=RES, bucket_step=STEP, **kw)


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> tuple[Path, object]:
    """One folder holding every bad input of the fault list; scanned once."""
    d = tmp_path_factory.mktemp("messy")
    ok = solid((40, 40), (10, 200, 30))
    save(ok, d / "good.png")
    (d / "good.txt").write_text("a green square\n", encoding="utf-8")
    (d / "zero.png").write_bytes(b"")
    full = jpeg_bytes(solid((64, 64), (120, 30, 200)))
    (d / "trunc.jpg").write_bytes(full[: len(full) // 2])
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (d / "trunc2.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "text.png").write_text("this is not an image")
    (d / "bomb.png").write_bytes(raw_png(30000, 30000, 8, 2, None))  # 9e8 pixels > 2 x PIL's limit, header only
    (d / "bomb2.png").write_bytes(raw_png(10000, 10000, 8, 2, None))  # 1e8: over the limit, PIL only warns
    (d / "lab.tif").write_bytes(b"")  # not an image extension: ignored
    save(solid((10, 10), (1, 2, 3)), d / "tiny.png")  # below the smallest bucket side (16)
    (d / "cmyk.jpg").write_bytes(jpeg_bytes(solid((32, 32), (200, 60, 30)).convert("CMYK")))
    save(Image.fromarray(np.full((32, 32), 0x8080, np.uint16)), d / "gray16.png")
    rgb16 = b"".join(b"\x00" + struct.pack(">HHH", 0xFFFF, 0x8080, 0x0000) * 32 for _ in range(32))
    (d / "rgb16.png").write_bytes(raw_png(32, 32, 16, 2, rgb16))
    save(solid((32, 32), 77, "L"), d / "gray.png")
    rgba = solid((32, 32), (255, 0, 0, 255), "RGBA")
    rgba.paste(solid((16, 32), (0, 0, 0, 0), "RGBA"), (0, 0))  # left half fully transparent
    save(rgba, d / "rgba.png")
    save(solid((32, 32), (0, 0, 255)).convert("P", palette=Image.Palette.ADAPTIVE), d / "palette.png")
    exif_rotated_jpeg(d / "rotated.jpg")
    (d / "rotated.txt").write_bytes("caf\u00e9 photo".encode("cp1252"))  # not UTF-8
    (d / "gray.txt").write_text("   \n")  # empty caption
    (d / "orphan.txt").write_text("caption without an image")
    save(solid((32, 32), (9, 9, 9)), d / "UPPER.PNG")  # extension case
    save(solid((32, 32), (9, 9, 9)), d / "webp.webp")
    save(solid((32, 32), (9, 9, 9)), d / ".hidden" / "x.png")  # hidden folders are not data
    return d, scan_dataset(cfg_for(d, default_caption="a picture"), STEP)


def test_bad_inputs_are_counted_skips_with_names(messy):
    _, index = messy
    rep = index.report
    skipped = {name: reason for reason, names in rep.skipped.items() for name in names}
    assert set(skipped) == {"zero.png", "trunc.jpg", "trunc2.png", "text.png", "bomb.png", "bomb2.png", "tiny.png"}
    assert skipped["zero.png"] == "empty file"
    assert skipped["text.png"] == "not an image"
    assert skipped["trunc.jpg"].startswith("unreadable") and skipped["trunc2.png"].startswith("unreadable")
    assert "limit" in skipped["bomb.png"] and "limit" in skipped["bomb2.png"]
    assert "smallest bucket" in skipped["tiny.png"]
    used = sorted(it.path.name for it in index.items)
    assert used == sorted(
        ["good.png", "cmyk.jpg", "gray16.png", "rgb16.png", "gray.png", "rgba.png", "palette.png", "rotated.jpg",
         "UPPER.PNG", "webp.webp"]
    )
    assert rep.images_found == 17 and rep.images_used == 10 and rep.num_skipped == 7
    assert rep.orphan_captions == ["orphan.txt"]
    assert rep.empty_captions == ["gray.txt"] and rep.non_utf8_captions == ["rotated.txt"]
    assert sorted(rep.default_captions) == sorted(
        ["cmyk.jpg", "gray16.png", "rgb16.png", "rgba.png", "palette.png", "UPPER.PNG", "webp.webp"]
    )
    assert rep.converted["CMYK"] == 1 and rep.converted["L"] == 1 and rep.converted["RGBA"] == 1
    assert rep.converted["P"] == 1 and rep.rotated == 1
    text = rep.summary()
    for name in ["zero.png", "trunc.jpg", "bomb.png", "orphan.txt", "rotated.txt", "tiny.png"]:
        assert name in text


def test_captions_default_empty_non_utf8(messy):
    _, index = messy
    cap = {it.path.name: it.caption for it in index.items}
    assert cap["good.png"] == "a green square"
    assert cap["cmyk.jpg"] == "a picture"  # default caption
    assert cap["gray.png"] == ""  # empty caption stays empty (counted), default is only for missing files
    assert cap["rotated.jpg"] == "caf\u00e9 photo"  # decoded as Windows-1252


def by_name(index, name) -> DataItem:
    return next(it for it in index.items if it.path.name == name)


def pixels(index, name) -> np.ndarray:
    it = by_name(index, name)
    x = load_image(it, it.bucket, "center")
    assert x.shape == (3, it.bucket[1], it.bucket[0]) and x.min() >= -1 and x.max() <= 1
    return ((x + 1) * 127.5).round().permute(1, 2, 0).numpy()


def test_mode_conversions(messy):
    _, index = messy
    np.testing.assert_allclose(pixels(index, "cmyk.jpg").mean((0, 1)), [200, 60, 30], atol=6)
    np.testing.assert_allclose(pixels(index, "gray16.png"), 128, atol=1)  # not clipped to white
    np.testing.assert_allclose(pixels(index, "rgb16.png").mean((0, 1)), [255, 128, 0], atol=1)
    np.testing.assert_allclose(pixels(index, "gray.png"), 77, atol=1)
    rgba = pixels(index, "rgba.png")
    np.testing.assert_allclose(rgba[:, :14], 255, atol=1)  # transparent half composited over white
    np.testing.assert_allclose(rgba[:, 18:], np.broadcast_to([255, 0, 0], rgba[:, 18:].shape), atol=1)
    np.testing.assert_allclose(pixels(index, "palette.png").mean((0, 1)), [0, 0, 255], atol=1)


def test_palette_transparency_and_16bit_modes_directly():
    p = solid((4, 4), (0, 255, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
    p.info["transparency"] = p.getpixel((0, 0))
    assert np.asarray(to_rgb(p)).min() == 255  # the only colour is transparent -> white
    q = Image.new("P", (2, 2))
    q.putpalette([10, 20, 30, 0] * 256, "RGBA")  # alpha in the palette itself
    assert np.asarray(to_rgb(q)).min() == 255
    i32 = Image.fromarray(np.full((2, 2), 65535, np.int32), "I")
    assert np.asarray(to_rgb(i32)).min() == 255
    f = Image.fromarray(np.full((2, 2), 100.0, np.float32), "F")
    assert np.asarray(to_rgb(f)).max() == 100


def test_exif_rotation_applied(messy):
    _, index = messy
    it = by_name(index, "rotated.jpg")
    assert it.size == (32, 48)  # stored 48x32, displayed portrait
    assert it.bucket[1] > it.bucket[0]
    px = pixels(index, "rotated.jpg")
    h = px.shape[0]
    # rotated clockwise: the stored left (red) half is now on top
    np.testing.assert_allclose(px[: h // 2 - 3].mean((0, 1)), [255, 0, 0], atol=12)
    np.testing.assert_allclose(px[h // 2 + 3 :].mean((0, 1)), [0, 0, 255], atol=12)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_folder_errors(tmp_path):
    with pytest.raises(DataError) as e:
        scan_dataset(cfg_for(tmp_path / "nope"), STEP)
    assert "not found" in one_line(e) and "nope" in one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        scan_dataset(cfg_for(tmp_path / "empty"), STEP)
    assert "no images" in one_line(e) and "empty" in one_line(e)
    caps = tmp_path / "caps"
    caps.mkdir()
    (caps / "a.txt").write_text("x")
    with pytest.raises(DataError) as e:
        scan_dataset(cfg_for(caps), STEP)
    assert "1 caption files but no images" in one_line(e)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "b.jpg").write_text("hello")
    with pytest.raises(DataError) as e:
        scan_dataset(cfg_for(bad), STEP)
    assert "none of the 2 images is usable" in one_line(e)
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError):
        scan_dataset(cfg_for(tmp_path / "file.png"), STEP)
    with pytest.raises(ConfigError, match="data.repeats = 0"):
        cfg_for(tmp_path, repeats=0).validate()


def test_data_table_loads_strictly(tmp_path):
    @dataclass(frozen=True)
    class Recipe:
        data: DataConfig

    path = tmp_path / "c.toml"
    path.write_text('[data]\ndir = "imgs"\ncrop = "random"\nrepeats = 3\n')
    cfg = load_config(Recipe, path, ["data.trigger=zxq"]).data
    assert (cfg.dir, cfg.crop, cfg.repeats, cfg.trigger, cfg.resolution) == ("imgs", "random", 3, "zxq", 512)
    assert cfg.resolved_cache_dir() == Path("imgs") / ".dev2pro_cache" and cfg.num_variants() == 4
    for bad, msg in [("data.crop=middle", "data.crop"), ("data.repeat=2", "did you mean 'repeats'"),
                     ("data.resolution=-4", "data.resolution"), ("data.flip=3", "data.flip")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(Recipe, path, [bad])


def test_trigger_default_caption_and_repeats(tmp_path):
    for folder, n in [("plain", 2), ("3_style", 2), ("3_style/sub", 1), ("10_x/2_y", 1)]:
        for i in range(n):
            save(solid((32, 32), (i, 0, 0)), tmp_path / folder / f"{i}.png")
    (tmp_path / "plain" / "0.txt").write_text("a photo of [trigger] at night")
    (tmp_path / "plain" / "1.txt").write_text("a red car")
    index = scan_dataset(cfg_for(tmp_path, trigger="zxq", default_caption="[trigger] style", repeats=2), STEP)
    threaded = scan_dataset(cfg_for(tmp_path, trigger="zxq", default_caption="[trigger] style", repeats=2,
                                    num_workers=2), STEP)
    assert threaded.items == index.items  # same items, same order
    got = {str(it.path.relative_to(tmp_path)): (it.caption, it.repeats) for it in index.items}
    assert got["plain/0.png"] == ("a photo of zxq at night", 2)
    assert got["plain/1.png"] == ("zxq, a red car", 2)
    assert got["3_style/0.png"] == ("zxq style", 3)
    assert got["3_style/sub/0.png"] == ("zxq style", 3)  # nearest N_ folder above
    assert got["10_x/2_y/0.png"] == ("zxq style", 2)
    assert index.report.items == 2 + 2 + 3 + 3 + 3 + 2
    assert apply_trigger("", "zxq") == "zxq" and apply_trigger("[trigger], a cat", "") == "a cat"
    assert apply_trigger("a [trigger] cat", "") == "a cat"


def test_kohya_bucket_list_512():
    # kohya sd-scripts' well-known no-upscale bucket list for 512^2 in steps of 64, sides 256..1024
    want = [(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (704, 320),
            (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)]
    assert make_buckets(512, 64, 256, 1024) == want
    assert bucket_limits(DataConfig(dir="x", resolution=512), 16) == (256, 1024)


def test_bucket_invariants_random_sizes():
    rng = random.Random(0)
    res, step = 512, 16
    lo, hi = 256, 1024
    buckets = make_buckets(res, step, lo, hi)
    assert all(w % step == 0 and h % step == 0 and w * h <= res * res for w, h in buckets)
    assert all(w * h >= res * res - step * hi for w, h in buckets)  # floor loses at most one step row
    n_small = 0
    for _ in range(2000):
        size = (rng.randint(100, 3000), rng.randint(100, 3000))
        b = choose_bucket(size, buckets, resolution=res, step=step, min_side=lo, max_side=hi, upscale=False)
        if b is None:
            assert min(size) * min(1.0, (res * res / (size[0] * size[1])) ** 0.5) < lo + step
            n_small += 1
            continue
        w, h = b
        assert w % step == 0 and h % step == 0 and lo <= w <= hi and lo <= h <= hi
        assert w <= size[0] and h <= size[1]  # never upscaled
        assert w * h <= res * res
        if b in buckets:  # from the list: no other bucket has a closer aspect ratio
            d = abs(np.log(w / h) - np.log(size[0] / size[1]))
            assert all(abs(np.log(x / y) - np.log(size[0] / size[1])) >= d - 1e-12 for x, y in buckets)
        elif size[0] * size[1] >= 4 * res * res and 0.5 < size[0] / size[1] < 2:
            pytest.fail(f"large image {size} got an off-list bucket {b}")
    assert 0 < n_small < 2000
    # with upscale, a small image gets a full-area bucket
    assert choose_bucket((100, 100), buckets, resolution=res, step=step, min_side=lo, max_side=hi, upscale=True) == (
        512,
        512,
    )
    # small but usable: its own size, floored to the step
    assert choose_bucket((300, 290), buckets, resolution=res, step=step, min_side=lo, max_side=hi, upscale=False) == (
        288,
        288,
    )


def test_load_image_resize_and_crops(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    p = save(Image.fromarray(arr), tmp_path / "a.png")
    bucket = (40, 24)
    # reference: cover-resize with LANCZOS then center crop, done by hand
    ref = Image.fromarray(arr).resize((40, 27), Image.Resampling.LANCZOS)
    ref = np.asarray(ref)[1:25, 0:40].astype(np.float32) / 127.5 - 1
    x = load_image(p, bucket, "center")
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), ref, atol=1e-6)
    a = load_image(p, bucket, "random", random.Random(3))
    b = load_image(p, bucket, "random", random.Random(3))
    assert (a == b).all()
    crops = {load_image(p, bucket, "random", random.Random(s)).sum().item() for s in range(12)}
    assert len(crops) > 1  # 3 rows of slack: different seeds give different crops
    flipped = load_image(p, bucket, "center", flip=True)
    assert (flipped == x.flip(-1)).all()
    native = load_image(p, (88, 56), "center")  # no resize needed beyond a 1-2 px crop
    assert native.shape == (3, 56, 88)
