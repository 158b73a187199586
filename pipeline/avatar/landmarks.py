"""68-point face landmarks with dlib (HOG detector + the iBUG-68 shape predictor).

Why dlib rather than the official DWPose + face_alignment pair: it ships as a prebuilt wheel,
runs on any CPU, and its 68 points are in the same iBUG order as DWPose's face points 23..90,
so the official box formulas apply unchanged. The model file comes from the
``face_recognition_models`` package (nothing is downloaded).

Only preparation uses this; sessions read the landmarks stored with the avatar, so the models are
loaded lazily on first use and never at import.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import cv2
import numpy as np

from pipeline.errors import EngineUnavailable

#: Detection runs on a copy whose longest side is at most this (HOG cost grows with area; the
#: shape predictor then refines on the full-resolution frame, so precision is not lost).
DETECT_MAX_SIDE = 640
_PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"


class FaceLandmarker:
    """Finds the largest face in a BGR frame and its 68 landmarks (zero-based iBUG order)."""

    def __init__(self, detect_max_side: int = DETECT_MAX_SIDE) -> None:
        self.detect_max_side = detect_max_side
        self._detector = None
        self._predictor = None
        self._lock = threading.Lock()

    def _models(self):  # type: ignore[no-untyped-def]
        with self._lock:
            if self._predictor is None:
                import dlib

                self._detector = dlib.get_frontal_face_detector()
                self._predictor = dlib.shape_predictor(str(predictor_model_path()))
        return self._detector, self._predictor

    def detect(self, frame_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``(landmarks float32 [68, 2], det_box int32 [4])`` in frame pixels, or None.

        ``det_box`` is dlib's detector rectangle as ``(x1, y1, x2, y2)``, exclusive end, unclipped.
        Upsampling (which finds faces down to ~40 px but costs ~4x) is tried only when the plain
        pass finds nothing, so frames with a normal-sized face pay for one cheap pass.
        """
        import dlib

        detector, predictor = self._models()
        rgb = np.ascontiguousarray(frame_bgr[:, :, ::-1])
        small, scale = _downscale(rgb, self.detect_max_side)
        rects = None
        for upsample in (0, 1):
            found, _scores, _idx = detector.run(small, upsample, 0.0)
            if len(found):
                rects = found
                break
        if not rects:
            return None
        best = max(rects, key=lambda r: r.width() * r.height())
        inv = 1.0 / scale
        box = np.array(
            [best.left() * inv, best.top() * inv, (best.right() + 1) * inv, (best.bottom() + 1) * inv]
        )
        box = np.round(box).astype(np.int32)
        rect = dlib.rectangle(int(box[0]), int(box[1]), int(box[2]) - 1, int(box[3]) - 1)
        shape = predictor(rgb, rect)
        lm = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
        return lm, box


def predictor_model_path() -> Path:
    """The 68-point model inside the installed ``face_recognition_models`` package.

    Found via the import system without importing the package, because its ``__init__`` imports
    ``pkg_resources``, which recent setuptools no longer provide.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise EngineUnavailable(
            "face landmarks need the 'face_recognition_models' package (pip install face_recognition_models)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "models" / _PREDICTOR_FILE
        if path.is_file():
            return path
    raise EngineUnavailable(f"face_recognition_models is installed but has no models/{_PREDICTOR_FILE}")


def _downscale(img: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    h, w = img.shape[:2]
    longest = max(h, w)
    if longest <= max_side:
        return img, 1.0
    scale = max_side / longest
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(small), size[0] / w


_default: FaceLandmarker | None = None
_default_lock = threading.Lock()


def default_landmarker() -> FaceLandmarker:
    """One process-wide instance, so the 100 MB predictor is loaded once."""
    global _default
    with _default_lock:
        if _default is None:
            _default = FaceLandmarker()
        return _default
