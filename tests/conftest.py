"""8 fake CPU devices for every test: must run before JAX is imported anywhere.

Compiled programs go to a persistent cache that lives for one test run only (shared by xdist
workers and by the CLIs the tests start, through the environment, and removed at the end): the many
CLI runs and restarts recompile the same programs, and a run never reads another run's entries.
"""
import os
import shutil
import tempfile

# The tests' programs are tiny, so compiling them costs more CPU than running most of them: LLVM's
# expensive passes and backend optimisation are off (test_vae_gan.py alone: 264 → 179 CPU-seconds; the
# suite: 2370 → 2012). Floats can differ from a default build in the last bit (seen in a grad norm), so
# every process a test compares against gets the same flags (`tests.helpers.cli_env`).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# one directory per run: xdist workers are children of the process that started the run
_OWNER = os.getppid() if "PYTEST_XDIST_WORKER" in os.environ else os.getpid()
_CACHE = os.path.join(tempfile.gettempdir(), f"melody-jax-test-cache-{_OWNER}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# Property tests explore the same inputs on every run (derandomized, no example database), so the
# suite gives one verdict per commit; a new failure is pinned with `@example` where it is found.
from hypothesis import settings  # noqa: E402

settings.register_profile("melody-jax", derandomize=True, database=None, print_blob=True)
settings.load_profile("melody-jax")


def pytest_sessionfinish(session, exitstatus):
    if "PYTEST_XDIST_WORKER" not in os.environ:
        shutil.rmtree(_CACHE, ignore_errors=True)


# Longest files first: `make test` runs xdist with --dist loadfile --no-loadscope-reorder, which hands
# whole files to workers in collection order, so the long ones (a trained fixture each) start at once
# and the many short files fill the gaps after them (longest-processing-time-first). xdist's default
# order, most tests first, started them last and left one worker running alone at the end.
SLOWEST_FILES = ("test_codec.py", "test_vae_gan.py", "test_melody_pipeline.py", "test_dpd_stage.py",
                 "test_ssl_stage.py", "test_app.py", "test_hf_musicgen.py", "test_musicgen.py",
                 "test_train_accumulate.py", "test_reliability_cli.py", "test_semantic_lm.py", "test_dpd.py", "test_mulan.py",
                 "test_conformer.py", "test_multiprocess.py", "test_training.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FILES)))  # stable: file order kept
