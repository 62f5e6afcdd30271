"""Face-embedding backends behind one small interface: dlib (offline default), ArcFace via insightface, or the
toy world (toyworld.py: its rule-based decoder, for the toy people that `sdlora demo` trains on)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy
from PIL import Image

from sdlora.errors import UsageError

FACE_MODELS = ("dlib", "insightface", "toy")
INSIGHTFACE_PACK = "buffalo_l"


@dataclass(frozen=True)
class FoundFace:
    """One detected face and its identity embedding."""

    box: tuple[int, int, int, int]  # (left, top, right, bottom) in image pixels
    embedding: numpy.ndarray  # (D,) identity descriptor; D = 128 (dlib) or 512 (ArcFace)

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


class FaceBackend(Protocol):
    """What the metrics need from a face model: faces with embeddings, and when two are the same person. A model
    that reads attributes (the toy one) also has `edit_target`, so that edit prompts are judged by it."""

    name: str
    threshold: float  # distance under which two faces are the same person

    def faces(self, image: Image.Image) -> list[FoundFace]:
        """Faces in an RGB image, largest first."""
        ...

    def distance(self, a: numpy.ndarray, b: numpy.ndarray) -> float: ...


class DlibBackend:
    """dlib's 128-d ResNet descriptor (face-recognition-models): same person ~0.2, strangers 0.69-0.92."""

    name = "dlib"
    threshold = 0.6  # dlib's documented same-person threshold (99.38% on LFW)

    def __init__(self) -> None:
        from sdlora.faces.dlib import DlibFaces

        self._faces = DlibFaces()

    def faces(self, image: Image.Image) -> list[FoundFace]:
        return [FoundFace(box=f.box, embedding=self._faces.embed(image, f)) for f in self._faces.detect(image)]

    def distance(self, a: numpy.ndarray, b: numpy.ndarray) -> float:
        from sdlora.faces.dlib import face_distance

        return face_distance(a, b)


class InsightFaceBackend:
    """ArcFace (insightface's buffalo_l pack): stronger than dlib, but its pretrained weights are licensed
    for non-commercial research only. Used only when the package and the weights are already on disk."""

    name = "insightface"
    threshold = 0.6  # cosine distance; ArcFace same-person cosine similarity is usually above 0.4

    def __init__(self, root: Path | None = None) -> None:
        root = Path(root or Path.home() / ".insightface").expanduser()
        pack = root / "models" / INSIGHTFACE_PACK
        try:
            from insightface.app import FaceAnalysis
        except ImportError:
            raise UsageError(
                "--face-model insightface: the insightface package is not installed "
                "(pip install insightface onnxruntime), or use --face-model dlib"
            ) from None
        if not any(pack.glob("*.onnx")):
            # FaceAnalysis would download the pack silently: refuse instead.
            raise UsageError(
                f"--face-model insightface: no model weights in {pack}; place the {INSIGHTFACE_PACK} pack there "
                "(non-commercial licence), or use --face-model dlib"
            )
        self._app: Any = FaceAnalysis(
            name=INSIGHTFACE_PACK, root=str(root), allowed_modules=["detection", "recognition"]
        )
        self._app.prepare(ctx_id=-1, det_size=(640, 640))

    def faces(self, image: Image.Image) -> list[FoundFace]:
        bgr = numpy.ascontiguousarray(numpy.asarray(image.convert("RGB"))[:, :, ::-1])
        found = [
            FoundFace(box=tuple(int(round(v)) for v in face.bbox), embedding=numpy.asarray(face.normed_embedding))
            for face in self._app.get(bgr)
        ]
        return sorted(found, key=lambda face: -face.area)

    def distance(self, a: numpy.ndarray, b: numpy.ndarray) -> float:
        # normed_embedding is unit length, so the cosine distance is 1 - dot.
        return float(1.0 - numpy.dot(a, b) / (numpy.linalg.norm(a) * numpy.linalg.norm(b)))


class ToyBackend:
    """The toy world's decoder (sdlora/faces/toyworld.py) as a face model, for `sdlora demo`'s toy people: a face is a
    valid person of that world, its embedding the six attributes it reads, and the distance between two faces the
    share of attributes on which they differ. Only the exact same person is under the threshold, so
    `recognised_rate` is the decoder's exact-identity share; similarity is 1 for the exact person and 0.5 one
    attribute off. A head the decoder can't read cleanly is still a face (face_rate counts it) at distance 1
    from everyone (an earlier version called it no face: face_rate 0.5 where every image showed a face)."""

    name = "toy"
    threshold = 1 / 6  # one attribute of six differs: not the same person (distance < threshold)

    def faces(self, image: Image.Image) -> list[FoundFace]:
        from sdlora.faces import toyworld

        reading = toyworld.read(image)
        if reading.problem == "no face":
            return []
        sx, sy = image.width / toyworld.SIZE, image.height / toyworld.SIZE  # the decoder reads a 64 px copy
        left, top, right, bottom = reading.box
        box = (round(left * sx), round(top * sy), round(right * sx), round(bottom * sy))
        codes = toyworld.attribute_codes(reading.identity)
        if not reading.valid:  # a face it can't read cleanly (blurry eyes, unclear hair): a face, but nobody's
            codes = numpy.full(codes.shape, numpy.nan)  # NaN differs from everything: distance 1, never recognised
        return [FoundFace(box=box, embedding=codes)]

    def distance(self, a: numpy.ndarray, b: numpy.ndarray) -> float:
        return float(numpy.count_nonzero(numpy.asarray(a) != numpy.asarray(b))) / len(a)

    def edit_target(self, subject: numpy.ndarray, attribute: str, value: object) -> numpy.ndarray | None:
        """The embedding of `subject` with `attribute` set to `value`: what an image of that one change reads as
        (sdlora/evaluation/edits.py). None when it is no change (the subject has it) or the world has no such value."""
        from sdlora.faces import toyworld

        values = toyworld.VALUES.get(attribute, [])
        if not any(v == value and type(v) is type(value) for v in values):
            return None
        index, code = toyworld.ATTRIBUTES.index(attribute), values.index(value)
        if subject[index] == code:
            return None
        target = numpy.array(subject, dtype=float)
        target[index] = code
        return target


def face_backend(name: str) -> FaceBackend:
    """The backend called `name` (`--face-model`)."""
    if name == "dlib":
        return DlibBackend()
    if name == "insightface":
        return InsightFaceBackend()
    if name == "toy":
        return ToyBackend()
    raise UsageError(f"--face-model {name!r}: choose one of {', '.join(FACE_MODELS)}")
