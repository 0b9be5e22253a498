"""8 fake CPU devices for every test: must run before JAX is imported anywhere.

Compiled programs go to a persistent cache that lives for one test run only (shared by xdist
workers and by the CLIs the tests start, through the environment, and removed at the end): the many
CLI runs and restarts recompile the same programs, and a run never reads another run's entries.
"""
import collections
import json
import math
import os
import shutil
import tempfile

# The tests' programs are tiny, so compiling them costs more CPU than running most of them: LLVM's
# expensive passes and backend optimisation are off (test_vae_gan.py alone: 264 → 179 CPU-seconds; the
# suite: 2370 → 2012). Floats can differ from a default build in the last bit (seen in a grad norm), so
# every process a test compares against gets the same flags (`tests.helpers.cli_env`).
# XLA:CPU aborts the process when one of the 8 devices reaches a collective 40 s after the others (20 s
# to its warning): on a loaded 2-core machine, eight device threads and other processes share two cores,
# and a k-means pass over the SSL's frames was aborted that way (twice in the SSL → k-means fixture, and as
# three errors in a fresh-clone run at load 20). Like the tests' timeouts, it is a hang guard, not a benchmark:
# here it waits 20 minutes, and pytest-timeout catches a real hang.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0"
    " --xla_cpu_collective_call_warn_stuck_timeout_seconds=300"
    " --xla_cpu_collective_call_terminate_timeout_seconds=1200"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# one directory per run: xdist workers are children of the process that started the run
_OWNER = os.getppid() if "PYTEST_XDIST_WORKER" in os.environ else os.getpid()
_CACHE = os.path.join(tempfile.gettempdir(), f"melody-jax-test-cache-{_OWNER}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# librosa's numba gufuncs cache their machine code beside librosa's sources. Processes that compiled them in
# different orders leave cache files that do not match, and every later call segfaults (numba#10128; seen
# in a fresh venv, where the cache starts cold): each worker compiles into its own directory of this run's
# cache, and each CLI a test starts into one of its own (`tests.helpers.cli_env`).
# Assigned, not defaulted: xdist workers inherit the controller's environment.
os.environ["NUMBA_CACHE_DIR"] = os.path.join(_CACHE, "numba", os.environ.get("PYTEST_XDIST_WORKER", "main"))

# Property tests explore the same inputs on every run (derandomized, no example database), so the
# suite gives one verdict per commit; a new failure is pinned with `@example` where it is found. No
# deadline and no too_slow health check: both depend on the machine's load, not on the code.
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("melody-jax", derandomize=True, database=None, print_blob=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("melody-jax")


# Longest files first: `make test` runs xdist with --dist loadfile --no-loadscope-reorder, which hands
# whole files to workers in collection order, so the long ones (a trained fixture each) start at once
# and the many short files fill the gaps after them (longest-processing-time-first). The order comes
# from each file's seconds in the last full run (`make durations` writes DURATIONS); a file not
# recorded there goes first if it holds a learning experiment or a long test (`slow`), else last.
DURATIONS = os.path.join(os.path.dirname(__file__), "durations.json")


def pytest_addoption(parser):
    parser.addoption("--record-durations", metavar="PATH", help="write each test file's seconds (JSON) to PATH")


def _recorded() -> dict[str, float]:
    try:
        with open(DURATIONS) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def _unpinned_property_tests(items) -> list[str]:
    """Property tests whose settings would explore other inputs on another run or fail on a slow machine."""
    out = []
    for item in items:
        s = getattr(getattr(item, "obj", None), "_hypothesis_internal_use_settings", None)
        if s is not None and not (s.derandomize and s.database is None and s.deadline is None
                                  and HealthCheck.too_slow in s.suppress_health_check):
            out.append(item.nodeid)
    return out


def pytest_collection_modifyitems(items):
    unpinned = _unpinned_property_tests(items)
    if unpinned:
        raise pytest.UsageError(f"property tests not derandomized (or timing-dependent): {unpinned[:5]}; keep the "
                                "conftest profile's derandomize/database/deadline/too_slow settings")
    recorded = _recorded()
    long = {item.path.name for item in items if item.get_closest_marker("learning") or item.get_closest_marker("slow")}

    def seconds(item) -> float:
        name = item.path.name
        return recorded.get(name, math.inf if name in long else 0.0)

    items.sort(key=lambda item: -seconds(item))  # stable: file order kept among equals


_SECONDS: dict[str, float] = collections.defaultdict(float)


def pytest_runtest_logreport(report):
    _SECONDS[os.path.basename(report.nodeid.split("::")[0])] += report.duration


def pytest_sessionfinish(session, exitstatus):
    if "PYTEST_XDIST_WORKER" in os.environ:
        return
    shutil.rmtree(_CACHE, ignore_errors=True)
    path = session.config.getoption("record_durations")
    if path:
        with open(path, "w") as f:
            json.dump({k: round(v, 1) for k, v in sorted(_SECONDS.items(), key=lambda kv: -kv[1])}, f, indent=0)
            f.write("\n")


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory):
    """`prepared_data(**settings)` → a folder of `launch.prepare_data`'s output for those PrepareSettings
    (progress off), made once per worker and shared by every test file that asks for the same settings;
    read it, never change it."""
    from data_pipeline.builder import PrepareSettings, prepare

    made: dict[tuple, str] = {}

    def make(**fields) -> str:
        key = tuple(sorted(fields.items()))
        if key not in made:
            made[key] = str(tmp_path_factory.mktemp("prepared"))
            prepare(PrepareSettings(**fields), made[key], progress=False)
        return made[key]

    return make
