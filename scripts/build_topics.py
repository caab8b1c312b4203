"""Build ``speed_ray/data/topics.txt``, the default topic taxonomy, from WordNet 3.0's noun hierarchy.

SPEED (§3.2.1, App. D.1) samples brainstorming topics from the Open Directory Project (ODP/DMOZ), which
no package registry ships. This script derives an ODP-shaped stand-in from WordNet 3.0, which Debian
packages: 13 ODP top-level names (Arts, Business, Computers, ...) each hold a few hand-picked WordNet
noun synsets ("anchors", e.g. Arts <- musical_instrument), and each anchor brings its hyponym subtree
as ``Area/Anchor/Hyponym/...`` paths, e.g. ``Arts/Musical_Instrument/Stringed_Instrument/Guitar``.
Only the area names and anchor choices are ours; every edge below an anchor is a WordNet hypernym link.

Get the source and rebuild (the output is the same on every run):

    apt-get install wordnet-base        # Debian 12 package 1:3.0-37, files in /usr/share/wordnet
    python scripts/build_topics.py      # writes speed_ray/data/topics.txt and TOPICS_LICENSE

Choices, each with its reason:
- A synset is named by WordNet's first lemma, its most specific name ("Natural_Language", not the
  more frequent but ambiguous "Tongue"); an anchor is named by the lemma listed for it below.
- The path to a synset is its shortest hyponym chain from the anchor (breadth-first in WordNet's
  pointer order), and a synset appears once in the whole file (the first area and anchor in
  ``AREAS`` order win: Sports comes before Games so athletic games land in Sports), so WordNet's
  multiple inheritance does not repeat topics.
- Paths stop at 6 levels (area, anchor, 4 below): deeper WordNet nodes are fine-grained species
  and chemical compounds that add little to brainstorming.
- Instances (proper nouns such as France or the Nile) come in only under Regional's anchors.
- Each area keeps at most ``AREA_CAP`` topics, ranked by sense-tag count plus number of direct
  hyponyms (sense-tag counts from cntlist.rev, the SemCor frequencies), so familiar concepts and
  real categories win over rare leaves; this keeps every area under 15% of the file.
"""

from __future__ import annotations

import argparse
from collections import deque
from pathlib import Path
from typing import NamedTuple

WORDNET_DIR = Path("/usr/share/wordnet")
OUT_DIR = Path(__file__).resolve().parents[1] / "speed_ray" / "data"
MAX_DEPTH = 6
AREA_CAP = 330
SMALL_WORDS = {"a", "an", "and", "as", "at", "by", "for", "in", "of", "on", "or", "the", "to", "with"}


class Anchor(NamedTuple):
    offset: str  # byte offset of the synset in data.noun (stable within WordNet 3.0)
    lemma: str  # one of its lemmas, used as the path segment; checked so another data file fails loudly
    instances: bool = False  # also follow instance hyponyms (proper nouns)


