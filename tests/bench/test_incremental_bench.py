"""The incremental-run benchmark end to end on a tiny corpus: the nightly rerun embeds exactly the changed texts,
its output holds exactly the edited corpus's ids, and the planning-only runs report their counts and memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.bench import incremental

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_incremental_bench_measures_a_nightly_run_and_planning(tmp_path: Path, minilm_dir: Path) -> None:
    out = tmp_path / "bench.json"
    incremental.main(["--rows", "400", "--files", "4", "--scan-rows", "2000,4000", "--work", str(tmp_path / "w"),
                      "--json", str(out)])
    record = json.loads(out.read_text())
    nightly = record["incremental"]
    assert nightly["ids_exact"] and nightly["tokens_over_ideal"] == 1.0
    counts = nightly["nightly_counts"]
    assert counts["changed"] == 4 and counts["deleted"] == 2 and counts["embedded"] == 8
    assert nightly["nightly_tokens"] < nightly["full_tokens"]
    sizes = [s["rows"] for s in record["scan"]]
    assert sizes == [2000, 4000]
    for scan in record["scan"]:
        added = scan["one_row_added"]["counts"]
        assert added["added"] == 1 and added["unchanged"] == scan["rows"] and added["embedded"] == 1
        assert all(scan[phase]["peak_rss_mib"] > 0 for phase in ("first_scan", "unchanged", "touched"))
