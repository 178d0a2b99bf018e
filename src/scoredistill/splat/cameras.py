"""Orbit cameras looking at the origin, z up (DreamFusion 2209.14988 / threestudio conventions).

A camera at elevation ``e``, azimuth ``a`` and distance ``d`` sits at
``C = d (cos e cos a, cos e sin a, sin e)`` and looks at the origin; azimuth 0 is the +x axis (the
"front" of a scene). Camera axes follow OpenCV (and gsplat): x right, y down, z forward, so a
world point ``X`` maps to ``x_cam = R X + T`` with the rows of ``R`` the right, down and forward
vectors, and to pixel ``(fx x/z + cx, fy y/z + cy)``. The right vector ``(-sin a, cos a, 0)`` comes
from the azimuth alone, so straight-overhead views (e = 90) are well defined.

``fov`` is the vertical field of view in degrees; pixels are square (``fx = fy``) and the principal
point is the image centre, pixel ``(i, j)`` covering ``[j, j+1) x [i, i+1)``.

A batch of cameras travels through the library as a ``(B, 4)`` float tensor
``[elevation_deg, azimuth_deg, distance, fov_deg]`` (:meth:`Cameras.as_cond`), which is what a
camera-conditioned denoiser receives as ``cond``; :meth:`Cameras.features` is the 16-d flattened
camera-to-world matrix ProlificDreamer (2305.16213) feeds to its camera-conditioned fake score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from scoredistill.errors import ConfigError, check_keys

COND_DIM = 4


@dataclass(frozen=True)
class CameraRanges:
    """Sampling ranges (degrees / scene units). Defaults are threestudio's ``random-camera``
    settings for DreamFusion-style runs: elevation [-10, 90], azimuth [-180, 180), distance
    [1.0, 1.5], vertical FOV [40, 70]; the turntable uses elevation 15 and mid distance / FOV."""

    elevation: tuple[float, float] = (-10.0, 90.0)
    azimuth: tuple[float, float] = (-180.0, 180.0)
    distance: tuple[float, float] = (1.0, 1.5)
    fov: tuple[float, float] = (40.0, 70.0)

    def __post_init__(self):
        self.validate()

    def validate(self, section: str = "cameras") -> None:
        for name in ("elevation", "azimuth", "distance", "fov"):
            lo, hi = _pair(getattr(self, name), f"{section}.{name}")
            object.__setattr__(self, name, (lo, hi))
            if lo > hi:
                raise ConfigError(f"{section}.{name}", f"min {lo} > max {hi}; give [min, max] with min <= max")
        if self.elevation[0] < -90 or self.elevation[1] > 90:
            raise ConfigError(f"{section}.elevation", f"must lie in [-90, 90] degrees, got {list(self.elevation)}")
        if self.distance[0] <= 0:
            raise ConfigError(f"{section}.distance", f"must be > 0, got {list(self.distance)}")
        if self.fov[0] <= 0 or self.fov[1] >= 180:
            raise ConfigError(f"{section}.fov", f"must lie in (0, 180) degrees, got {list(self.fov)}")

    @classmethod
    def from_config(cls, cfg: dict | None, section: str = "cameras") -> CameraRanges:
        """Build from a config section: each key a ``[min, max]`` pair or one number (a fixed value)."""
        cfg = dict(cfg or {})
        check_keys(cfg, ("elevation", "azimuth", "distance", "fov"), section)
        out = {k: _pair(v, f"{section}.{k}") for k, v in cfg.items()}
        try:
            return cls(**out)
        except ConfigError as e:
            if e.field.startswith("cameras.") and section != "cameras":
                raise ConfigError(section + e.field[len("cameras"):], e.message) from None
            raise

    def mid(self, name: str) -> float:
        lo, hi = getattr(self, name)
        return 0.5 * (lo + hi)


def _pair(v, field: str) -> tuple[float, float]:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
        raise ConfigError(field, f"must be a number or a [min, max] pair of numbers, got {v!r}")
    lo, hi = float(v[0]), float(v[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ConfigError(field, f"must be finite, got {[lo, hi]}")
    return lo, hi


@dataclass
class Cameras:
    """A batch of orbit cameras; every field a ``(B,)`` tensor (degrees for angles)."""

    elevation: torch.Tensor
    azimuth: torch.Tensor
    distance: torch.Tensor
    fov: torch.Tensor

    def __len__(self) -> int:
        return self.elevation.shape[0]

    def __getitem__(self, idx) -> Cameras:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return Cameras(self.elevation[idx], self.azimuth[idx], self.distance[idx], self.fov[idx])

    def to(self, device=None, dtype=None) -> Cameras:
        return Cameras(*(t.to(device=device, dtype=dtype) for t in self._fields()))

    def _fields(self):
        return self.elevation, self.azimuth, self.distance, self.fov

    @property
    def device(self) -> torch.device:
        return self.elevation.device

    @property
    def dtype(self) -> torch.dtype:
        return self.elevation.dtype

    # -- conditioning ---------------------------------------------------------------------------------
    def as_cond(self) -> torch.Tensor:
        """``(B, 4)`` ``[elevation, azimuth, distance, fov]``: the camera as a denoiser's ``cond``."""
        return torch.stack(self._fields(), 1)

    @classmethod
    def from_cond(cls, cond: torch.Tensor) -> Cameras:
        if not torch.is_tensor(cond) or cond.dim() != 2 or cond.shape[1] != COND_DIM:
            shape = tuple(cond.shape) if torch.is_tensor(cond) else type(cond).__name__
            raise ConfigError("cond", f"a camera batch is a (B, {COND_DIM}) tensor "
                              f"[elevation, azimuth, distance, fov], got {shape}")
        return cls(*cond.unbind(1))

    def features(self) -> torch.Tensor:
        """``(B, 16)`` flattened camera-to-world matrices (ProlificDreamer's camera condition)."""
        return self.camera_to_world().reshape(len(self), 16)

    # -- geometry -------------------------------------------------------------------------------------
    def centers(self) -> torch.Tensor:
        """``(B, 3)`` camera positions in world coordinates."""
        e, a = torch.deg2rad(self.elevation), torch.deg2rad(self.azimuth)
        return self.distance[:, None] * torch.stack([e.cos() * a.cos(), e.cos() * a.sin(), e.sin()], 1)

    def rotations(self) -> torch.Tensor:
        """``(B, 3, 3)`` world->camera rotations; rows are right, down, forward."""
        e, a = torch.deg2rad(self.elevation), torch.deg2rad(self.azimuth)
        forward = -torch.stack([e.cos() * a.cos(), e.cos() * a.sin(), e.sin()], 1)
        right = torch.stack([-a.sin(), a.cos(), torch.zeros_like(a)], 1)
        down = torch.cross(forward, right, dim=1)
        return torch.stack([right, down, forward], 1)

    def world_to_camera(self) -> torch.Tensor:
        """``(B, 4, 4)`` view matrices (gsplat's ``viewmats``)."""
        r = self.rotations()
        t = -(r @ self.centers()[:, :, None])[:, :, 0]
        m = torch.zeros(len(self), 4, 4, dtype=r.dtype, device=r.device)
        m[:, :3, :3] = r
        m[:, :3, 3] = t
        m[:, 3, 3] = 1
        return m

    def camera_to_world(self) -> torch.Tensor:
        r = self.rotations()
        m = torch.zeros(len(self), 4, 4, dtype=r.dtype, device=r.device)
        m[:, :3, :3] = r.transpose(1, 2)
        m[:, :3, 3] = self.centers()
        m[:, 3, 3] = 1
        return m

    def focal(self, height: int) -> torch.Tensor:
        """``(B,)`` focal length in pixels for an image ``height`` pixels tall."""
        return 0.5 * height / torch.tan(0.5 * torch.deg2rad(self.fov))

    def intrinsics(self, height: int, width: int) -> torch.Tensor:
        """``(B, 3, 3)`` pinhole matrices ``[[f, 0, W/2], [0, f, H/2], [0, 0, 1]]`` (gsplat's ``Ks``)."""
        f = self.focal(height)
        k = torch.zeros(len(self), 3, 3, dtype=f.dtype, device=f.device)
        k[:, 0, 0] = f
        k[:, 1, 1] = f
        k[:, 0, 2] = 0.5 * width
        k[:, 1, 2] = 0.5 * height
        k[:, 2, 2] = 1
        return k


