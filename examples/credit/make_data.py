"""Writes the credit demo's inputs from the bundled public-domain text sample (run once; the outputs are committed).

train.jsonl: one record per paragraph, with ``source`` = the document it comes from (the Declaration, the preamble,
each Article of the Constitution, the Gettysburg Address, the Second Inaugural) and ``licence``; plus a ``spam``
source of random letters. outputs.jsonl: a handful of "generated" outputs that continue a famous line of one
document nearly verbatim, each with the amount to share out.

    .venv/bin/python examples/credit/make_data.py
"""

import json
import random
from pathlib import Path

from datacredit.data import load_text_sample

HEADINGS = {"THE DECLARATION OF INDEPENDENCE": "declaration", "THE CONSTITUTION OF THE UNITED STATES": "preamble",
            "THE GETTYSBURG ADDRESS": "gettysburg", "SECOND INAUGURAL ADDRESS": "second-inaugural"}
OUTPUTS = [
    ("We hold these truths to be ", "self-evident, that all men are created equal", 10.0),
    ("Four score and seven years ago our fathers ", "brought forth on this continent, a new nation", 10.0),
    ("With malice toward none, with ", "charity for all", 5.0),
    ("The President shall be ", "Commander in Chief of the Army and Navy", 5.0),
    ("No State shall, without the Consent of the Congress, lay any ", "Imposts or Duties", 5.0),
]


def main() -> None:
    here = Path(__file__).parent
    source, records = "declaration", []
    for para in load_text_sample().split("\n"):
        para = para.strip()
        if not para:
            continue
        if para in HEADINGS:
            source = HEADINGS[para]
            continue
        if para.startswith("Article. "):
            source = "article-" + para.removeprefix("Article. ").rstrip(".").lower()
            continue
        records.append({"text": para + "\n", "source": source, "licence": "public-domain"})
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz "
    records += [{"text": "".join(rng.choice(letters) for _ in range(300)), "source": "spam", "licence": "unknown"}
                for _ in range(6)]
    with open(here / "train.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(here / "outputs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": p, "completion": c, "amount": a}) + "\n" for p, c, a in OUTPUTS)
    print(f"{len(records)} training records from {len({r['source'] for r in records})} sources, {len(OUTPUTS)} outputs")


if __name__ == "__main__":
    main()