# ODP's top-level names; each area lists WordNet noun synsets whose subtrees belong to it. Order
# matters where subtrees overlap: the first area to reach a synset keeps it.
AREAS: dict[str, list[Anchor]] = {
    "Arts": [
        Anchor("02743547", "art"),
        Anchor("07071942", "music_genre"),
        Anchor("03800933", "musical_instrument"),
        Anchor("06364329", "literary_composition"),
        Anchor("07092158", "writing_style"),
        Anchor("00428270", "dancing"),
        Anchor("06157326", "performing_arts"),
        Anchor("06613686", "movie"),
        Anchor("05841351", "architectural_style"),
        Anchor("00903559", "photography"),
        Anchor("03816849", "needlework"),
        Anchor("00714944", "handicraft"),
    ],
    "Business": [
        Anchor("01094725", "commercial_enterprise"),
        Anchor("08065234", "industry"),
        Anchor("00582388", "occupation"),
        Anchor("08054721", "financial_institution"),
        Anchor("08058098", "company"),
        Anchor("01113068", "selling"),
        Anchor("13308999", "tax"),
        Anchor("13344804", "insurance"),
        Anchor("08366753", "economy"),
        Anchor("13384557", "money"),
    ],
    "Computers": [
        Anchor("03082979", "computer"),
        Anchor("06566077", "software"),
        Anchor("06898352", "programming_language"),
        Anchor("03085333", "computer_network"),
        Anchor("06128570", "computer_science"),
        Anchor("03493333", "hardware"),
        Anchor("03744276", "memory"),
        Anchor("03916720", "peripheral"),
        Anchor("06509210", "computer_file"),
        Anchor("13455487", "data_processing"),
        Anchor("06637824", "database"),
        Anchor("03277771", "electronic_device"),
        Anchor("03278248", "electronic_equipment"),
    ],
    "Sports": [
        Anchor("00523513", "sport"),
        Anchor("00463246", "athletic_game"),
        Anchor("00433661", "outdoor_sport"),
        Anchor("00441824", "water_sport"),
        Anchor("04285146", "sports_equipment"),
        Anchor("09820263", "athlete"),
        Anchor("07456188", "contest"),
    ],
    "Games": [
        Anchor("00455599", "game"),
        Anchor("00430606", "game"),
        Anchor("00502415", "board_game"),
        Anchor("00488225", "card_game"),
        Anchor("00458890", "computer_game"),
        Anchor("04028315", "puzzle"),
        Anchor("03964744", "toy"),
        Anchor("03414162", "game_equipment"),
        Anchor("00430140", "gambling"),
    ],
    "Health": [
        Anchor("14070360", "disease"),
        Anchor("14052403", "disorder"),
        Anchor("14299637", "symptom"),
        Anchor("03740161", "medicine"),
        Anchor("03247620", "drug"),
        Anchor("00657604", "medical_care"),
        Anchor("01024392", "medical_procedure"),
        Anchor("00661091", "therapy"),
        Anchor("06043075", "medicine"),
        Anchor("10165109", "health_professional"),
        Anchor("05220461", "body_part"),
    ],
    "Home": [
        Anchor("03405725", "furniture"),
        Anchor("04105893", "room"),
        Anchor("03259505", "dwelling"),
        Anchor("03528263", "home_appliance"),
        Anchor("03621049", "kitchen_utensil"),
        Anchor("04381994", "tableware"),
        Anchor("00243918", "cooking"),
        Anchor("07571324", "cuisine"),
        Anchor("07557434", "dish"),
        Anchor("07622061", "baked_goods"),
        Anchor("07707451", "vegetable"),
        Anchor("07811416", "herb"),
        Anchor("07812184", "spice"),
        Anchor("03417345", "garden"),
        Anchor("03418242", "garden_tool"),
    ],
    "Recreation": [
        Anchor("00432689", "avocation"),
        Anchor("00295701", "travel"),
        Anchor("03791235", "motor_vehicle"),
        Anchor("02858304", "boat"),
        Anchor("02686568", "aircraft"),
        Anchor("01317541", "domestic_animal"),
        Anchor("00453935", "fishing"),
        Anchor("00452293", "hunt"),
        Anchor("07891726", "wine"),
        Anchor("07886849", "beer"),
        Anchor("07881800", "beverage"),
    ],
    "Reference": [
        Anchor("00883297", "education"),
        Anchor("08276342", "educational_institution"),
        Anchor("00884466", "course"),
        Anchor("06589574", "publication"),
        Anchor("06417598", "reference_book"),
        Anchor("06904171", "natural_language"),
        Anchor("06351202", "orthography"),
        Anchor("13583724", "unit_of_measurement"),
        Anchor("15173479", "calendar"),
        Anchor("06153846", "humanistic_discipline"),
    ],
    "Regional": [
        Anchor("09254614", "continent", instances=True),
        Anchor("08544813", "country", instances=True),
        Anchor("08654360", "state", instances=True),
        Anchor("08691669", "national_capital", instances=True),
        Anchor("09376198", "ocean", instances=True),
        Anchor("09426788", "sea", instances=True),
        Anchor("09316454", "island", instances=True),
        Anchor("09359803", "mountain", instances=True),
        Anchor("09411430", "river", instances=True),
        Anchor("09328904", "lake", instances=True),
    ],
    "Science": [
        Anchor("05999797", "science"),
        Anchor("14622893", "chemical_element"),
        Anchor("14818238", "compound"),
        Anchor("14662574", "mineral"),
        Anchor("14696793", "rock"),
        Anchor("09239740", "celestial_body"),
        Anchor("11524662", "weather"),
        Anchor("01861778", "mammal"),
        Anchor("01503061", "bird"),
        Anchor("02512053", "fish"),
        Anchor("01661091", "reptile"),
        Anchor("02159955", "insect"),
        Anchor("13104059", "tree"),
        Anchor("11669921", "flower"),
    ],
    "Shopping": [
        Anchor("03051540", "clothing"),
        Anchor("03380867", "footwear"),
        Anchor("03502509", "headdress"),
        Anchor("03597469", "jewelry"),
        Anchor("04447443", "toiletry"),
        Anchor("03113152", "cosmetic"),
        Anchor("03093574", "consumer_goods"),
        Anchor("03076708", "commodity"),
    ],
    "Society": [
        Anchor("08081668", "religion"),
        Anchor("05946687", "religion"),
        Anchor("09628382", "religious_person"),
        Anchor("07978423", "mythology"),
        Anchor("08050678", "government"),
        Anchor("08367880", "political_system"),
        Anchor("08256968", "party"),
        Anchor("08441203", "law"),
        Anchor("00766234", "crime"),
        Anchor("08348815", "law_enforcement_agency"),
        Anchor("08198398", "military_unit"),
        Anchor("08009834", "nongovernmental_organization"),
        Anchor("07967382", "ethnic_group"),
        Anchor("07969695", "kin"),
        Anchor("09623038", "leader"),
        Anchor("15183428", "holiday"),
        Anchor("07450842", "ceremony"),
    ],
}


