"""The caption command end to end, and every class of bad input it must survive (the tests make the files)."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from captioner import caption as lib
from conftest import CLI_WORDS, tiny_captioner

from captioner.cli import caption as cli
from captioner.config import DecodeConfig
from captioner.data import images as images_mod
from captioner.data.images import ImageLoadError, load_image, to_tensor
from captioner.models.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "caption.py"
WORDS = CLI_WORDS


# --------------------------------------------------------------------------------------------------
# Fixtures: a tiny checkpoint and image files
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny soft-attention checkpoint (32 px shapes CNN, 16-wide decoder)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    model, vocab = tiny_captioner()
    save_checkpoint(path, model, vocab)
    return path


@pytest.fixture(scope="module")
def hard_ckpt(tmp_path_factory) -> Path:
    """A tiny hard-attention checkpoint."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny_hard.pt"
    model, vocab = tiny_captioner("hard", seed=1)
    save_checkpoint(path, model, vocab)
    return path


def _rgb(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


@pytest.fixture
def photos(tmp_path) -> Path:
    """A directory of four good images (three PNG, one JPEG) plus a non-image that a directory scan skips."""
    d = tmp_path / "photos"
    d.mkdir()
    for i in range(3):
        _rgb(i).save(d / f"img{i}.png")
    _rgb(3).save(d / "img3.jpg", quality=90)
    (d / "notes.txt").write_text("not an image, not listed by a directory scan")
    return d


def _lines(text: str) -> list[tuple[str, str]]:
    return [tuple(line.split("\t", 1)) for line in text.splitlines() if line]  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------
# Bad input, class by class (load_image level)
def _png_header(width: int, height: int) -> bytes:
    """A PNG with only a header claiming ``width x height`` (no pixel data): what a decompression bomb looks like from outside."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_truncated_png_and_jpeg(tmp_path):
    for ext, kw in ((".png", {}), (".jpg", {"quality": 95})):
        buf = io.BytesIO()
        _rgb(0, (64, 64)).save(buf, format="PNG" if ext == ".png" else "JPEG", **kw)
        path = tmp_path / f"cut{ext}"
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        with pytest.raises(ImageLoadError, match="truncated|corrupt") as e:
            load_image(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_empty_missing_and_directory(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty file"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "locked.png"
    _rgb(0).save(path)
    if os.name == "posix" and os.geteuid() != 0:
        path.chmod(0)  # a real permission error
    else:  # root reads anything: make the open fail the way an unreadable file does
        def deny(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(images_mod.Image, "open", deny)
    try:
        with pytest.raises(ImageLoadError, match="permission denied"):
            load_image(path)
    finally:
        path.chmod(0o644)
    monkeypatch.undo()

    def io_error(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(images_mod.Image, "open", io_error)
    with pytest.raises(ImageLoadError, match="unreadable"):
        load_image(path)


@pytest.mark.parametrize("content", [b"hello, I am text\n", bytes(range(256)) * 4, b"\x89PNG\r\n\x1a\n" + b"\0" * 50])
def test_non_image_with_image_extension(tmp_path, content):
    path = tmp_path / "fake.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError) as e:
        load_image(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_animated_gif_uses_first_frame(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (20, 10), c) for c in colours]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 3
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (20, 10)
    assert img.getpixel((5, 5)) == (255, 0, 0)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk(tmp_path, fmt):
    path = tmp_path / f"cmyk.{fmt.lower()}"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, format=fmt)  # pure red in CMYK
    img = load_image(path)
    r, g, b = img.getpixel((8, 8))
    assert img.mode == "RGB" and r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16bit_greyscale(tmp_path, ext):
    a = np.array([[0, 32768, 65535]], dtype=np.uint16).repeat(4, 0)  # (4, 3)
    path = tmp_path / f"grey16{ext}"
    Image.fromarray(a).save(path)
    assert Image.open(path).mode.startswith("I")
    img = load_image(path)
    px = np.asarray(img)
    assert img.mode == "RGB" and px.dtype == np.uint8
    assert px[0, :, 0].tolist() == [0, 128, 255]  # full 16-bit range mapped to 0-255
    assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (8, 8), 0)
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.putpixel((0, 0), 1)
    p.save(tmp_path / "pal.png")
    img = load_image(tmp_path / "pal.png")
    assert img.getpixel((0, 0)) == (200, 100, 50) and img.getpixel((3, 3)) == (10, 20, 30)
    p.save(tmp_path / "pal_t.png", transparency=0)  # index 0 transparent -> white
    img = load_image(tmp_path / "pal_t.png")
    assert img.getpixel((3, 3)) == (255, 255, 255) and img.getpixel((0, 0)) == (200, 100, 50)


def test_alpha_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (10, 200, 30, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    rgba.save(tmp_path / "rgba.png")
    img = load_image(tmp_path / "rgba.png")
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 1)) == (10, 200, 30)
    assert all(120 <= v <= 135 for v in img.getpixel((2, 2)))  # half-transparent black over white: mid grey
    la = Image.new("LA", (4, 4), (0, 0))
    la.putpixel((1, 1), (50, 255))
    la.save(tmp_path / "la.png")
    img = load_image(tmp_path / "la.png")
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 1)) == (50, 50, 50)


@pytest.mark.parametrize("mode", ["L", "1"])
def test_greyscale_and_bilevel(tmp_path, mode):
    Image.new(mode, (6, 6), 255).save(tmp_path / f"{mode}.png")
    img = load_image(tmp_path / f"{mode}.png")
    assert img.mode == "RGB" and img.getpixel((2, 2)) == (255, 255, 255)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_gives_the_same_tensor_as_the_rotated_image(tmp_path, orientation):
    stored = _rgb(7, (24, 16))  # not square, not symmetric: any mistake shows
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged = tmp_path / f"tagged{orientation}.png"
    stored.save(tagged, exif=exif)
    upright = ImageOps.exif_transpose(Image.open(tagged))  # what a photo viewer shows
    physical = tmp_path / f"physical{orientation}.png"
    upright.save(physical)  # no EXIF: pixels physically rotated
    assert upright.size != stored.size or orientation in (2, 3, 4)
    a, b = load_image(tagged), load_image(physical)
    assert a.size == b.size == upright.size
    ta, tb = to_tensor(a, 32, (0.5,) * 3, (0.5,) * 3), to_tensor(b, 32, (0.5,) * 3, (0.5,) * 3)
    assert torch.equal(ta, tb)


def test_exif_rotate_90_matches_a_hand_rotation(tmp_path):
    stored = _rgb(8, (24, 16))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    stored.save(tmp_path / "r.png", exif=exif)
    assert np.array_equal(np.asarray(load_image(tmp_path / "r.png")), np.asarray(stored.transpose(Image.Transpose.ROTATE_270)))


def test_decompression_bomb_guard(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(100_000, 100_000))  # 10 Gpixels claimed in 57 bytes
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(path)
    _rgb(0, (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 5_000)  # the limit is read at call time
    with pytest.raises(ImageLoadError, match="too large .*decompression bomb"):
        load_image(tmp_path / "big.png")
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 10_000)
    assert load_image(tmp_path / "big.png").size == (100, 100)


# --------------------------------------------------------------------------------------------------
# Inputs and streaming
def test_expand_inputs_dirs_globs_and_order(photos, tmp_path):
    items = lib.expand_inputs([str(photos / "img3.jpg"), str(photos), str(photos / "img*.png"), str(tmp_path / "none*.png"),
                               str(tmp_path / "missing.png")])
    paths = [i.path for i in items]
    assert paths[0] == str(photos / "img3.jpg")
    assert paths[1:5] == sorted(str(p) for p in photos.iterdir() if p.suffix in (".png", ".jpg"))  # .txt skipped
    assert paths[5:8] == [str(photos / f"img{i}.png") for i in range(3)]
    assert items[8].error and "no image files match" in items[8].error
    assert items[9].path == str(tmp_path / "missing.png") and items[9].error is None  # reported when read


def test_caption_images_streams_one_batch_ahead(ckpt, tmp_path, monkeypatch):
    for i in range(20):
        _rgb(i, (20, 20)).save(tmp_path / f"{i:02d}.png")
    loads = []
    real = lib._load_one
    monkeypatch.setattr(lib, "_load_one", lambda *a: (loads.append(a[0]), real(*a))[1])
    stream = lib.caption_images(sorted(tmp_path.glob("*.png")), ckpt, DecodeConfig(strategy="greedy", max_len=4), batch_size=4, device="cpu")
    first = next(stream)
    assert first.ok and first.path.endswith("00.png")
    assert len(loads) <= 8  # the current batch and the next one: never all 20
    rest = list(stream)
    assert len(rest) == 19 and len(loads) == 20


def test_default_decoding_is_beam_when_available(ckpt):
    model, vocab = lib.load_model(ckpt)
    cfg = lib.default_decode_config(model, vocab)
    assert cfg.strategy == "beam" and cfg.beam_size == 3


# --------------------------------------------------------------------------------------------------
# The command
def test_end_to_end_subprocess_dir_and_glob_with_json(ckpt, photos, tmp_path):
    """scripts/caption.py from another working directory, on a directory and a glob; --json matches stdout."""
    out = tmp_path / "out" / "captions.json"
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(photos), str(photos / "*.png"), "--checkpoint", str(ckpt), "--json", str(out),
         "--max-len", "6", "--batch-size", "3"],
        cwd=run_dir, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal, no warnings
    lines = _lines(proc.stdout)
    expected = sorted(str(p) for p in photos.iterdir() if p.suffix != ".txt") + [str(photos / f"img{i}.png") for i in range(3)]
    assert [p for p, _ in lines] == expected
    assert all(c.strip() for _, c in lines)
    data = json.loads(out.read_text())
    assert [(r["path"], r["caption"]) for r in data["images"]] == lines
    assert data["failed"] == 0 and data["captioned"] == 7 and data["decode"]["max_len"] == 6
    assert data["checkpoint"] == str(ckpt)
    by_path = dict(lines)
    assert by_path[str(photos / "img0.png")] == lines[-3][1]  # the same image gives the same caption in either batch


def test_in_process_main_bad_files_are_reported_and_others_captioned(ckpt, photos, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "text.jpg").write_text("I am not a JPEG")
    buf = io.BytesIO()
    _rgb(1, (64, 64)).save(buf, format="PNG")
    (bad / "truncated.png").write_bytes(buf.getvalue()[:200])
    (bad / "bomb.png").write_bytes(_png_header(50_000, 50_000))
    frames = [Image.new("RGB", (30, 30), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(bad / "anim.gif", save_all=True, append_images=frames[1:])  # fine: first frame
    Image.new("CMYK", (30, 30), (0, 255, 255, 0)).save(bad / "cmyk.jpg")
    Image.fromarray(np.full((30, 30), 40000, dtype=np.uint16)).save(bad / "grey16.png")
    Image.new("LA", (30, 30), (90, 100)).save(bad / "la.png")
    Image.new("P", (30, 30), 3).save(bad / "palette.gif")

    rc = cli.main([str(photos / "img0.png"), str(bad), str(tmp_path / "missing.png"), "-c", str(ckpt), "--greedy",
                   "--max-len", "5", "--json", str(tmp_path / "r.json")])
    out, err = capsys.readouterr()
    assert rc == 1
    errors = err.strip().splitlines()
    assert sorted(e.split(": ")[1] for e in errors) == sorted([str(bad / "bomb.png"), str(bad / "text.jpg"), str(bad / "truncated.png"),
                                                              str(tmp_path / "missing.png")])
    assert all(e.startswith("error: ") for e in errors)
    captioned = [p for p, _ in _lines(out)]
    assert captioned == [str(photos / "img0.png")] + [str(bad / n) for n in ("anim.gif", "cmyk.jpg", "grey16.png", "la.png", "palette.gif")]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["failed"] == 4 and data["captioned"] == 6
    assert [r["path"] for r in data["images"]][-1] == str(tmp_path / "missing.png")
    assert {r["path"]: r["caption"] for r in data["images"] if "caption" in r} == dict(_lines(out))


def test_missing_and_incompatible_checkpoints_exit_2(photos, tmp_path, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("this is not a checkpoint\n")
    random_dict = tmp_path / "random.pt"
    torch.save({"weights": torch.randn(3, 3), "epoch": 4}, random_dict)
    model, vocab = tiny_captioner()
    wrong = tmp_path / "wrong.pt"
    save_checkpoint(wrong, model, vocab)
    ck = torch.load(wrong, weights_only=True)
    ck["model"]["decoder.embed.weight"] = torch.zeros(3, 3)  # shapes that match no model this config builds
    torch.save(ck, wrong)
    for path, reason in ((tmp_path / "nope.pt", "not found"), (text, "not a readable captioner checkpoint"),
                         (random_dict, "missing format_version"), (wrong, "does not match")):
        rc = cli.main([str(photos), "--checkpoint", str(path)])
        out, err = capsys.readouterr()
        assert rc == 2 and out == ""
        assert err.count("\n") == 1 and err.startswith(f"error: {path}") and reason in err, err


def test_subprocess_missing_checkpoint_exit_status(photos, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(photos), "--checkpoint", str(tmp_path / "nope.pt")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.pt'}: checkpoint not found"]


def test_decoding_options(ckpt, photos, capsys):
    base = [str(photos / "img1.png"), "-c", str(ckpt), "--max-len", "4"]
    outs = {}
    for name, extra in (("greedy", ["--greedy"]), ("beam1", ["--beam", "1"]), ("beam4", ["--beam", "4"]),
                        ("sample", ["--sample", "--temperature", "0.7", "--seed", "3"]), ("sample_again", ["--sample", "--temperature", "0.7", "--seed", "3"])):
        assert cli.main(base + extra) == 0
        outs[name] = _lines(capsys.readouterr().out)[0][1]
        assert 1 <= len(outs[name].split()) <= 4
    assert outs["beam1"] == outs["greedy"]  # beam of width 1 is greedy
    assert outs["sample"] == outs["sample_again"]  # seeded


@pytest.mark.parametrize("argv", [["--greedy", "--beam", "2"], ["--temperature", "0.5"], ["--beam", "0"], ["--gif"], []])
def test_bad_arguments_exit_2(ckpt, photos, argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([str(photos), "-c", str(ckpt), *argv] if argv else [])
    assert e.value.code == 2
    capsys.readouterr()


def test_help_mentions_first_frame(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "FIRST FRAME" in capsys.readouterr().out


def test_attention_dir_writes_one_figure_per_image(hard_ckpt, photos, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    _rgb(9).save(other / "img0.png")  # same file name as photos/img0.png: must not overwrite it
    att = tmp_path / "att"
    rc = cli.main([str(photos / "img0.png"), str(other / "img0.png"), "-c", str(hard_ckpt), "--greedy", "--max-len", "3",
                   "--attention-dir", str(att), "--gif", "--json", str(tmp_path / "r.json")])
    capsys.readouterr()
    assert rc == 0
    assert sorted(p.name for p in att.iterdir()) == ["img0.gif", "img0.png", "img0_2.gif", "img0_2.png"]
    gif = Image.open(att / "img0.gif")
    assert gif.n_frames >= 2  # the plain image, then one frame per word
    recs = json.loads((tmp_path / "r.json").read_text())["images"]
    assert [Path(r["attention_figure"]).name for r in recs] == ["img0.png", "img0_2.png"]


def test_unavailable_strategy_exits_2(ckpt, photos, capsys, monkeypatch):
    """A build whose decoding offers only greedy: the default falls back to it and --beam is one clear error."""
    monkeypatch.setattr(lib, "STRATEGIES", ("greedy",))
    model, vocab = lib.load_model(ckpt)
    assert lib.default_decode_config(model, vocab).strategy == "greedy"  # the default falls back
    assert cli.main([str(photos / "img0.png"), "-c", str(ckpt), "--max-len", "3"]) == 0
    assert cli.main([str(photos / "img0.png"), "-c", str(ckpt), "--beam", "3"]) == 2
    assert "not available" in capsys.readouterr().err


def test_unwritable_json_exits_2(ckpt, photos, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc = cli.main([str(photos), "-c", str(ckpt), "--json", str(blocker / "out.json")])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.startswith(f"error: {blocker / 'out.json'}: cannot write")