def sample_cameras(n: int, ranges: CameraRanges | None = None, generator: torch.Generator | None = None,
                   dtype: torch.dtype = torch.float32) -> Cameras:
    """``n`` cameras drawn uniformly in each range (in degrees for the angles), on the CPU so a seeded
    CPU generator gives the same cameras on every device; azimuth is wrapped into [-180, 180)."""
    ranges = ranges or CameraRanges()
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    vals = []
    for i, name in enumerate(("elevation", "azimuth", "distance", "fov")):
        lo, hi = getattr(ranges, name)
        vals.append(lo + (hi - lo) * u[:, i])
    vals[1] = _wrap(vals[1])
    return Cameras(*(v.to(dtype) for v in vals))


def turntable(n: int = 120, ranges: CameraRanges | None = None, elevation: float = 15.0,
              distance: float | None = None, fov: float | None = None, dtype: torch.dtype = torch.float32) -> Cameras:
    """The fixed evaluation orbit: ``n`` azimuths evenly spaced from -180 at one elevation, mid
    distance and FOV of ``ranges`` unless given."""
    ranges = ranges or CameraRanges()
    az = _wrap(-180.0 + torch.arange(n, dtype=torch.float64) * (360.0 / n))
    full = lambda v: torch.full((n,), float(v), dtype=torch.float64)  # noqa: E731
    return Cameras(full(elevation).to(dtype), az.to(dtype),
                   full(ranges.mid("distance") if distance is None else distance).to(dtype),
                   full(ranges.mid("fov") if fov is None else fov).to(dtype))


def _wrap(deg: torch.Tensor) -> torch.Tensor:
    return torch.remainder(deg + 180.0, 360.0) - 180.0


VIEWS = ("front", "side", "back", "overhead")


def view_labels(cameras: Cameras, overhead: float = 60.0, front: float = 45.0, back: float = 135.0) -> list[str]:
    """threestudio's view phrases: "overhead" if elevation > 60; else "front" if |azimuth| < 45,
    "back" if |azimuth| > 135, otherwise "side" (azimuth wrapped into [-180, 180))."""
    az = _wrap(cameras.azimuth.double()).abs().tolist()
    el = cameras.elevation.double().tolist()
    out = []
    for e, a in zip(el, az):
        if e > overhead:
            out.append("overhead")
        elif a < front:
            out.append("front")
        elif a > back:
            out.append("back")
        else:
            out.append("side")
    return out


def view_prompts(prompt: str, cameras: Cameras, **thresholds) -> list[str]:
    """threestudio's view-dependent prompts: ``"{prompt}, {label} view"`` per camera (DreamFusion's
    view conditioning for text teachers)."""
    return [f"{prompt}, {label} view" for label in view_labels(cameras, **thresholds)]
