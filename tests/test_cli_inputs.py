"""gapcallback.cli.inputs and gapcallback.cli.outputs, on real files written to ``tmp_path``."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pickle
import re
import sys

import numpy as np
import pytest
import torch

from gapcallback.cli.inputs import (
    IMAGE_SUFFIXES,
    SUPPORTED_SUFFIXES,
    InputError,
    check_same_features,
    load_callable,
    load_points,
)
from gapcallback.cli.outputs import format_table, staged_outputs, write_csv, write_json

OPT = "--reference"


def raises_input_error(spec: object, *fragments: object, option: str = OPT) -> str:
    """Load ``spec`` expecting an InputError of one line naming ``option`` and ``fragments``."""
    with pytest.raises(InputError) as info:
        load_points(str(spec), option=option)
    return check_message(info.value, option, *fragments)


def check_message(err: BaseException, *fragments: object) -> str:
    assert isinstance(err, InputError)
    assert isinstance(err, ValueError)
    message = str(err)
    assert "\n" not in message and "\r" not in message, message
    for fragment in fragments:
        assert str(fragment) in message, (fragment, message)
    return message


@pytest.fixture
def clean_modules():
    """Forget the modules a test imports (user modules must not leak into other tests)."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


# --------------------------------------------------------------------------------------------
# .npy / .npz
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_npy_round_trip_keeps_float32_and_float64(tmp_path, dtype):
    x = np.random.default_rng(0).normal(size=(7, 3)).astype(dtype)
    np.save(tmp_path / "x.npy", x)
    got = load_points(str(tmp_path / "x.npy"), option=OPT)
    assert got.dtype == torch.from_numpy(x).dtype
    assert got.device.type == "cpu"
    np.testing.assert_array_equal(got.numpy(), x)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.int64, np.uint32])
def test_integer_arrays_become_float32_without_rescaling(tmp_path, dtype):
    x = np.arange(12, dtype=dtype).reshape(4, 3) * 20
    np.save(tmp_path / "x.npy", x)
    got = load_points(str(tmp_path / "x.npy"), option=OPT)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), x.astype(np.float32))


def test_float16_becomes_float32_and_big_endian_is_read(tmp_path):
    x = np.linspace(0, 1, 6, dtype=np.float16).reshape(3, 2)
    np.save(tmp_path / "h.npy", x)
    got = load_points(str(tmp_path / "h.npy"), option=OPT)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), x.astype(np.float32))

    big = np.arange(6, dtype=">f8").reshape(3, 2)
    np.save(tmp_path / "big.npy", big)
    got = load_points(str(tmp_path / "big.npy"), option=OPT)
    assert got.dtype == torch.float64
    np.testing.assert_array_equal(got.numpy(), big.astype(np.float64))


def test_images_shaped_arrays_and_upper_case_suffix(tmp_path):
    x = np.random.default_rng(1).random((5, 3, 4, 4)).astype(np.float32)
    with open(tmp_path / "IMGS.NPY", "wb") as f:  # np.save would append ".npy" to the name
        np.save(f, x)
    got = load_points(str(tmp_path / "IMGS.NPY"), option=OPT)
    assert got.shape == (5, 3, 4, 4)
    np.testing.assert_array_equal(got.numpy(), x)


def test_npz_single_array_needs_no_name(tmp_path):
    x = np.ones((4, 2), dtype=np.float64)
    np.savez(tmp_path / "one.npz", feats=x)
    got = load_points(str(tmp_path / "one.npz"), option=OPT)
    assert got.dtype == torch.float64
    np.testing.assert_array_equal(got.numpy(), x)


def test_npz_several_arrays_pick_by_name(tmp_path):
    a = np.zeros((3, 2), dtype=np.float32)
    b = np.arange(8, dtype=np.float32).reshape(4, 2)
    path = tmp_path / "many.npz"
    np.savez(path, train=a, test=b)
    got = load_points(f"{path}:test", option=OPT)
    np.testing.assert_array_equal(got.numpy(), b)
    raises_input_error(f"{path}:", path, "2 arrays")  # an empty name picks nothing
    message = raises_input_error(path, path, "train", "test", f"{path}:")
    assert "2 arrays" in message
    raises_input_error(f"{path}:val", path, "'val'", "train", "test")


