"""Short fuzzing runs, as CI does on every build (the long runs are described in tests/fuzz/README.md).

Three runs go at once for TORCHFREE_FUZZ_SECONDS (default 20) seconds:

* the libFuzzer targets of the Python-free core (tests/fuzz/fuzz_zipread.c, fuzz_pickscan.c),
  built by tests/fuzz/build.sh with clang and ASan + UBSan; where clang's libFuzzer is missing,
  the same targets linked with the gcc driver (tests/fuzz/driver.c: seed replay plus random
  mutations under ASan + UBSan) run instead -- never a silent skip;
* tests/fuzz/atheris_load.py over torchfree.load / scan / open / pickle_globals (atheris when
  installed, else its own mutation loop), in the interpreter and build under test: the
  ASan + UBSan pass of .ci/run fuzzes the sanitized extension (with the mutation loop, as the
  preloaded sanitizer runtime takes atheris' coverage callbacks).

All seeded with tests/data (with the vendored samples and corpus) and tests/hostile (tests/fuzz/make_seeds.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FUZZ = HERE / "fuzz"
SECONDS = int(os.environ.get("TORCHFREE_FUZZ_SECONDS", "20"))


def _clean_env(**extra):
    """No LD_PRELOAD of the ASan pass: the C targets carry their own sanitizer runtime."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS",
                                                             "PYTHONMALLOC")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if shutil.which("gcc") is None and shutil.which("clang") is None:
        pytest.fail("neither clang nor gcc: the fuzz targets cannot be built")
    work = tmp_path_factory.mktemp("fuzz")
    build = subprocess.run(["bash", str(FUZZ / "build.sh"), str(work / "bin")], capture_output=True, text=True,
                           env=_clean_env(), timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    seeds = subprocess.run([sys.executable, str(FUZZ / "make_seeds.py"), str(work / "seeds")], capture_output=True,
                           text=True, timeout=300)
    assert seeds.returncode == 0, seeds.stdout + seeds.stderr
    bin_ = work / "bin"
    libfuzzer = (bin_ / "fuzz_zipread").exists()
    procs = {}
    for target, seed_dir, dict_ in (("zipread", "zip", "zip.dict"), ("pickscan", "pickle", "pickle.dict")):
        corpus = work / f"corpus_{target}"
        corpus.mkdir()
        art = work / f"art_{target}"
        art.mkdir()
        if libfuzzer:
            cmd = [str(bin_ / f"fuzz_{target}"), f"-max_total_time={SECONDS}", f"-dict={FUZZ / dict_}",
                   "-max_len=131072", "-rss_limit_mb=2048", "-malloc_limit_mb=1024", "-print_final_stats=1",
                   f"-artifact_prefix={art}/", str(corpus), str(work / "seeds" / seed_dir)]
        else:
            cmd = [str(bin_ / f"driver_{target}"), f"-max_total_time={SECONDS}", "-runs=100000000",
                   "-max_len=131072", f"-artifact_prefix={art}/", str(work / "seeds" / seed_dir)]
        env = _clean_env(ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:allocator_may_return_null=1",
                         UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
        procs[target] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          env=env, cwd=work), art)
    # the Python-level run: this interpreter, this build of torchfree
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    cmd = [sys.executable, str(FUZZ / "atheris_load.py"), f"-max_total_time={SECONDS}", "-rss_limit_mb=4096",
           str(HERE / "data"), str(HERE / "hostile")]
    procs["atheris"] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                         cwd=work), work)
    out = {}
    for name, (p, art) in procs.items():
        try:
            text, _ = p.communicate(timeout=SECONDS * 6 + 120)
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
            text += "\n[killed: took too long]"
        out[name] = (p.returncode, text, art, libfuzzer)
    return out


def _report(text: str) -> str:
    lines = [ln for ln in text.splitlines() if not ln.startswith("INFO: Instrumenting")]
    return "\n".join(lines[-60:])


@pytest.mark.parametrize("target", ["zipread", "pickscan"])
def test_c_targets_short_run(runs, target):
    rc, text, art, libfuzzer = runs[target]
    crashes = sorted(p.name for p in Path(art).iterdir())
    assert rc == 0 and not crashes, f"{target}: exit {rc}, artifacts {crashes}\n{_report(text)}"
    if libfuzzer:
        assert "Done" in text and "stat::number_of_executed_units" in text, _report(text)
    else:
        assert "DRIVER runs=" in text, _report(text)
    print(f"{target} ({'libFuzzer' if libfuzzer else 'gcc driver'}):",
          [ln for ln in text.splitlines() if ln.startswith(("stat::number_of_executed_units", "DRIVER", "#"))][-1:])


def test_python_level_short_run(runs):
    rc, text, work, _ = runs["atheris"]
    crashes = sorted(p.name for p in Path(work).iterdir() if p.name.startswith("crash-"))
    assert rc == 0 and not crashes, f"atheris_load.py: exit {rc}, {crashes}\n{_report(text)}"
    assert "Done " in text or "FUZZ loop runs=" in text, _report(text)