class Synset(NamedTuple):
    lemmas: list[tuple[str, str]]  # (lemma, lex_id) in WordNet's order
    lex_filenum: int
    hyponyms: list[str]  # offsets of ordinary hyponyms, in pointer order
    instances: list[str]  # offsets of instance hyponyms


def read_nouns(path: Path) -> dict[str, Synset]:
    """Parse data.noun (format in wndb(5WN)): offset lex_filenum ss_type w_cnt (word lex_id)* p_cnt ptr*."""
    synsets = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("  "):  # the license header
            continue
        fields = line.split(" | ", 1)[0].split()
        n_words = int(fields[3], 16)
        lemmas = [(fields[4 + 2 * i], fields[5 + 2 * i]) for i in range(n_words)]
        at = 4 + 2 * n_words
        pointers = [fields[at + 1 + 4 * i : at + 5 + 4 * i] for i in range(int(fields[at]))]
        synsets[fields[0]] = Synset(
            lemmas=lemmas,
            lex_filenum=int(fields[1]),
            hyponyms=[p[1] for p in pointers if p[0] == "~" and p[2] == "n"],
            instances=[p[1] for p in pointers if p[0] == "~i" and p[2] == "n"],
        )
    return synsets


def read_tag_counts(path: Path) -> dict[str, int]:
    """Sense key -> number of sense-tagged uses, from cntlist.rev lines ``key sense_number count``."""
    counts = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, _, count = line.split()
        counts[key] = int(count)
    return counts


def lemma_counts(synset: Synset, counts: dict[str, int]) -> list[int]:
    """Tag count of each lemma; a noun sense key is ``lemma%1:lex_filenum:lex_id::``."""
    return [
        counts.get(f"{lemma.lower()}%1:{synset.lex_filenum:02d}:{int(lex_id, 16):02d}::", 0)
        for lemma, lex_id in synset.lemmas
    ]