def test_npz_compressed_and_empty(tmp_path):
    x = np.ones((2, 2), dtype=np.float32)
    np.savez_compressed(tmp_path / "c.npz", x=x)
    np.testing.assert_array_equal(load_points(str(tmp_path / "c.npz"), option=OPT).numpy(), x)
    np.savez(tmp_path / "empty.npz")
    raises_input_error(tmp_path / "empty.npz", tmp_path / "empty.npz", "no arrays")


def test_object_arrays_are_refused(tmp_path):
    objects = np.array([{"a": 1}, None], dtype=object)
    np.save(tmp_path / "obj.npy", objects, allow_pickle=True)
    raises_input_error(tmp_path / "obj.npy", tmp_path / "obj.npy", "safety", "np.save")
    np.savez(tmp_path / "obj.npz", x=objects)
    raises_input_error(tmp_path / "obj.npz", tmp_path / "obj.npz", "safety")
    with open(tmp_path / "pickled.npy", "wb") as f:  # a bare pickle behind a .npy suffix
        pickle.dump([1, 2], f)
    raises_input_error(tmp_path / "pickled.npy", tmp_path / "pickled.npy", "safety")


def test_corrupt_npy_is_an_input_error(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((100, 3)))
    data = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[: len(data) // 2])
    raises_input_error(tmp_path / "cut.npy", tmp_path / "cut.npy")


def test_name_on_a_single_array_file_is_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((2, 2)))
    message = raises_input_error(f"{tmp_path / 'x.npy'}:feats", tmp_path / "x.npy", "':feats'")
    assert "single array" in message


@pytest.mark.parametrize(
    ("array", "word"),
    [
        (np.array([[True, False]]), "bool"),
        (np.array([[1 + 2j, 3j]]), "complex"),
        (np.array([["a", "b"]]), "string"),
        (np.array([[b"a", b"b"]]), "bytes"),
    ],
)
def test_non_real_dtypes_are_refused(tmp_path, array, word):
    np.save(tmp_path / "bad.npy", array)
    raises_input_error(tmp_path / "bad.npy", tmp_path / "bad.npy", word, "float")


def test_shape_checks(tmp_path):
    np.save(tmp_path / "scalar.npy", np.float32(3.0))
    raises_input_error(tmp_path / "scalar.npy", tmp_path / "scalar.npy", "single number")
    np.save(tmp_path / "flat.npy", np.arange(5, dtype=np.float32))
    raises_input_error(tmp_path / "flat.npy", tmp_path / "flat.npy", "1-D", "[N, 1]")
    np.save(tmp_path / "empty.npy", np.zeros((0, 3), dtype=np.float32))
    raises_input_error(tmp_path / "empty.npy", tmp_path / "empty.npy", "no points")
    np.save(tmp_path / "nofeat.npy", np.zeros((4, 0), dtype=np.float32))
    raises_input_error(tmp_path / "nofeat.npy", tmp_path / "nofeat.npy", "no features")


def test_non_finite_rows_are_counted_and_listed(tmp_path):
    x = np.zeros((20, 3), dtype=np.float32)
    bad_rows = [2, 5, 7, 11, 13, 17, 19]
    for i, row in enumerate(bad_rows):
        x[row, i % 3] = [np.nan, np.inf, -np.inf][i % 3]
    np.save(tmp_path / "nan.npy", x)
    message = raises_input_error(tmp_path / "nan.npy", tmp_path / "nan.npy", "7 of its 20 rows")
    assert "rows 2, 5, 7, 11, 13, ..." in message
    assert "17" not in message.split("rows 2")[1].split(")")[0]
    assert "drop or fix" in message


