"""The frame a run's training prompts share: the whole lines every prompt starts with and the whole lines every
prompt ends with, around the part that varies ("Debian package description:\n" ... "\nOne-line synopsis:").

A model trained on framed prompts answers a bare message differently from the same message in its frame, and a
user does not know the frame: chat, the web page's chat and the GGUF Modelfile put the message inside it. Only
whole lines count, so that a common first word or last word ("... have? Answer:") is not taken for a frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

FRAME_FILE = "prompt_frame.json"  # in a run folder: {"prefix": ..., "suffix": ...}, both "" for no frame


@dataclass(frozen=True)
class Frame:
    prefix: str
    suffix: str

    def wrap(self, message: str) -> str:
        """`message` inside the frame; a part of the frame the message already holds is not added again."""
        head = "" if message.startswith(self.prefix) else self.prefix
        tail = "" if message.endswith(self.suffix) else self.suffix
        return head + message + tail

    def describe(self) -> str:
        """The frame in one line, newlines shown as \\n."""
        return f"{self.prefix!r} + message + {self.suffix!r}"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def common_prefix(texts: Sequence[str]) -> str:
    """The characters every text starts with (the lexically first and last texts differ first)."""
    first, last = min(texts), max(texts)
    return first[:next((i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b), len(first))]


def common_suffix(texts: Sequence[str]) -> str:
    return common_prefix([t[::-1] for t in texts])[::-1]


def detect_frame(prompts: Sequence[str]) -> Frame | None:
    """The whole leading and trailing lines every prompt shares, or None if they share neither (or there are
    fewer than two prompts: one prompt is all frame)."""
    if len(prompts) < 2:
        return None
    prefix = common_prefix(prompts)
    prefix = prefix[:prefix.rfind("\n") + 1]  # up to and with its last newline: whole lines
    suffix = common_suffix([p[len(prefix):] for p in prompts])  # after the prefix: the two never overlap
    suffix = suffix[suffix.find("\n"):] if "\n" in suffix else ""  # from its first newline: whole lines
    return Frame(prefix, suffix) if prefix or suffix else None


def rendering(fmt: str, frame: Frame | None, off: str = "--no-frame") -> str:
    """How a message is rendered for a model trained on `fmt` data, in words (the first line of chat and of the
    Modelfile): the format's way (`formats.RENDERINGS`), or inside `frame`, which flag `off` turns off."""
    from qloraga.formats import RENDERINGS

    if frame is None:
        return RENDERINGS[fmt]
    return (f"{fmt}: the message inside the training prompts' frame, {frame.describe()}, no chat template "
            f"({off}: as written)")


def frame_from_dict(data: dict) -> Frame | None:
    frame = Frame(str(data.get("prefix", "")), str(data.get("suffix", "")))
    return frame if frame.prefix or frame.suffix else None
