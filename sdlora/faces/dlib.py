"""Face detection, 68-point landmarks and 128-d identity embeddings (dlib, offline) behind one small interface.

Why two detectors: on real photos dlib's HOG detector is fast (~0.1 s on 512 px) but no single score threshold
separates faces from non-faces: patches of clothing score 0.0-0.1 while a real second face in the frame can also
score near 0.0. The CNN (MMOD) detector separates them cleanly (real faces ~1.0 confidence, clothing not
detected) but costs seconds on a whole photo. So HOG proposes candidates with a permissive threshold (it rarely
misses a frontal face that way), and the CNN confirms each one on a small crop around it (~0.1 s per candidate):
the CNN's answer on a fixed-size crop is what decides, at a fraction of its whole-image cost. Both detectors and
the embedding network are deterministic on the CPU (no jitter, no randomness), so the same photo always gives the
same faces.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy
from PIL import Image

from sdlora.errors import SdloraError

# HOG scores above this are candidates; real faces on real photos can score near 0.0, false ones too.
HOG_THRESHOLD = -0.5
# At most this many HOG candidates (highest scores) go to the CNN: bounds the cost of a busy photo.
MAX_CANDIDATES = 8
# The CNN sees a square crop of CONTEXT x the candidate's side, scaled to CNN_CROP px: the face is then ~80 px,
# MMOD's window, with a margin. Measured on the astronaut: 160 px crops cost 0.16 s, 128 px 0.10 s (confidence
# 1.03), 112 px missed the face at 2x context.
CONTEXT = 1.6
CNN_CROP = 128
# CNN confidence above which a candidate is a face (real faces measured ~1.0; clothing patches not detected).
CNN_THRESHOLD = 0.3
# Extra landmark passes, each started from the square around the previous pass's landmarks (see _shape).
REFINE_PASSES = 2


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in image pixels
    score: float  # CNN (MMOD) confidence
    landmarks: numpy.ndarray  # (68, 2) float32 x,y in image pixels (dlib 68-point order)

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def landmark_box(self) -> tuple[float, float, float, float]:
        """Extent of the 68 landmarks (jaw, brows, chin): steadier than the detector's box, whose size comes in
        steps of its image pyramid (~17%), so crops are placed by this one."""
        return (
            float(self.landmarks[:, 0].min()),
            float(self.landmarks[:, 1].min()),
            float(self.landmarks[:, 0].max()),
            float(self.landmarks[:, 1].max()),
        )

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]


def model_dir() -> Path:
    """Folder of the `.dat` files shipped by face-recognition-models, found without importing it (its
    `__init__` needs pkg_resources, which current setuptools no longer ships)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise SdloraError("face models missing: pip install face-recognition-models (dlib's offline face models)")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class DlibFaces:
    """Loads dlib's detectors, landmark predictor and identity network once; reuse one instance per process."""

    def __init__(self) -> None:
        import dlib

        models = model_dir()
        self._dlib = dlib
        self._hog = dlib.get_frontal_face_detector()
        self._cnn = dlib.cnn_face_detection_model_v1(str(models / "mmod_human_face_detector.dat"))
        self._landmarks = dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat"))
        self._encoder = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def detect(self, image: Image.Image) -> list[Face]:
        """Confirmed faces in an RGB image, largest first (ties: top-left first, so the order is stable)."""
        pixels = _rgb_array(image)
        # Upsample once: HOG's smallest face is ~80 px, ~40 px after one 2x upsampling. On grey pixels: the
        # same boxes as on RGB (gradients per channel) in ~60% of the time; the CNN, which decides, sees colour.
        grey = numpy.ascontiguousarray(numpy.asarray(image.convert("L")))
        rects, scores, _ = self._hog.run(grey, 1, HOG_THRESHOLD)
        candidates = sorted(zip(scores, rects, strict=True), key=lambda pair: -pair[0])[:MAX_CANDIDATES]
        faces: list[Face] = []
        for _, rect in candidates:
            confirmed = self._confirm(image, (rect.left(), rect.top(), rect.right(), rect.bottom()))
            if confirmed is None:
                continue
            box, score = confirmed
            if any(_iou(box, face.box) > 0.3 for face in faces):
                continue  # the same face proposed twice
            faces.append(Face(box=box, score=score, landmarks=self._shape(pixels, box)))
        return sorted(faces, key=lambda face: (-face.width * face.height, face.box[1], face.box[0]))

    def embed(self, image: Image.Image, face: Face) -> numpy.ndarray:
        """(128,) float64 identity descriptor of `face`; two photos of one person are < 0.6 apart."""
        pixels = _rgb_array(image)
        points = self._dlib.points([self._dlib.point(round(x), round(y)) for x, y in face.landmarks])
        shape = self._dlib.full_object_detection(self._rect(face.box), points)
        # num_jitters=0: no random augmentation, so the descriptor is deterministic.
        return numpy.asarray(self._encoder.compute_face_descriptor(pixels, shape, 0), dtype=numpy.float64)

    def _confirm(
        self, image: Image.Image, box: tuple[int, int, int, int]
    ) -> tuple[tuple[int, int, int, int], float] | None:
        """Run the CNN on a small square crop around a HOG candidate; its best box mapped back, or None."""
        side = max(box[2] - box[0], box[3] - box[1]) * CONTEXT
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        region = (round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2))
        # PIL pads outside the image with black, so the face stays centred at the same scale near edges.
        crop = image.crop(region).resize((CNN_CROP, CNN_CROP), Image.Resampling.BILINEAR, reducing_gap=None)
        detections = self._cnn(numpy.asarray(crop.convert("RGB")), 0)
        best = max(detections, key=lambda d: d.confidence, default=None)
        if best is None or best.confidence < CNN_THRESHOLD:
            return None
        scale = (region[2] - region[0]) / CNN_CROP
        rect = best.rect
        mapped = (
            max(0, round(region[0] + rect.left() * scale)),
            max(0, round(region[1] + rect.top() * scale)),
            min(image.width, round(region[0] + (rect.right() + 1) * scale)),
            min(image.height, round(region[1] + (rect.bottom() + 1) * scale)),
        )
        return mapped, float(best.confidence)

    def _shape(self, pixels: numpy.ndarray, box: tuple[int, int, int, int]) -> numpy.ndarray:
        """68 landmarks. The predictor starts from a mean face placed in the box it is given, so its answer moves
        with the detector's coarse box; re-running it from the square around its own landmarks twice makes the
        result (nearly) independent of the starting box: measured within 1 px on 1024-px photos."""
        for _ in range(REFINE_PASSES + 1):
            shape = self._landmarks(pixels, self._rect(box))
            points = numpy.array([(p.x, p.y) for p in shape.parts()], dtype=numpy.float32)  # (68, 2)
            low, high = points.min(axis=0), points.max(axis=0)
            centre, half = (low + high) / 2, float((high - low).max()) / 2
            box = (round(centre[0] - half), round(centre[1] - half), round(centre[0] + half), round(centre[1] + half))
        return points

    def _rect(self, box: tuple[int, int, int, int]):
        return self._dlib.rectangle(box[0], box[1], box[2] - 1, box[3] - 1)


def face_distance(a: numpy.ndarray, b: numpy.ndarray) -> float:
    """Euclidean distance between two identity descriptors; the same person is usually < 0.6."""
    return float(numpy.linalg.norm(numpy.asarray(a, dtype=numpy.float64) - numpy.asarray(b, dtype=numpy.float64)))


def _rgb_array(image: Image.Image) -> numpy.ndarray:
    if image.mode != "RGB":
        image = image.convert("RGB")
    return numpy.ascontiguousarray(numpy.asarray(image))


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    inter_w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0