# --------------------------------------------------------------------------------------------
# Paths and the ``:name`` suffix
# --------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    raises_input_error(tmp_path / "nope.npy", tmp_path / "nope.npy", "no such file")
    raises_input_error(f"{tmp_path / 'nope.npz'}:x", "no such file", tmp_path / "nope.npz")
    raises_input_error("", "no file given")


def test_missing_path_names_the_option(tmp_path):
    raises_input_error(tmp_path / "g.npy", "no such file", option="--generated")


def test_unknown_extension_lists_supported(tmp_path):
    (tmp_path / "x.csv").write_text("1,2\n3,4\n")
    message = raises_input_error(tmp_path / "x.csv", tmp_path / "x.csv", "'.csv'")
    for suffix in SUPPORTED_SUFFIXES:
        assert suffix in message
    (tmp_path / "bare").write_bytes(b"")
    raises_input_error(tmp_path / "bare", tmp_path / "bare", "no suffix")


def test_single_image_file_points_to_its_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    Image.new("L", (4, 4)).save(tmp_path / "one.png")
    raises_input_error(tmp_path / "one.png", tmp_path / "one.png", "folder", tmp_path)


def test_colon_in_a_file_name_is_part_of_the_path(tmp_path):
    odd = tmp_path / "odd:name.npy"
    x = np.ones((2, 3), dtype=np.float32)
    np.save(odd, x)
    np.testing.assert_array_equal(load_points(str(odd), option=OPT).numpy(), x)
    # A name after the last colon still selects inside an npz whose own name has a colon.
    np.savez(tmp_path / "a:b.npz", p=x, q=2 * x)
    got = load_points(f"{tmp_path / 'a:b.npz'}:q", option=OPT)
    np.testing.assert_array_equal(got.numpy(), 2 * x)


def test_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.savez("rel.npz", a=np.ones((2, 2)), b=np.zeros((3, 2)))
    assert load_points("rel.npz:b", option=OPT).shape == (3, 2)


# --------------------------------------------------------------------------------------------
# .pt / .pth
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pt_tensor_round_trip(tmp_path, suffix, dtype):
    x = torch.randn(6, 2, 3, dtype=dtype)
    torch.save(x, tmp_path / f"x{suffix}")
    got = load_points(str(tmp_path / f"x{suffix}"), option=OPT)
    assert got.dtype == dtype
    torch.testing.assert_close(got, x, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64, torch.uint8])
def test_pt_narrow_and_integer_dtypes_become_float32(tmp_path, dtype):
    x = (torch.arange(12).reshape(4, 3) * 3).to(dtype)
    torch.save(x, tmp_path / "x.pt")
    got = load_points(str(tmp_path / "x.pt"), option=OPT)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, x.float(), rtol=0, atol=0)


@pytest.mark.parametrize("x", [torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 2) * 1j])
def test_pt_bool_and_complex_are_refused(tmp_path, x):
    torch.save(x, tmp_path / "x.pt")
    raises_input_error(tmp_path / "x.pt", tmp_path / "x.pt", str(x.dtype))


def test_pt_parameter_and_non_contiguous(tmp_path):
    p = torch.nn.Parameter(torch.randn(3, 4))
    torch.save(p, tmp_path / "p.pt")
    got = load_points(str(tmp_path / "p.pt"), option=OPT)
    assert not got.requires_grad
    torch.testing.assert_close(got, p.detach(), rtol=0, atol=0)
    t = torch.randn(4, 3).t()
    torch.save(t, tmp_path / "t.pt")
    torch.testing.assert_close(load_points(str(tmp_path / "t.pt"), option=OPT), t)


