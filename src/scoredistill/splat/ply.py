"""Read and write Gaussian splats in the PLY layout of the reference 3DGS code (2308.04079).

The layout splat viewers open: one ``vertex`` element, binary little-endian, ``float`` properties
in the order ``x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 f_rest_0 .. f_rest_{3K-1} opacity scale_0
scale_1 scale_2 rot_0 rot_1 rot_2 rot_3``: opacity as a logit, scales as logs, the rotation a
quaternion ``(w, x, y, z)``, normals unused (written as 0), RGB ``= 0.5 + 0.28209479 f_dc``. Higher
SH coefficients are stored channel-major: ``f_rest_{c K + k}`` is coefficient ``k + 1`` of channel
``c`` (``K`` = 3, 8 or 15 for degrees 1, 2, 3).

Reading accepts any property order and numeric types (and extra properties or elements after the
vertices); anything that is not a finite 3DGS splat file raises :class:`PlyError`, a
:class:`~scoredistill.errors.ConfigError` whose one line names the file and the problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from scoredistill.errors import ConfigError
from scoredistill.fileio import atomic_file

_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
REQUIRED = ("x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
            "rot_0", "rot_1", "rot_2", "rot_3")
_MAX_HEADER = 1 << 16


class PlyError(ConfigError):
    """A file that is not a readable 3DGS PLY; the message names the file and the problem."""

    def __init__(self, path, message: str):
        super().__init__(os.fspath(path), message)


@dataclass
class SplatData:
    """Raw splat arrays (float32): ``means (N,3)``, ``log_scales (N,3)``, ``quats (N,4)`` ``(w,x,y,z)``,
    ``opacity_logits (N,)``, ``sh_dc (N,3)``, ``sh_rest (N,K,3)`` ``[gaussian, coefficient, channel]``."""

    means: np.ndarray
    log_scales: np.ndarray
    quats: np.ndarray
    opacity_logits: np.ndarray
    sh_dc: np.ndarray
    sh_rest: np.ndarray

    def __len__(self) -> int:
        return self.means.shape[0]

    def property_names(self) -> list[str]:
        k = self.sh_rest.shape[1]
        return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
                + [f"f_rest_{i}" for i in range(3 * k)]
                + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def header(data: SplatData) -> bytes:
    lines = ["ply", "format binary_little_endian 1.0", f"element vertex {len(data)}"]
    lines += [f"property float {n}" for n in data.property_names()]
    lines.append("end_header")
    return ("\n".join(lines) + "\n").encode("ascii")


def write_ply(path, data: SplatData) -> None:
    """Write ``data`` atomically (a temporary sibling renamed into place)."""
    n = len(data)
    k = data.sh_rest.shape[1]
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    rest = f32(data.sh_rest).reshape(n, k, 3).transpose(0, 2, 1).reshape(n, 3 * k)
    cols = [f32(data.means).reshape(n, 3), np.zeros((n, 3), np.float32), f32(data.sh_dc).reshape(n, 3), rest,
            f32(data.opacity_logits).reshape(n, 1), f32(data.log_scales).reshape(n, 3), f32(data.quats).reshape(n, 4)]
    body = np.ascontiguousarray(np.concatenate(cols, 1), dtype="<f4")
    with atomic_file(path, "wb") as f:  # a kill mid-write never leaves a truncated scene.ply
        f.write(header(data))
        f.write(body.tobytes())


def _parse_header(path, raw: bytes) -> tuple[int, int, list[tuple[str, str]]]:
    """Return (vertex count, offset of the vertex data, [(property, numpy type)])."""
    if not (raw.startswith(b"ply\n") or raw.startswith(b"ply\r\n")):
        raise PlyError(path, "not a PLY file (it does not start with 'ply')")
    end = raw.find(b"end_header", 0, _MAX_HEADER)
    if end < 0:
        raise PlyError(path, "PLY header has no end_header (truncated or not a PLY file)")
    nl = raw.find(b"\n", end)
    if nl < 0:
        raise PlyError(path, "PLY header is truncated after end_header")
    try:
        text = raw[:end].decode("ascii")
    except UnicodeDecodeError:
        raise PlyError(path, "PLY header is not ASCII text") from None
    fmt = None
    elements: list[tuple[str, int, list[tuple[str, str]]]] = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if not parts or parts[0] in ("comment", "obj_info"):
            continue
        if parts[0] == "format":
            fmt = parts[1] if len(parts) > 1 else ""
        elif parts[0] == "element":
            if len(parts) != 3 or not parts[2].isdigit():
                raise PlyError(path, f"bad element line {line!r}")
            elements.append((parts[1], int(parts[2]), []))
        elif parts[0] == "property":
            if not elements:
                raise PlyError(path, f"property before any element: {line!r}")
            if len(parts) >= 2 and parts[1] == "list":
                elements[-1][2].append((parts[-1], "list"))
                continue
            if len(parts) != 3 or parts[1] not in _TYPES:
                raise PlyError(path, f"bad property line {line!r}")
            elements[-1][2].append((parts[2], _TYPES[parts[1]]))
        else:
            raise PlyError(path, f"unexpected header line {line!r}")
    if fmt is None:
        raise PlyError(path, "PLY header has no format line")
    if fmt == "ascii":
        raise PlyError(path, "ASCII PLY; a 3DGS splat file is 'format binary_little_endian 1.0'")
    if fmt != "binary_little_endian":
        raise PlyError(path, f"format {fmt!r} is not supported; a 3DGS splat file is binary_little_endian")
    if not elements or elements[0][0] != "vertex":
        raise PlyError(path, "the first element must be 'vertex' (one row per Gaussian)")
    _, count, props = elements[0]
    if any(t == "list" for _, t in props):
        raise PlyError(path, "list properties in 'vertex' are not part of the 3DGS layout")
    return count, nl + 1, props


def read_ply(path) -> SplatData:
    """Read a 3DGS splat PLY (see the module docstring); raises :class:`PlyError` on bad input."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise PlyError(path, f"cannot read: {e.strerror or e}") from None
    count, offset, props = _parse_header(path, raw)
    names = [n for n, _ in props]
    missing = [n for n in REQUIRED if n not in names]
    if missing:
        raise PlyError(path, f"not a 3DGS splat file: missing vertex properties {', '.join(missing)}")
    if len(set(names)) != len(names):
        raise PlyError(path, "duplicate vertex property names")
    rest_names = sorted((n for n in names if n.startswith("f_rest_")), key=lambda n: int(n[7:]) if
                        n[7:].isdigit() else -1)
    nrest = len(rest_names)
    if rest_names != [f"f_rest_{i}" for i in range(nrest)] or nrest not in (0, 9, 24, 45):
        raise PlyError(path, f"f_rest_* must be f_rest_0 .. f_rest_{{3K-1}} with K in 3, 8, 15 (SH degree 1-3); "
                       f"found {nrest} f_rest properties")
    if count == 0:
        raise PlyError(path, "no Gaussians (element vertex 0)")
    dtype = np.dtype([(n, "<" + t) for n, t in props])
    need = count * dtype.itemsize
    have = len(raw) - offset
    if have < need:
        raise PlyError(path, f"truncated: {count} vertices need {need} bytes of data, found {have}")
    rows = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    col = lambda *ns: np.stack([rows[n].astype(np.float32) for n in ns], 1)  # noqa: E731
    for n in REQUIRED + tuple(rest_names):
        bad = ~np.isfinite(rows[n].astype(np.float64))
        if bad.any():
            raise PlyError(path, f"non-finite value (NaN or inf) in property {n!r} at vertex {int(np.argmax(bad))}")
    k = nrest // 3
    rest = (col(*rest_names).reshape(count, 3, k).transpose(0, 2, 1).copy() if k
            else np.zeros((count, 0, 3), np.float32))
    quats = col("rot_0", "rot_1", "rot_2", "rot_3")
    if (np.linalg.norm(quats, axis=1) == 0).any():
        raise PlyError(path, f"zero rotation quaternion at vertex {int(np.argmax(np.linalg.norm(quats, axis=1) == 0))}")
    return SplatData(col("x", "y", "z"), col("scale_0", "scale_1", "scale_2"), quats, col("opacity")[:, 0],
                     col("f_dc_0", "f_dc_1", "f_dc_2"), rest)
