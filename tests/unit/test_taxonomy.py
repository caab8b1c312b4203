"""Topic taxonomy: the shipped default file, the reader's validation, and SPEED's truncation."""

from __future__ import annotations

from collections import Counter

import pytest

from speed_ray.synth import taxonomy


def test_default_taxonomy_is_large_valid_and_diverse():
    topics = taxonomy.read_taxonomy(taxonomy.default_topics_path())
    assert len(set(topics)) == len(topics) >= 1000
    assert all(2 <= t.count("/") + 1 <= 6 for t in topics)
    areas = Counter(t.split("/")[0] for t in topics)
    assert len(areas) >= 8
    assert max(areas.values()) <= 0.2 * len(topics)


def test_default_taxonomy_names_source_and_ships_its_license():
    path = taxonomy.default_topics_path()
    header = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    assert any("WordNet 3.0" in line for line in header)
    assert "Princeton University" in (path.parent / "TOPICS_LICENSE").read_text(encoding="utf-8")


def test_truncate_keeps_first_two_and_last_two_levels():
    # SPEED App. D.1's own example.
    path = "Arts/Movies/Titles/3/36_Hours_-_1964/Cast_and_Crew"
    assert taxonomy.truncate(path) == "Arts/Movies/36_Hours_-_1964/Cast_and_Crew"
    assert taxonomy.truncate("A/B/C/D/E") == "A/B/D/E"
    assert taxonomy.truncate("A/B/C/D") == "A/B/C/D"
    assert taxonomy.truncate("/Science/Biology/") == "Science/Biology"
    assert taxonomy.truncate("Arts") == "Arts"


def test_reader_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "topics.txt"
    path.write_text("# header\n\nArts/Movies\n  # indented comment\n  Science/Biology/Genetics  \n")
    assert taxonomy.read_taxonomy(path) == ["Arts/Movies", "Science/Biology/Genetics"]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("A//B", "empty segment"),
        ("/A/B", "empty segment"),
        ("A/ B", "starts or ends with a space"),
        ("A/" + "x" * 200, "chars"),
    ],
)
def test_reader_names_file_and_line_of_a_bad_path(tmp_path, line, problem):
    path = tmp_path / "bad.txt"
    path.write_text(f"# header\nArts/Movies\n{line}\n")
    with pytest.raises(ValueError, match=r"bad\.txt:3: expected a topic path") as info:
        taxonomy.read_taxonomy(path)
    assert problem in str(info.value)


def test_reader_rejects_a_file_without_topics(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match=r"empty\.txt: no topics"):
        taxonomy.read_taxonomy(path)
