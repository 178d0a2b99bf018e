"""3DGS PLY files: round trip, the header viewers expect, and bad input as one line."""

import numpy as np
import pytest
import torch

from scoredistill.errors import ConfigError
from scoredistill.splat.gaussians import GaussianSplats
from scoredistill.splat.ply import PlyError, SplatData, read_ply, write_ply


def data(n=5, k=0, seed=0):
    r = np.random.default_rng(seed)
    f = lambda *s: r.standard_normal(s).astype(np.float32)  # noqa: E731
    return SplatData(f(n, 3), f(n, 3), f(n, 4), f(n), f(n, 3), f(n, k, 3))


@pytest.mark.parametrize("k", [0, 3, 15])
def test_round_trip_is_exact(tmp_path, k):
    d = data(7, k)
    write_ply(tmp_path / "s.ply", d)
    back = read_ply(tmp_path / "s.ply")
    for name in ("means", "log_scales", "quats", "opacity_logits", "sh_dc", "sh_rest"):
        assert np.array_equal(getattr(back, name), getattr(d, name)), name
    assert (tmp_path / "s.ply").stat().st_size == len(header_of(tmp_path / "s.ply")) + 7 * 4 * (17 + 3 * k)


def header_of(path):
    raw = open(path, "rb").read()
    return raw[:raw.index(b"end_header\n") + len(b"end_header\n")]


def test_header_is_the_reference_3dgs_layout(tmp_path):
    write_ply(tmp_path / "s.ply", data(3, 3))
    expected = ["ply", "format binary_little_endian 1.0", "element vertex 3"]
    expected += [f"property float {n}" for n in ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]]
    expected += [f"property float f_rest_{i}" for i in range(9)]
    expected += [f"property float {n}" for n in ["opacity", "scale_0", "scale_1", "scale_2",
                                                 "rot_0", "rot_1", "rot_2", "rot_3"]]
    expected.append("end_header")
    assert header_of(tmp_path / "s.ply").decode("ascii") == "\n".join(expected) + "\n"


def test_f_rest_is_channel_major(tmp_path):
    d = data(1, 3)
    d.sh_rest[:] = np.arange(9, dtype=np.float32).reshape(3, 3)  # [coefficient, channel]
    write_ply(tmp_path / "s.ply", d)
    raw = open(tmp_path / "s.ply", "rb").read()
    body = np.frombuffer(raw[len(header_of(tmp_path / "s.ply")):], dtype="<f4")
    # f_rest_{c K + k} = coefficient k of channel c
    assert body[9:18].tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8]


def test_splats_round_trip_through_ply(tmp_path):
    s = GaussianSplats.ball(50, 0.3, seed=2, sh_degree=1)
    with torch.no_grad():
        s.sh_rest.normal_()
    s.save_ply(tmp_path / "scene.ply")
    t = GaussianSplats.from_ply(tmp_path / "scene.ply")
    for (n, p), (_, q) in zip(s.named_groups().items(), t.named_groups().items()):
        assert torch.equal(p, q), n
    assert GaussianSplats.from_ply(tmp_path / "scene.ply", sh_degree=0).sh_rest is None


def write_raw(path, header_lines, body=b""):
    path.write_bytes(("\n".join(header_lines) + "\n").encode() + body)
    return path


PROPS = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
         "rot_0", "rot_1", "rot_2", "rot_3"]


def good_header(n, props=PROPS, fmt="binary_little_endian"):
    return ["ply", f"format {fmt} 1.0", f"element vertex {n}"] + [f"property float {p}" for p in props] + ["end_header"]


def one_row(props=PROPS, **vals):
    row = {p: 0.0 for p in props}
    row["rot_0"] = 1.0
    row.update(vals)
    return np.array([row[p] for p in props], dtype="<f4").tobytes()


def test_reads_minimal_file_without_normals_or_f_rest(tmp_path):
    p = write_raw(tmp_path / "m.ply", good_header(2), one_row(x=1.0) + one_row(y=2.0))
    d = read_ply(p)
    assert d.means.tolist() == [[1, 0, 0], [0, 2, 0]] and d.sh_rest.shape == (2, 0, 3)


@pytest.mark.parametrize("case,pattern", [
    ("missing", "missing vertex properties opacity, scale_2"),
    ("ascii", "ASCII PLY"),
    ("nan", r"non-finite value \(NaN or inf\) in property 'y' at vertex 1"),
    ("inf", "non-finite value"),
    ("truncated", "truncated: 2 vertices need 112 bytes of data, found 60"),
    ("not_ply", "not a PLY file"),
    ("no_end", "no end_header"),
    ("big_endian", "binary_big_endian"),
    ("empty", "no Gaussians"),
    ("bad_rest", "found 4 f_rest properties"),
    ("zero_quat", "zero rotation quaternion at vertex 0"),
])
def test_bad_input_is_one_line_naming_the_file(tmp_path, case, pattern):
    p = tmp_path / "bad.ply"
    if case == "missing":
        props = [q for q in PROPS if q not in ("opacity", "scale_2")]
        write_raw(p, good_header(1, props), one_row(props))
    elif case == "ascii":
        write_raw(p, good_header(1, fmt="ascii"), b" ".join([b"0"] * 14))
    elif case == "nan":
        write_raw(p, good_header(2), one_row() + one_row(y=float("nan")))
    elif case == "inf":
        write_raw(p, good_header(1), one_row(scale_0=float("inf")))
    elif case == "truncated":
        write_raw(p, good_header(2), (one_row() + one_row())[:60])
    elif case == "not_ply":
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    elif case == "no_end":
        p.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 1\n")
    elif case == "big_endian":
        write_raw(p, good_header(1, fmt="binary_big_endian"), one_row())
    elif case == "empty":
        write_raw(p, good_header(0))
    elif case == "bad_rest":
        props = PROPS + [f"f_rest_{i}" for i in range(4)]
        write_raw(p, good_header(1, props), one_row(props))
    elif case == "zero_quat":
        write_raw(p, good_header(1), one_row(rot_0=0.0))
    with pytest.raises(PlyError, match=pattern) as e:
        read_ply(p)
    assert isinstance(e.value, ConfigError)
    assert str(e.value).startswith(str(p) + ": ") and "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(PlyError, match="cannot read"):
        read_ply(tmp_path / "nope.ply")
