"""The training prompts' frame: whole shared leading and trailing lines, written out by hand for each case."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qloraga.prompt_frame import Frame, detect_frame

pytestmark = pytest.mark.unit
DEBIAN = ["Debian package description:\nA C compiler.\nOne-line synopsis:",
          "Debian package description:\nHTML::Tagset contains data tables.\nUseful with HTML.\nOne-line synopsis:"]


def test_the_debian_frame():
    assert detect_frame(DEBIAN) == Frame("Debian package description:\n", "\nOne-line synopsis:")


def test_only_whole_lines_count():
    # The demo's word problems share their last words, not a line: no frame.
    demo = ["Eva has 9 pears. How many pears does Eva have? Answer:",
            "Mia has 18 books. How many books does Mia have? Answer:"]
    assert detect_frame(demo) is None
    # A shared start inside a line is cut back to the last whole line; a shared end forward to the first.
    assert detect_frame(["Task: add\nQ: 1+2\nA:", "Task: add\nQ: 3+4\nA:"]) == Frame("Task: add\n", "\nA:")
    assert detect_frame(["Question: 1+2?\nAnswer:", "Question: 3+4?\nAnswer:"]) == Frame("", "\nAnswer:")
    assert detect_frame(["Context:\nabc", "Context:\nxyz"]) == Frame("Context:\n", "")


def test_no_frame_from_one_prompt_or_unrelated_prompts():
    assert detect_frame(["Debian package description:\nA C compiler.\nOne-line synopsis:"]) is None
    assert detect_frame([]) is None
    assert detect_frame(["first\nprompt", "second\nprompt one"]) is None


def test_prefix_and_suffix_never_overlap():
    # The varying part is empty in one prompt: the frame is what surrounds it, not counted twice.
    prompts = ["Head:\n\nTail:", "Head:\nbody\nTail:"]
    frame = detect_frame(prompts)
    assert frame == Frame("Head:\n", "\nTail:")
    assert all(len(frame.prefix) + len(frame.suffix) <= len(p) for p in prompts)


def test_wrap_adds_what_the_message_lacks():
    frame = Frame("Debian package description:\n", "\nOne-line synopsis:")
    assert frame.wrap("A C compiler.") == DEBIAN[0]
    assert frame.wrap(DEBIAN[0]) == DEBIAN[0]  # a message already in its frame is left as it is
    assert frame.wrap("A C compiler.\nOne-line synopsis:") == DEBIAN[0]
    assert frame.describe() == "'Debian package description:\\n' + message + '\\nOne-line synopsis:'"


line = st.text(st.characters(blacklist_characters="\n"), max_size=8)


@given(head=st.lists(line, max_size=3), tail=st.lists(line, max_size=3),
       bodies=st.lists(st.lists(line, min_size=1, max_size=3), min_size=2, max_size=5))
def test_a_framed_prompt_is_its_frame_around_its_part(head, tail, bodies):
    """Whatever the frame found, every prompt is it around a middle, and both ends are whole lines."""
    prompts = ["\n".join([*head, *body, *tail]) for body in bodies]
    frame = detect_frame(prompts)
    if frame is None:
        return
    for p in prompts:
        assert p.startswith(frame.prefix) and p.endswith(frame.suffix)
        assert len(frame.prefix) + len(frame.suffix) <= len(p)
    assert frame.prefix == "" or frame.prefix.endswith("\n")
    assert frame.suffix == "" or frame.suffix.startswith("\n")
    if head and len({tuple(b) for b in bodies}) > 1:  # shared head lines, varying bodies: the head is found
        assert frame.prefix.startswith("\n".join(head) + "\n")
