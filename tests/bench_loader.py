"""Load a script of bench/ as a module (bench/ is not a package): ``load_bench("throughput")``."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_bench(script: str):
    """bench/<script>.py executed as a fresh module named ``bench_<script>``."""
    spec = importlib.util.spec_from_file_location(f"bench_{script}", ROOT / "bench" / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
