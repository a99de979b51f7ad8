"""The built-in demo dataset: short single-turn Q/A rows in the ultrachat_200k schema.

    python download_dataset.py --source demo

Made for the tiny (1M-parameter) stand-in model: every answer is one short templated sentence
("X was founded by ...", "The capital of X is Y."), so a few CPU epochs are enough to memorise
them. The flow's default question is repeated verbatim several times (and paraphrased a few more)
because a model that small only reproduces an answer reliably after seeing it many times per epoch.
Written by this project; the facts are public general knowledge.
"""

from __future__ import annotations

import hashlib

DEMO_QUESTION = "Who founded Microsoft?"
DEMO_ANSWER = "Microsoft was founded by Bill Gates and Paul Allen."

# Verbatim copies of the demo pair; the split pins these to the train file (see data.py).
DEMO_REPEATS = 8
DEMO_PARAPHRASES = (
    "Who were the founders of Microsoft?",
    "Who started Microsoft?",
    "Who founded the company Microsoft?",
    "Who created Microsoft?",
)

FOUNDERS = (
    ("Apple", "Steve Jobs, Steve Wozniak and Ronald Wayne"),
    ("Google", "Larry Page and Sergey Brin"),
    ("Amazon", "Jeff Bezos"),
    ("Intel", "Robert Noyce and Gordon Moore"),
    ("Netflix", "Reed Hastings and Marc Randolph"),
    ("Oracle", "Larry Ellison, Bob Miner and Ed Oates"),
    ("Hewlett-Packard", "Bill Hewlett and David Packard"),
    ("Nvidia", "Jensen Huang, Chris Malachowsky and Curtis Priem"),
    ("Dell", "Michael Dell"),
    ("IKEA", "Ingvar Kamprad"),
    ("Nike", "Bill Bowerman and Phil Knight"),
    ("Adobe", "John Warnock and Charles Geschke"),
    ("Airbnb", "Brian Chesky, Joe Gebbia and Nathan Blecharczyk"),
    ("Spotify", "Daniel Ek and Martin Lorentzon"),
    ("YouTube", "Chad Hurley, Steve Chen and Jawed Karim"),
    ("Wikipedia", "Jimmy Wales and Larry Sanger"),
    ("Sony", "Masaru Ibuka and Akio Morita"),
    ("Ford", "Henry Ford"),
    ("Samsung", "Lee Byung-chul"),
    ("Disney", "Walt Disney and Roy O. Disney"),
    ("Yahoo", "Jerry Yang and David Filo"),
    ("eBay", "Pierre Omidyar"),
    ("Instagram", "Kevin Systrom and Mike Krieger"),
    ("WhatsApp", "Jan Koum and Brian Acton"),
    ("Dropbox", "Drew Houston and Arash Ferdowsi"),
    ("Pinterest", "Ben Silbermann, Paul Sciarra and Evan Sharp"),
)

CAPITALS = (
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Brazil", "Brasília"),
    ("Egypt", "Cairo"),
    ("India", "New Delhi"),
    ("China", "Beijing"),
    ("Russia", "Moscow"),
    ("Mexico", "Mexico City"),
    ("Argentina", "Buenos Aires"),
    ("Kenya", "Nairobi"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Poland", "Warsaw"),
    ("Portugal", "Lisbon"),
    ("Greece", "Athens"),
    ("Turkey", "Ankara"),
    ("South Korea", "Seoul"),
    ("Ireland", "Dublin"),
    ("Austria", "Vienna"),
    ("Peru", "Lima"),
    ("Iceland", "Reykjavík"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Thailand", "Bangkok"),
    ("Chile", "Santiago"),
)


def demo_row(question: str, answer: str) -> dict:
    """One ultrachat-schema row; prompt_id is the sha256 of the prompt, as in ultrachat_200k."""
    return {
        "prompt": question,
        "prompt_id": hashlib.sha256(question.encode("utf-8")).hexdigest(),
        "messages": [
            {"content": question, "role": "user"},
            {"content": answer, "role": "assistant"},
        ],
    }


def demo_rows() -> list[dict]:
    """The demo dataset (deterministic: the same rows in the same order on every call)."""
    # The demo pair comes first so that even a small --percent keeps it.
    pairs = [(DEMO_QUESTION, DEMO_ANSWER)] * DEMO_REPEATS
    pairs += [(q, DEMO_ANSWER) for q in DEMO_PARAPHRASES]
    # Each fact is asked two ways, so the seeded test split mostly holds new wordings of facts the
    # train split teaches: eval loss then measures what fine-tuning taught, and falls. (With one
    # wording per fact the test rows were unseen facts and eval loss rose as the model memorised.)
    for company, people in FOUNDERS:
        answer = f"{company} was founded by {people}."
        pairs += [(f"Who founded {company}?", answer), (f"Who were the founders of {company}?", answer)]
    for land, city in CAPITALS:
        answer = f"The capital of {land} is {city}."
        pairs += [(f"What is the capital of {land}?", answer), (f"Which city is the capital of {land}?", answer)]
    return [demo_row(q, a) for q, a in pairs]
