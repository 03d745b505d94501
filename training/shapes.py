"""The synthetic "shapes" world the default model is trained on: scenes, pixels, text.

An image scene holds one to three shapes (each of a different kind) at distinct named
positions on a plain background; a video scene holds one shape crossing the frame in
one of four directions. Every scene is drawn from a ``random.Random`` so a seed pins the
whole dataset, on any machine (Python's Mersenne Twister and PIL's rasteriser are
platform-independent). Captions and answers are generated from the scene parameters,
so they are the ground truth that training targets and evaluations check against.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 84  # px; 6 x 6 ViT patches -> 3 x 3 = 9 LLM tokens after the 2 x 2 merge
VIDEO_SIZE = 84
VIDEO_FRAMES = 4  # two temporal patches of two frames -> 18 LLM tokens per video

# No diamond: at this size it is a square turned by 45 degrees, which the tiny vision
# tower confused with the square for thousands of steps.
SHAPES = ("circle", "square", "triangle", "star")
# Nominal RGB of each colour name; a sample jitters every channel by up to COLOR_JITTER.
SHAPE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (245, 215, 30),
    "orange": (245, 135, 25),
    "purple": (140, 55, 175),
    "pink": (245, 125, 195),
    "cyan": (45, 205, 225),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (248, 248, 248),
    "black": (18, 18, 18),
    "gray": (128, 128, 128),
    "brown": (115, 75, 40),
}
COLOR_JITTER = 12

# Caption order is reading order, so every scene has exactly one correct caption.
POSITIONS = ("top", "left", "center", "right", "bottom")
POSITION_PHRASES = {
    "top": "at the top",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom": "at the bottom",
}
# The centres of five of the 3 x 3 cells of 28 px that become one LLM token each; with
# radius <= 12 and jitter <= 1 px a shape stays inside its cell, so each token shows at
# most one shape.
POSITION_XY = {
    "top": (42, 14),
    "left": (14, 42),
    "center": (42, 42),
    "right": (70, 42),
    "bottom": (42, 70),
}
MIN_RADIUS, MAX_RADIUS, POSITION_JITTER = 9, 12, 1

DIRECTIONS = ("left to right", "right to left", "top to bottom", "bottom to top")
NUMBER_WORDS = ("zero", "one", "two", "three")

IMAGE_CAPTION_PROMPTS = ("Describe the image.", "What is in the image?", "Caption this image.")
VIDEO_CAPTION_PROMPTS = ("Describe the video.", "What happens in the video?")

Task = Literal["caption", "qa"]
MediaKind = Literal["image", "video"]


@dataclass(frozen=True)
class PlacedShape:
    """One shape as drawn: its names (the ground truth) and its exact pixels."""

    kind: str  # one of SHAPES
    color: str  # a key of SHAPE_COLORS
    position: str  # one of POSITIONS (unused for videos, which move the shape)
    radius: int  # px, circumscribed circle
    rgb: tuple[int, int, int]  # the jittered colour actually painted
    dx: int = 0  # px offset from the position's nominal centre
    dy: int = 0


@dataclass(frozen=True)
class ImageScene:
    shapes: tuple[PlacedShape, ...]  # sorted in POSITIONS (caption) order
    background: str  # a key of BACKGROUNDS
    bg_rgb: tuple[int, int, int]


@dataclass(frozen=True)
class VideoScene:
    shape: PlacedShape
    direction: str  # one of DIRECTIONS
    background: str
    bg_rgb: tuple[int, int, int]
    cross: int  # px, the coordinate across the motion (y for horizontal motion)
    start: int  # px, the coordinate along the motion in the first frame


Scene = ImageScene | VideoScene


@dataclass(frozen=True)
class Turn:
    prompt: str  # the user's text for this turn
    answer: str  # the exact reply the model must give
    task: Task


@dataclass(frozen=True)
class Example:
    """A conversation about one image or video: the media rides on the first turn."""

    kind: MediaKind
    scene: Scene
    turns: tuple[Turn, ...]


# ---- sampling --------------------------------------------------------------------------


def _jitter_rgb(rng: random.Random, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in rgb)  # type: ignore[return-value]


def _shape(rng: random.Random, kind: str, color: str, position: str) -> PlacedShape:
    return PlacedShape(
        kind=kind,
        color=color,
        position=position,
        radius=rng.randint(MIN_RADIUS, MAX_RADIUS),
        rgb=_jitter_rgb(rng, SHAPE_COLORS[color]),
        dx=rng.randint(-POSITION_JITTER, POSITION_JITTER),
        dy=rng.randint(-POSITION_JITTER, POSITION_JITTER),
    )


def sample_image_scene(rng: random.Random, num_shapes: int | None = None) -> ImageScene:
    """One to three shapes of different kinds at different positions; colours may repeat."""
    n = num_shapes or rng.randint(1, 3)
    kinds = rng.sample(SHAPES, n)
    places = sorted(rng.sample(POSITIONS, n), key=POSITIONS.index)
    background = rng.choice(list(BACKGROUNDS))
    shapes = tuple(
        _shape(rng, kind, rng.choice(list(SHAPE_COLORS)), place)
        for kind, place in zip(kinds, places)
    )
    return ImageScene(shapes, background, _jitter_rgb(rng, BACKGROUNDS[background]))


def sample_video_scene(rng: random.Random) -> VideoScene:
    shape = _shape(rng, rng.choice(SHAPES), rng.choice(list(SHAPE_COLORS)), "center")
    background = rng.choice(list(BACKGROUNDS))
    return VideoScene(
        shape=shape,
        direction=rng.choice(DIRECTIONS),
        background=background,
        bg_rgb=_jitter_rgb(rng, BACKGROUNDS[background]),
        cross=rng.randint(20, VIDEO_SIZE - 20),
        start=rng.randint(12, 16),
    )


# ---- text ------------------------------------------------------------------------------


def with_article(words: str) -> str:
    """ "a red circle", "an orange star"."""
    return ("an " if words[0] in "aeiou" else "a ") + words


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene) -> str:
    """The one correct caption of a scene."""
    if isinstance(scene, VideoScene):
        s = scene.shape
        return f"{with_article(f'{s.color} {s.kind}')} moves from {scene.direction}"
    parts = [
        f"{with_article(f'{s.color} {s.kind}')} {POSITION_PHRASES[s.position]}"
        for s in scene.shapes
    ]
    return f"{_join(parts)}, on a {scene.background} background"


def image_questions(scene: ImageScene) -> list[tuple[str, str]]:
    """Every question the model is taught about an image, with its answer."""
    qa = [
        ("How many shapes are there?", NUMBER_WORDS[len(scene.shapes)]),
        ("What color is the background?", scene.background),
    ]
    present = {s.kind for s in scene.shapes}
    for s in scene.shapes:
        qa.append((f"What color is the {s.kind}?", s.color))
        qa.append((f"Where is the {s.kind}?", POSITION_PHRASES[s.position]))
        qa.append((f"What shape is {POSITION_PHRASES[s.position]}?", f"a {s.kind}"))
    for kind in SHAPES:
        qa.append((f"Is there a {kind}?", "yes" if kind in present else "no"))
    return qa


def video_questions(scene: VideoScene) -> list[tuple[str, str]]:
    s = scene.shape
    return [
        (f"Which way does the {s.kind} move?", f"from {scene.direction}"),
        ("What shape is moving?", f"a {s.kind}"),
        ("What color is the moving shape?", s.color),
        ("What color is the background?", scene.background),
    ]


def questions(scene: Scene) -> list[tuple[str, str]]:
    return video_questions(scene) if isinstance(scene, VideoScene) else image_questions(scene)


def _pick_question(rng: random.Random, scene: Scene) -> tuple[str, str]:
    """A uniformly drawn question, except that "Is there a ...?" (five of them per image)
    is drawn as one question type so yes/no does not dominate the mix."""
    qa = questions(scene)
    yes_no = [q for q in qa if q[0].startswith("Is there")]
    other = [q for q in qa if not q[0].startswith("Is there")]
    if yes_no and rng.random() < 1 / (len(other) + 1):
        return rng.choice(yes_no)
    return rng.choice(other)


def sample_example(
    rng: random.Random,
    video_fraction: float = 0.3,
    max_turns: int = 3,
    caption_fraction: float = 0.5,
) -> Example:
    """A training conversation: a caption or question first, then up to two more questions
    about the same media (so multi-turn chat with one image works; follow-ups are short
    questions, which keeps sequences, and so padding, short)."""
    kind: MediaKind = "video" if rng.random() < video_fraction else "image"
    scene: Scene = sample_video_scene(rng) if kind == "video" else sample_image_scene(rng)
    prompts = VIDEO_CAPTION_PROMPTS if kind == "video" else IMAGE_CAPTION_PROMPTS
    turns = []
    for i in range(rng.randint(1, max_turns)):
        if i == 0 and rng.random() < caption_fraction:
            turns.append(Turn(rng.choice(prompts), caption(scene), "caption"))
        else:
            q, a = _pick_question(rng, scene)
            turns.append(Turn(q, a, "qa"))
    return Example(kind, scene, tuple(turns))


def held_out_examples(seed: int, num_images: int, num_videos: int, num_qa: int) -> list[Example]:
    """Single-turn evaluation items: image captions, video captions, then questions
    (image and video mixed 70/30), all drawn from their own seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_images):
        scene = sample_image_scene(rng)
        out.append(
            Example("image", scene, (Turn("Describe the image.", caption(scene), "caption"),))
        )
    for _ in range(num_videos):
        scene = sample_video_scene(rng)
        out.append(
            Example("video", scene, (Turn("Describe the video.", caption(scene), "caption"),))
        )
    for _ in range(num_qa):
        video = rng.random() < 0.3
        scene = sample_video_scene(rng) if video else sample_image_scene(rng)
        q, a = _pick_question(rng, scene)
        out.append(Example("video" if video else "image", scene, (Turn(q, a, "qa"),)))
    return out


