"""The benchmark suite (bench/suite.py) runs end to end in its tiny mode and prints its table."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_suite_tiny_runs(tmp_path):
    out_json = tmp_path / "bench.json"
    p = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "suite.py"), "--tiny", "--runs", "1", "--warmup", "1",
         "--only", "optim", "--exclude", "tinygrad", "--scenarios", "load-mmap,load-copy,scan,open,save,info",
         "--dir", str(tmp_path / "fx"), "--json", str(out_json)],
        capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| scenario |"))
    rows = [line for line in lines[header + 2:] if line.startswith("|")]
    tools = {r.split("|")[3].strip() for r in rows}
    for tool in ("torchfree.load(mmap=True)", "torchfree.load(mmap=False)", "torchfree.scan",
                 "torchfree.open(mmap=False)[name]", "torchfree.save(atomic=False)",
                 "limit: readinto fresh memory (np.empty)", "naive zipfile+pickle+numpy",
                 "limit: write() the same bytes, 2 MB calls", "limit: write() the same bytes, 512 kB calls",
                 "limit: fallocate + write() the same bytes, 512 kB calls", "torchfree info FILE",
                 "limit: python -c pass (the interpreter's start)", "reference: python -c 'import numpy'"):
        assert tool in tools, (tool, p.stdout[-3000:])
    # every torchfree row ran and its result check passed (torchfree.torch's rows need torch: in a
    # torch-free run they say so)
    torch_missing = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode != 0
    for r in rows:
        cells = [c.strip() for c in r.split("|")]
        if cells[3].startswith("torchfree.torch.") and torch_missing:
            assert "not installed" in r, r
            continue
        if cells[3].startswith("torchfree"):
            assert cells[4] not in ("—", ""), r
            assert "CHECK FAILED" not in r and "failed" not in r, r
    # the legacy fixtures load (copy) too
    assert any("legacy" in r and "torchfree.load(mmap=False)" in r for r in rows)
    assert out_json.stat().st_size > 0
