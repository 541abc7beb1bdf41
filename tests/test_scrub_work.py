"""What the scrubber does once rather than at every read: judged by the work it does (its calls),
which does not drift with the machine's load as a timing would."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from conftest import read_capture, reidentify

from ingest.dedupe import dedupe
from ingest.normalize import normalize
from ingest.scrub import Scrubber
from ingest.sources import split_lines
from ingest.spans import build_trace


class CountingScrubber(Scrubber):
    """A real scrubber that counts the values it scrubs by their name."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: Counter[tuple[str, Any]] = Counter()

    def field(self, name: str, value: Any) -> Any:
        self.fields[name, value] += 1
        return super().field(name, value)


def rows_of(record: dict) -> list[dict]:
    data = (json.dumps(record) + "\n").encode()
    lines, bad = split_lines("proxy_calls.jsonl", data, 0, 1)
    frame, quarantined = normalize(lines)
    assert not bad and not quarantined
    return list(dedupe(frame)[0].iter_rows(named=True))


def test_a_request_tag_is_scrubbed_once_however_often_it_is_read() -> None:
    """A call's tags are read for its span and for its trace's tags, and the same tags come with
    call after call: each tag is split and its value scrubbed by its key's name once."""
    record = read_capture()[0]
    assert record["request_tags"] == ["User-Agent: OpenAI", "User-Agent: OpenAI/Python 3.57.0"]
    scrub = CountingScrubber()
    traces = [build_trace(rows_of(r), "1", scrub=scrub) for r in reidentify([record, record])]
    assert scrub.fields["User-Agent", "OpenAI"] == 1
    assert scrub.fields["User-Agent", "OpenAI/Python 3.57.0"] == 1
    for t in traces:
        assert t.data[0].attributes["request_tags"] == record["request_tags"]
        assert t.data[0].attributes["mlflow.traceTag.User-Agent"] == "OpenAI, OpenAI/Python 3.57.0"
