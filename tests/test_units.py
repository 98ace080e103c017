import pytest

from edgebuild.units import format_size, parse_size


@pytest.mark.parametrize("text, expected", [
    ("40KB", 40_000), ("40 KB", 40_000), ("1.5MB", 1_500_000), ("2KiB", 2048), ("1MiB", 1 << 20), ("12B", 12),
])
def test_sizes_parse_with_decimal_and_binary_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad, reason", [
    (40000, "with a unit"), ("40", "with a unit"), ("-4KB", "with a unit"), ("0KB", "greater than zero"),
    ("4 kb", "unknown unit"), ("2TB", "unknown unit"), ("5000GB", "larger than 1TB"), (True, "with a unit"),
])
def test_bad_sizes_say_why(bad, reason):
    with pytest.raises(ValueError, match=reason):
        parse_size(bad)


def test_format_size_uses_decimal_units():
    assert format_size(27424) == "27.4 KB"
    assert format_size(999) == "999 B"


def test_generated_string_literals_are_escaped():
    from edgebuild.codegen import code_environment

    kotlin = code_environment("kotlin", "android").filters["literal"]
    swift = code_environment("swift", "ios").filters["literal"]
    hostile = 'a"b\\c$d\n'
    assert kotlin(hostile) == 'a\\"b\\\\c\\$d\\n'
    assert swift(hostile) == 'a\\"b\\\\c$d\\n'


def test_reasons_read_the_direction_off_the_numbers():
    from edgebuild.reasons import candidate_reason

    candidate = {"status": "fail", "failed": [
        {"constraint": "size", "limit": 1000, "actual": 26648},
        {"constraint": "accuracy", "limit": 0.05, "actual": 0.0812},  # kl: lower is better
        {"constraint": "latency", "limit": 0.001, "actual": 0.012}]}
    assert candidate_reason(candidate, exact=True) == (
        "size 26648 B > limit 1000 B; accuracy 0.0812 > floor 0.0500; latency 0.012 ms > limit 0.001 ms")
    assert candidate_reason(candidate) == "size 26.6 KB > 1.0 KB; accuracy 0.0812 > 0.0500; latency 0.012 ms > 0.001 ms"
