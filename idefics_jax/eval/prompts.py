"""Few-shot prompts in IDEFICS's (Flamingo's) format, and the post-processing of generated answers.

A prompt is a list of `str` and images, as `data.Processor` takes it. Each demonstration is its image
followed by the task's text with the answer ("Caption: {c}", "Question: {q} Answer: {a}", ...) and a
newline; the query comes last, its text stopping where the model is to continue ("Caption:",
"Question: {q} Answer:"). The processor wraps every image as
`<fake_token_around_image><image><fake_token_around_image>` (consecutive images share the middle fake
token) and starts the text with `<s>`. Zero-shot follows Flamingo / OpenFlamingo: two demonstrations
with their images removed (text only) show the answer format, and the query is the only image.

    4-shot VQAv2:  <image>Question: What is on the plate? Answer: pizza\n<image>Question: … Answer: 2\n
                   <image>… \n<image>… \n<image>Question: What colour is the bus? Answer:
    0-shot COCO:   Caption: A man riding a bike.\nCaption: Two dogs on a couch.\n<image>Caption:
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from idefics_jax.eval.tasks import Example, Task

# Demonstrations shown without images in a zero-shot prompt (Flamingo's trick).
ZERO_SHOT_TEXT_DEMOS = 2


def build(task: Task, demos: Sequence[Example], query: Example, image: Callable[[Example], Any], shots: int) -> list:
    """The prompt for `query` with `demos` in front (their order kept: the most relevant last).

    Args:
      task: gives the text of each example.
      demos: `shots` demonstrations, or ZERO_SHOT_TEXT_DEMOS text-only ones when shots == 0.
      query: the example to answer.
      image: example → its image (a PIL image; any object in tests).
      shots: the number of shots; 0 drops the demonstrations' images.
    Returns:
      [image, text, image, text, …, image, query text]; images = shots + 1 (1 for zero-shot).
    """
    items: list = []
    for d in demos:
        if shots:
            items.append(image(d))
        items.append(task.prompt(d, True) + "\n")
    return items + [image(query), task.prompt(query, False)]


def render(items: Sequence) -> str:
    """A prompt as text, `<image>` standing for each image (for the predictions files and docs)."""
    return "".join(i.strip(" ") if isinstance(i, str) else "<image>" for i in items)


_STOP = re.compile("Question|Answer|Caption")


def postprocess(text: str) -> str:
    """A generated continuation → the answer, as OpenFlamingo: cut at the next "Question" / "Answer" /
    "Caption" (the model starting another demonstration), keep the first line, strip spaces."""
    return _STOP.split(text, maxsplit=1)[0].split("\n", 1)[0].strip()
