"""Video input for the command line and the demo helpers: frames from files, and a prompt with one ``<video>``.

A video is given as its frames: several image files (in the order given), one directory (its image files sorted by
name) or one ``.npy`` file holding a uint8 (frames, height, width, 3) array. No video decoding happens here: sample
the frames first (e.g. with ffmpeg). The frames then go through the checkpoint's own video settings
(``vlmprune.models.onevision_processor.preprocess_video``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from vlmprune.models.onevision_processor import video_frames

#: image files a frame directory may hold
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def read_frames(paths: Sequence[str]) -> np.ndarray:
    """The frames named by ``paths`` (see the module docstring) as uint8 (F, H, W, 3), checked by
    ``video_frames`` (frames of one size, RGB, whole levels 0..255).

    Raises FileNotFoundError for a missing path, ValueError for an empty directory, a ``.npy`` or a directory
    given with other paths, or frames ``video_frames`` refuses.
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("--video needs at least one frame file, a directory of frames or a .npy file")
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(f"video frame {p!r} not found")
    if len(paths) == 1 and paths[0].lower().endswith(".npy"):
        return video_frames(np.load(paths[0], allow_pickle=False), "--video")
    if len(paths) == 1 and os.path.isdir(paths[0]):
        d = paths[0]
        names = sorted(f for f in os.listdir(d) if f.lower().endswith(FRAME_SUFFIXES))
        if not names:
            raise ValueError(f"video directory {d!r} holds no frame images ({', '.join(FRAME_SUFFIXES)})")
        paths = [os.path.join(d, f) for f in names]
    for p in paths:
        if os.path.isdir(p) or p.lower().endswith(".npy"):
            raise ValueError(f"--video {p!r}: give a directory or a .npy file alone, or only frame image files")
    frames = []
    for p in paths:
        with Image.open(p) as im:  # PIL's error names the file
            frames.append(im.convert("RGB"))
    return video_frames(frames, "--video")


def video_prompt_inputs(model, video, prompt: str) -> dict:
    """Processor outputs (NumPy) of one video and one prompt, with the checkpoint's chat template (a user turn of a
    video and the text, then the generation prompt). Raises ValueError when the model takes no video or its
    template writes no ``<video>`` placeholder."""
    proc = model.processor
    if model.config.model_type != "llava_onevision" or proc is None or getattr(proc, "video_facts", None) is None:
        raise ValueError(
            f"video input needs a LLaVA-OneVision checkpoint with its processor files ({model.config.model_type})"
        )
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}], add_generation_prompt=True
    )
    if proc.video_token not in text:
        raise ValueError(
            f"the checkpoint's chat template writes no {proc.video_token!r} for a video entry; it cannot prompt "
            "with a video"
        )
    return dict(proc(videos=[video], text=[text], padding=True))