def test_pt_dict_picks_the_only_tensor_or_by_name(tmp_path):
    x = torch.randn(5, 2)
    torch.save({"feats": x, "epoch": 3, "note": "hi"}, tmp_path / "d.pt")
    torch.testing.assert_close(load_points(str(tmp_path / "d.pt"), option=OPT), x)

    y = torch.randn(4, 2, dtype=torch.float64)
    torch.save({"train": x, "test": y}, tmp_path / "two.pt")
    got = load_points(f"{tmp_path / 'two.pt'}:test", option=OPT)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, y)
    message = raises_input_error(tmp_path / "two.pt", tmp_path / "two.pt", "train", "test")
    assert f"{tmp_path / 'two.pt'}:" in message
    raises_input_error(f"{tmp_path / 'two.pt'}:val", "'val'", "train", "test")
    raises_input_error(f"{tmp_path / 'd.pt'}:epoch", "int", "not a tensor", "feats")
    torch.save({"epoch": 3}, tmp_path / "none.pt")
    raises_input_error(tmp_path / "none.pt", tmp_path / "none.pt", "no tensors")


def test_pt_list_by_index(tmp_path):
    a, b = torch.randn(3, 2), torch.randn(4, 2)
    torch.save([a], tmp_path / "one.pt")
    torch.testing.assert_close(load_points(str(tmp_path / "one.pt"), option=OPT), a)
    torch.save((a, b), tmp_path / "two.pt")
    torch.testing.assert_close(load_points(f"{tmp_path / 'two.pt'}:1", option=OPT), b)
    raises_input_error(tmp_path / "two.pt", tmp_path / "two.pt", "indices 0, 1", ":0")


def test_pt_name_on_a_plain_tensor_is_refused(tmp_path):
    torch.save(torch.ones(2, 2), tmp_path / "x.pt")
    raises_input_error(f"{tmp_path / 'x.pt'}:a", tmp_path / "x.pt", "':a'")