# ---- pixels ----------------------------------------------------------------------------


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "square":
        h = r * 0.75  # side 1.5 r: about the circle's area
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        return [(cx, cy - r), (cx + 0.9 * r, cy + 0.75 * r), (cx - 0.9 * r, cy + 0.75 * r)]
    if kind == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            ang = np.pi / 2 + i * np.pi / 5
            pts.append((cx + rad * np.cos(ang), cy - rad * np.sin(ang)))
        return pts
    raise ValueError(f"unknown shape {kind!r}")


def draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, rgb: tuple
) -> None:
    if kind == "circle":
        draw.ellipse([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=rgb)
    else:
        draw.polygon(_polygon(kind, cx, cy, r), fill=rgb)


def render_image(scene: ImageScene, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene as an RGB image; ``size`` other than 84 scales the whole drawing."""
    scale = size / IMAGE_SIZE
    img = Image.new("RGB", (size, size), scene.bg_rgb)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        x, y = POSITION_XY[s.position]
        draw_shape(draw, s.kind, (x + s.dx) * scale, (y + s.dy) * scale, s.radius * scale, s.rgb)
    return img


def video_track(scene: VideoScene) -> list[tuple[int, int]]:
    """Centre of the shape in each frame: it crosses the frame in equal steps."""
    step = (VIDEO_SIZE - 2 * scene.start) / (VIDEO_FRAMES - 1)
    along = [round(scene.start + i * step) for i in range(VIDEO_FRAMES)]
    if scene.direction in ("right to left", "bottom to top"):
        along = along[::-1]
    if scene.direction in ("left to right", "right to left"):
        return [(a, scene.cross) for a in along]
    return [(scene.cross, a) for a in along]


def render_video(scene: VideoScene) -> np.ndarray:
    """The scene's frames, [VIDEO_FRAMES, H, W, 3] uint8."""
    frames = []
    for x, y in video_track(scene):
        img = Image.new("RGB", (VIDEO_SIZE, VIDEO_SIZE), scene.bg_rgb)
        s = scene.shape
        draw_shape(ImageDraw.Draw(img), s.kind, x, y, s.radius, s.rgb)
        frames.append(np.asarray(img))
    return np.stack(frames)


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = 2) -> None:
    """H.264 in MP4, as a camera or a phone would write it, from [T, H, W, 3] uint8 frames.

    At the default 2 fps a 4-frame clip lasts 2 s, and mmengine's default sampling (2
    frames per second) keeps all four frames.
    """
    import av  # deferred: only clips written to files need PyAV

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12"}  # near-lossless; chroma is still subsampled
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def render(example: Example) -> Image.Image | np.ndarray:
    scene = example.scene
    return render_video(scene) if isinstance(scene, VideoScene) else render_image(scene)