def segment(lemma: str) -> str:
    """WordNet lemma -> ODP-style path segment: ``music_genre`` -> ``Music_Genre``."""
    words = lemma.split("_")
    return "_".join(
        w if (i and w in SMALL_WORDS) or not w else w[0].upper() + w[1:] for i, w in enumerate(words)
    )


def subtree(root: str, anchor: Anchor, synsets: dict[str, Synset]) -> dict[str, list[str]]:
    """Breadth-first walk from ``root``: synset offset -> chain of offsets from the anchor to it."""
    chains = {root: [root]}
    queue = deque([root])
    while queue:
        offset = queue.popleft()
        if len(chains[offset]) >= MAX_DEPTH - 1:
            continue
        node = synsets[offset]
        for child in node.hyponyms + (node.instances if anchor.instances else []):
            if child not in chains:
                chains[child] = chains[offset] + [child]
                queue.append(child)
    return chains


def build(synsets: dict[str, Synset], counts: dict[str, int]) -> dict[str, list[str]]:
    """Area -> its sorted topic paths."""
    names = {offset: segment(synset.lemmas[0][0]) for offset, synset in synsets.items()}
    scores = {
        offset: sum(lemma_counts(synset, counts)) + len(synset.hyponyms) + len(synset.instances)
        for offset, synset in synsets.items()
    }
    seen: set[str] = set()
    topics = {}
    for area, anchors in AREAS.items():
        ranked: dict[str, tuple[int, int]] = {}
        for anchor in anchors:
            lemmas = [lemma for lemma, _ in synsets[anchor.offset].lemmas]
            if anchor.lemma not in lemmas:
                raise ValueError(f"{anchor} has lemmas {lemmas}: not WordNet 3.0's data.noun?")
            for offset, chain in subtree(anchor.offset, anchor, synsets).items():
                if offset in seen or "/" in names[offset]:
                    continue
                seen.add(offset)
                path = "/".join([area, segment(anchor.lemma)] + [names[o] for o in chain[1:]])
                # The anchor first, then by score; ties by depth, then by name.
                rank = (-(10**9 if offset == anchor.offset else scores[offset]), len(chain))
                ranked[path] = min(rank, ranked.get(path, rank))
        topics[area] = sorted(sorted(ranked, key=lambda p: (ranked[p], p))[:AREA_CAP])
    return topics


def license_text() -> str:
    """WordNet's license, from the data file's own header (it asks to ship it with every copy)."""
    header = []
    for line in (WORDNET_DIR / "data.noun").read_text(encoding="utf-8").splitlines():
        if not line.startswith("  "):
            break
        header.append(line.split(maxsplit=1)[1].rstrip() if len(line.split()) > 1 else "")
    return "\n".join(header) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    synsets = read_nouns(WORDNET_DIR / "data.noun")
    topics = build(synsets, read_tag_counts(WORDNET_DIR / "cntlist.rev"))
    lines = sorted(p for paths in topics.values() for p in paths)
    header = [
        "# Default SPEED topic taxonomy: ODP-style paths derived from WordNet 3.0 noun hyponyms.",
        "# Source: WordNet 3.0, Princeton University (Debian package wordnet-base 1:3.0-37).",
        "# License: WordNet 3.0 license (BSD-style); see TOPICS_LICENSE next to this file.",
        "# WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.",
        "# Built by scripts/build_topics.py; area names and anchor synsets are listed there.",
        f"# {len(lines)} topics in {len(topics)} areas: "
        + ", ".join(f"{area} {len(paths)}" for area, paths in topics.items()),
    ]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "topics.txt").write_text("\n".join(header + lines) + "\n", encoding="utf-8")
    (args.out_dir / "TOPICS_LICENSE").write_text(
        "topics.txt is derived from WordNet 3.0 and is distributed under its license:\n\n" + license_text(),
        encoding="utf-8",
    )
    print(header[-1][2:])


if __name__ == "__main__":
    main()