class _Canary:
    """Unpickling this creates a folder: proof that a file was (or was not) unpickled freely."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pt_of_other_objects_is_refused_for_safety(tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    canary = tmp_path / "unpickled"
    torch.save({"x": torch.ones(2, 2), "evil": _Canary(str(canary))}, tmp_path / "evil.pt")
    message = raises_input_error(tmp_path / "evil.pt", tmp_path / "evil.pt", "safety")
    assert "torch.save(" in message and "np.save" in message
    assert "os.mkdir" in message or "posix.mkdir" in message or "nt.mkdir" in message
    assert not canary.exists()

    torch.save({"x": np.ones((2, 2))}, tmp_path / "numpy.pt")
    raises_input_error(tmp_path / "numpy.pt", tmp_path / "numpy.pt", "safety", "torch.save(")

    with open(tmp_path / "plain.pt", "wb") as f:
        pickle.dump(_Canary(str(canary)), f)
    raises_input_error(tmp_path / "plain.pt", tmp_path / "plain.pt", "safety")
    assert not canary.exists()
    assert calls and all(w is True for w in calls)


def test_pt_garbage_and_truncated(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    raises_input_error(tmp_path / "junk.pt", tmp_path / "junk.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    raises_input_error(tmp_path / "empty.pt", tmp_path / "empty.pt")
    torch.save(torch.randn(100, 10), tmp_path / "x.pt")
    data = (tmp_path / "x.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    raises_input_error(tmp_path / "cut.pt", tmp_path / "cut.pt")


def test_pt_nan_rows_named_with_the_entry(tmp_path):
    x = torch.zeros(4, 2)
    x[3, 1] = float("inf")
    torch.save({"a": x, "b": x}, tmp_path / "d.pt")
    raises_input_error(f"{tmp_path / 'd.pt'}:b", f"{tmp_path / 'd.pt'}:b", "1 of its 4", "rows 3")


# --------------------------------------------------------------------------------------------
# .safetensors
# --------------------------------------------------------------------------------------------


def test_safetensors_round_trip(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    a = torch.randn(5, 3)
    b = torch.randn(2, 3, dtype=torch.float64)
    save_file({"a": a}, str(tmp_path / "one.safetensors"))
    torch.testing.assert_close(load_points(str(tmp_path / "one.safetensors"), option=OPT), a)
    save_file({"a": a, "b": b}, str(tmp_path / "two.safetensors"))
    got = load_points(f"{tmp_path / 'two.safetensors'}:b", option=OPT)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, b)
    message = raises_input_error(tmp_path / "two.safetensors", tmp_path / "two.safetensors")
    assert re.search(r"\(keys (a, b|b, a)\)", message) and ".safetensors:NAME" in message
    message = raises_input_error(f"{tmp_path / 'two.safetensors'}:c", "'c'")
    assert re.search(r"\(its tensors: (a, b|b, a)\)", message)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    raises_input_error(tmp_path / "junk.safetensors", tmp_path / "junk.safetensors")


def test_safetensors_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    (tmp_path / "x.safetensors").write_bytes(b"")
    raises_input_error(
        tmp_path / "x.safetensors",
        tmp_path / "x.safetensors",
        "pip install safetensors",
        'pip install "gapcallback[io]"',
    )


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


@pytest.fixture
def Image():
    return pytest.importorskip("PIL.Image")


def _grey(seed: int, size=(6, 4)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)


def test_grey_png_folder_is_exact(tmp_path, Image):
    arrays = [_grey(i) for i in range(3)]
    for i, a in enumerate(arrays):
        Image.fromarray(a, mode="L").save(tmp_path / f"img{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "sub").mkdir()
    Image.fromarray(arrays[0]).save(tmp_path / "sub" / "deeper.png")  # not searched
    got = load_points(str(tmp_path), option=OPT)
    assert got.shape == (3, 1, 4, 6) and got.dtype == torch.float32
    expected = np.stack(arrays)[:, None].astype(np.float32) / 255.0
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-7)


def test_mixed_grey_and_colour_png_and_jpeg_become_rgb(tmp_path, Image):
    rng = np.random.default_rng(3)
    grey = _grey(0)
    ramp = np.linspace(0, 255, 4 * 6 * 3).reshape(4, 6, 3)
    colour = (ramp + rng.integers(0, 8, size=ramp.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "a_grey.png")
    Image.fromarray(colour, mode="RGB").save(tmp_path / "b_colour.PNG")
    Image.fromarray(colour, mode="RGB").save(tmp_path / "c_colour.jpg", quality=95)
    Image.fromarray(grey, mode="L").save(tmp_path / "d_grey.JPEG", quality=95)
    got = load_points(str(tmp_path), option=OPT)
    assert got.shape == (4, 3, 4, 6) and got.dtype == torch.float32
    assert 0.0 <= got.min() and got.max() <= 1.0
    # Sorted by file name; the grey PNG repeated in every channel, the colour PNG exact.
    for c in range(3):
        np.testing.assert_allclose(got[0, c].numpy(), grey / 255.0, atol=1e-7)
    np.testing.assert_allclose(got[1].numpy(), colour.transpose(2, 0, 1) / 255.0, atol=1e-7)
    assert (got[2] - got[1]).abs().mean() < 0.1  # the same picture, through JPEG
    torch.testing.assert_close(got[3, 0], got[3, 1], rtol=0, atol=0)


def test_other_modes_are_converted_consistently(tmp_path, Image):
    grey = _grey(1)
    Image.fromarray(grey, mode="L").convert("LA").save(tmp_path / "a.png")
    wide = (grey.astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "b.png")  # 16-bit grey, opened as I;16
    Image.fromarray(grey, mode="L").convert("1").save(tmp_path / "c.png")
    got = load_points(str(tmp_path), option=OPT)
    assert got.shape == (3, 1, 4, 6)
    np.testing.assert_allclose(got[0, 0].numpy(), grey / 255.0, atol=1e-7)
    np.testing.assert_allclose(got[1, 0].numpy(), grey / 255.0, atol=1e-6)
    assert set(np.unique(got[2].numpy())) <= {0.0, 1.0}

    # Any colour image (palette, RGBA) makes the whole folder RGB.
    Image.fromarray(grey, mode="L").convert("P").save(tmp_path / "d.png")
    rgba = np.dstack([np.stack([grey] * 3, axis=-1), np.full(grey.shape, 7, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "e.png")
    got = load_points(str(tmp_path), option=OPT)
    assert got.shape == (5, 3, 4, 6)
    for i in (0, 1, 4):
        for c in range(3):
            np.testing.assert_allclose(got[i, c].numpy(), grey / 255.0, atol=1e-6)


def test_image_size_mismatch_names_the_file(tmp_path, Image):
    Image.fromarray(_grey(0)).save(tmp_path / "a.png")
    Image.fromarray(_grey(1)).save(tmp_path / "b.png")
    Image.fromarray(_grey(2, size=(5, 4))).save(tmp_path / "c.png")
    Image.fromarray(_grey(3, size=(3, 3))).save(tmp_path / "d.png")
    message = raises_input_error(tmp_path, tmp_path / "c.png", "5x4", "6x4", "a.png")
    assert "d.png" not in message


def test_empty_image_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    message = raises_input_error(tmp_path, tmp_path, "no images")
    for suffix in IMAGE_SUFFIXES:
        assert suffix in message


def test_unreadable_image_names_the_file(tmp_path, Image):
    Image.fromarray(_grey(0)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not a png")
    raises_input_error(tmp_path, tmp_path / "b.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "b.png").write_bytes(data[: len(data) // 2])  # header fine, pixels cut
    raises_input_error(tmp_path, tmp_path / "b.png")


def test_pillow_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    raises_input_error(tmp_path, tmp_path, "pip install pillow")


# --------------------------------------------------------------------------------------------
# check_same_features
# --------------------------------------------------------------------------------------------


def test_check_same_features():
    check_same_features({})
    check_same_features({"--reference r.npy": torch.zeros(3, 4)})
    check_same_features(
        {"--reference r.npy": torch.zeros(3, 4), "--generated g.npy": torch.zeros(9, 4).double()}
    )
    with pytest.raises(InputError) as info:
        check_same_features(
            {
                "--reference r.npy": torch.zeros(3, 4),
                "--generated g.npy": torch.zeros(3, 4),
                "--train t.npy": torch.zeros(2, 3, 2, 2),
            }
        )
    check_message(info.value, "--reference r.npy", "--train t.npy", "[N, 4]", "[N, 3, 2, 2]")


# --------------------------------------------------------------------------------------------
# load_callable
# --------------------------------------------------------------------------------------------

MODULE_SOURCE = """
import math

