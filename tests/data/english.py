"""A small English corpus for the data-pipeline tests, written for this project.

``DOCUMENTS`` holds six short documents of plain prose; each is a list of paragraphs, each
paragraph a list of sentences. The helpers write them to disk in the formats the corpus
reader accepts.
"""

from __future__ import annotations

import json
from pathlib import Path

DOCUMENTS: list[list[list[str]]] = [
    [  # a flood in a village
        ["The river rose steadily through the night, and by morning the lower fields were under water.",
         "Farmers had moved their cattle to the ridge before dawn, guided by lanterns and the barking of dogs.",
         "Nobody in the village could remember a flood this early in the spring."],
        ["The old stone bridge held, although its railings were bent by floating branches.",
         "Children watched from the school windows as two rowing boats passed along the main street.",
         "By the afternoon the water had begun to fall, leaving a line of mud on every wall."],
    ],
    [  # baking bread
        ["Good bread needs little more than flour, water, salt and patience.",
         "The dough should rest until it has nearly doubled in size, which can take three hours in a cool kitchen.",
         "Bakers often press a finger into the surface to see whether it springs back slowly."],
        ["A very hot oven gives the loaf a thick, dark crust.",
         "Some people place a tray of water on the lowest shelf so that steam keeps the crust soft for the first minutes.",
         "When the loaf sounds hollow as you tap its base, it is ready to cool on a rack.",
         "Cutting it while it is still warm is tempting, but the crumb will be gummy."],
    ],
    [  # a lighthouse keeper's routine
        ["For most of the last century, the lighthouse on the northern cape was tended by a single keeper.",
         "Every evening he climbed one hundred and twelve steps to light the lamp and wind the clockwork that turned the lens.",
         "In foggy weather he also sounded a horn every thirty seconds until sunrise."],
        ["The keeper kept a logbook in which he recorded the wind, the state of the sea and every ship that passed.",
         "On calm days he painted the railings and repaired the roof of the small cottage beside the tower.",
         "Supplies arrived by boat once a fortnight, weather permitting.",
         "When the light was finally automated in 1987, the logbooks were given to the town museum."],
    ],
    [  # fixing a bicycle
        ["A flat tyre is the most common problem a cyclist will meet on the road.",
         "First, remove the wheel and use two plastic levers to lift one side of the tyre away from the rim.",
         "Pull out the inner tube and pump a little air into it, so that the hole becomes easier to find."],
        ["Holding the tube close to your cheek often helps, because you can feel the escaping air.",
         "Once you have found the puncture, roughen the rubber around it with sandpaper and apply a thin layer of glue.",
         "Wait until the glue turns dull before pressing the patch firmly in place.",
         "Finally, check the inside of the tyre for the thorn or shard of glass that caused the damage!"],
    ],
    [  # watching the night sky
        ["On a clear winter night, far from the lights of any town, thousands of stars are visible without a telescope.",
         "Dr. Amina Osei, who teaches astronomy at the county college, takes her students to a hill behind the reservoir.",
         "She asks them to wait twenty minutes before looking up, so that their eyes can adjust to the dark."],
        ["\"Do you see that faint band of light?\" she asks every year.",
         "It is the disc of our own galaxy, seen from the inside.",
         "The students usually fall silent for a while, and then the questions begin.",
         "Why do some stars look red and others blue?",
         "How far away is the nearest one, and could anyone ever travel there?"],
    ],
    [  # a small library reopens
        ["After eighteen months of repairs, the little library on Station Road opened its doors again on Saturday.",
         "The new roof no longer leaks, and the reading room has tall windows that face the park.",
         "Mr. Daniel Reyes, the head librarian, said that more than four hundred people came on the first day."],
        ["Volunteers had spent the summer sorting donated books into boxes marked by subject.",
         "There is now a corner for young children with low shelves, cushions and a wooden train.",
         "Older visitors asked mostly about the local history collection, which survived the repairs in a dry cellar.",
         "The library will be open six days a week, and on Thursday evenings it will host a reading group."],
    ],
]


def sentences(document: list[list[str]]) -> list[str]:
    """All sentences of a document, in order."""
    return [s for paragraph in document for s in paragraph]


def all_sentences() -> list[str]:
    return [s for document in DOCUMENTS for s in sentences(document)]


def _wrap(text: str, width: int = 60) -> list[str]:
    """Break ``text`` into lines of at most about ``width`` characters, at spaces."""
    lines, current = [], ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    return lines + [current]


def book_text(documents: list[list[list[str]]] = DOCUMENTS) -> str:
    """Book-like text: wrapped paragraphs, one blank line between paragraphs, two between documents."""
    blocks = ["\n\n".join("\n".join(_wrap(" ".join(p))) for p in document) for document in documents]
    return "\n\n\n".join(blocks) + "\n"


def albert_text(documents: list[list[list[str]]] = DOCUMENTS) -> str:
    """ALBERT format: one sentence per line, one blank line between documents."""
    return "\n\n".join("\n".join(sentences(d)) for d in documents) + "\n"


def write_jsonl(path: Path, documents: list[list[list[str]]] = DOCUMENTS) -> Path:
    """One JSON record per document, paragraphs separated by blank lines in its "text" field."""
    records = [json.dumps({"id": i, "text": "\n\n".join(" ".join(p) for p in d)}) for i, d in enumerate(documents)]
    path.write_text("\n".join(records) + "\n", encoding="utf-8")
    return path
