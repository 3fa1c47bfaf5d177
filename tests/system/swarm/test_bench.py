import io

from rich.console import Console

from node.bench.allreduce import print_allreduce_table, run_allreduce_bench


def test_bench_runs_real_peers_and_reports_the_bound():
    result = run_allreduce_bench(peers=2, size_mb=1, rounds=2, probe_bytes=32 * 2**20)
    assert [row["ok"] for row in result["rounds"]] == [2, 2]
    assert result["max_abs_error"] <= 1e-5
    assert result["loopback_bytes_per_second"] > 0 and 0 < result["bound_seconds"] < result["median_allreduce_seconds"]
    output = io.StringIO()
    print_allreduce_table(result, Console(file=output, width=120))
    assert "bound 2(N-1)/N" in output.getvalue()