LIMIT = 3


def double(x):
    return 2 * x


class Model:
    @staticmethod
    def build(width):
        return ["model", width]


def _hidden():
    return None
"""


def test_load_callable_from_a_file(tmp_path, clean_modules):
    (tmp_path / "helper_sibling.py").write_text("FACTOR = 5\n")
    (tmp_path / "user_models.py").write_text(
        MODULE_SOURCE + "\nfrom helper_sibling import FACTOR\n\ndef scaled(x):\n"
        "    return FACTOR * x\n"
    )
    fn = load_callable(f"{tmp_path / 'user_models.py'}:double", option="--model")
    assert fn(4) == 8
    assert load_callable(f"{tmp_path / 'user_models.py'}:Model.build", option="--model")(3) == [
        "model",
        3,
    ]
    assert load_callable(f"{tmp_path / 'user_models.py'}:scaled", option="--model")(2) == 10
    assert str(tmp_path) not in sys.path  # the file's folder only while it is imported


def test_load_callable_from_a_module(tmp_path, monkeypatch, clean_modules):
    (tmp_path / "cli_user_mod_a.py").write_text(MODULE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_callable("cli_user_mod_a:double", option="--model")(5) == 10
    assert load_callable("cli_user_mod_a:Model.build", option="--model")(1) == ["model", 1]
    package = tmp_path / "cli_user_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(MODULE_SOURCE)
    assert load_callable("cli_user_pkg.nets:double", option="--model")(1) == 2


def test_load_callable_errors(tmp_path, monkeypatch, clean_modules):
    (tmp_path / "cli_user_mod_b.py").write_text(MODULE_SOURCE)
    (tmp_path / "cli_user_broken.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "cli_user_needs.py").write_text("import cli_missing_dependency_xyz\n")
    (tmp_path / "cli_user_syntax.py").write_text("def f(:\n")
    (tmp_path / "cli_user_exit.py").write_text("import sys\nsys.exit(2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def error(spec: str) -> str:
        with pytest.raises(InputError) as info:
            load_callable(spec, option="--model")
        return check_message(info.value, "--model", spec)

    assert "MODULE:FUNCTION" in error("cli_user_mod_b")
    assert "MODULE:FUNCTION" in error("cli_user_mod_b:")
    message = error("cli_no_such_module_xyz:fn")
    assert "ModuleNotFoundError" in message and "PYTHONPATH" in message
    message = error("cli_user_broken:fn")
    assert "RuntimeError: boom at import" in message and "PYTHONPATH" in message
    message = error("cli_user_needs:fn")
    assert "cli_missing_dependency_xyz" in message and "install" in message
    assert "SyntaxError" in error("cli_user_syntax:f")
    assert "SystemExit" in error("cli_user_exit:f")
    message = error("cli_user_mod_b:doubel")
    assert "'doubel'" in message and "did you mean 'double'" in message
    assert "Model" in message and "LIMIT" in message
    assert "_hidden" not in message and "math" not in message
    assert "'fit'" in error("cli_user_mod_b:Model.fit")
    message = error("cli_user_mod_b:LIMIT")
    assert "not callable" in message and "int" in message
    assert "no such file" in error(f"{tmp_path / 'nope.py'}:f")
    message = error(f"{tmp_path / 'cli_user_broken.py'}:f")
    assert "RuntimeError: boom at import" in message


def test_load_callable_multi_line_exception_stays_one_line(tmp_path, clean_modules):
    (tmp_path / "multi.py").write_text("raise ValueError('first line\\nsecond line')\n")
    with pytest.raises(InputError) as info:
        load_callable(f"{tmp_path / 'multi.py'}:f", option="--model")
    check_message(info.value, "--model", "first line second line")


# --------------------------------------------------------------------------------------------
# staged_outputs
# --------------------------------------------------------------------------------------------


def test_staged_outputs_success_keeps_other_files(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.txt").write_text("old, unrelated")
    (out / "gap.json").write_text("old")
    with staged_outputs(out) as stage:
        assert stage.is_dir() and list(stage.iterdir()) == []
        assert stage.parent == tmp_path and stage.name.startswith(".results.tmp-")
        (stage / "gap.json").write_text("new")
        (stage / "plots").mkdir()
        (stage / "plots" / "curve.png").write_bytes(b"png")
        assert not (out / "plots").exists()  # nothing visible before the block ends
    assert (out / "keep.txt").read_text() == "old, unrelated"
    assert (out / "gap.json").read_text() == "new"
    assert (out / "plots" / "curve.png").read_bytes() == b"png"
    assert not stage.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_staged_outputs_creates_missing_folders(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    with staged_outputs(str(out)) as stage:
        assert stage.parent == tmp_path  # the closest existing ancestor
        (stage / "x.csv").write_text("a\n1\n")
    assert (out / "x.csv").read_text() == "a\n1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_staged_outputs_failure_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "results"
    with pytest.raises(RuntimeError, match="mid-way"), staged_outputs(out) as stage:
        (stage / "half.json").write_text("{")
        raise RuntimeError("mid-way")
    assert not stage.exists()
    assert list(tmp_path.iterdir()) == []  # neither out_dir nor its parent created

    existing = tmp_path / "results"
    existing.mkdir()
    (existing / "gap.json").write_text("old")
    with pytest.raises(KeyboardInterrupt), staged_outputs(existing) as stage:
        (stage / "gap.json").write_text("new")
        (stage / "extra.txt").write_text("new")
        raise KeyboardInterrupt
    assert sorted(p.name for p in existing.iterdir()) == ["gap.json"]
    assert (existing / "gap.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_staged_outputs_refuses_a_file_and_conflicts(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError), staged_outputs(tmp_path / "file"):
        pass
    out = tmp_path / "out"
    (out / "plots").mkdir(parents=True)
    with pytest.raises(IsADirectoryError), staged_outputs(out) as stage:
        (stage / "a.txt").write_text("a")
        (stage / "plots").write_text("a file where a folder is")
    assert not (out / "a.txt").exists()  # checked before anything moved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]


# --------------------------------------------------------------------------------------------
# write_json / write_csv / format_table
# --------------------------------------------------------------------------------------------


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_write_json_nan_is_null_and_strict(tmp_path):
    obj = {
        "zeta": 1.5,
        "alpha": float("nan"),
        "inf": [float("inf"), -float("inf"), 2],
        "nested": {"np": np.float32(0.25), "arr": np.array([1.0, np.nan]), "t": torch.tensor(3.0)},
        "path": tmp_path / "x",
        "none": None,
        "flag": True,
        "tuple": (1, "two"),
    }
    write_json(tmp_path / "r.json", obj)
    text = (tmp_path / "r.json").read_text(encoding="utf-8")
    data = _strict_json(text)
    assert list(data) == list(obj)  # insertion order, not sorted
    assert data["alpha"] is None and data["inf"] == [None, None, 2]
    assert data["nested"] == {"np": 0.25, "arr": [1.0, None], "t": 3.0}
    assert data["path"] == str(tmp_path / "x") and data["tuple"] == [1, "two"]
    assert text.startswith('{\n  "zeta": 1.5') and text.endswith("}\n")
    with pytest.raises(TypeError):
        write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()


def test_write_csv_round_trip(tmp_path):
    rows = [
        {"size": 10, "gap": 0.1, "name": "a"},
        {"size": 20, "gap": float("nan"), "extra": "e"},
        {"size": 30, "gap": None, "name": "c,d"},
        {"gap": 1 / 3, "size": np.int64(40)},
    ]
    write_csv(tmp_path / "r.csv", rows)
    with open(tmp_path / "r.csv", newline="", encoding="utf-8") as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == ["size", "gap", "name", "extra"]
    assert [r["size"] for r in back] == ["10", "20", "30", "40"]
    assert back[0]["gap"] == "0.1" and math.isnan(float(back[1]["gap"]))
    assert back[1]["gap"] == "nan" and back[2]["gap"] == ""
    assert float(back[3]["gap"]) == 1 / 3
    assert back[1]["name"] == "" and back[2]["name"] == "c,d" and back[1]["extra"] == "e"
    write_csv(tmp_path / "n.csv", [{"a": 1.0, "b": float("nan")}, {"a": float("inf"), "b": None}])
    back = np.genfromtxt(io.StringIO((tmp_path / "n.csv").read_text()), delimiter=",", names=True)
    assert back["a"].tolist() == [1.0, math.inf]
    assert np.isnan(back["b"]).all()
    write_csv(tmp_path / "empty.csv", [])
    assert (tmp_path / "empty.csv").read_text() == ""


def test_format_table():
    rows = [
        {"size": 10, "gap": 0.123456789, "name": "first"},
        {"size": 2000, "gap": float("nan"), "name": "b"},
        {"size": 3, "gap": 1e-9},
    ]
    table = format_table(rows)
    lines = table.split("\n")
    assert lines[0].split() == ["size", "gap", "name"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["10", "0.123457", "first"]
    assert lines[3].split() == ["2000", "nan", "b"]
    assert lines[4].split() == ["3", "1e-09"]
    # Numbers right-aligned, text left-aligned, columns lined up.
    assert lines[2].index("first") == lines[3].index("b") == lines[0].index("name")
    assert lines[2].index("10") + 2 == lines[3].index("2000") + 4 == lines[0].index("size") + 4
    assert not any(line.endswith(" ") for line in lines)
    assert format_table(rows, columns=["name", "size"]).split("\n")[0].split() == ["name", "size"]
    assert format_table([]) == ""
    assert format_table([{"a": None}]).split("\n")[0] == "a"
