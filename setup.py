"""Build of mdlm_kernels._C (framework-free C++/CUDA, bound with pybind11).

- C++ sources (csrc/bindings.cpp, csrc/cpu/*.cpp) are always compiled: -O3 -std=c++17
  -ffp-contract=off, plus -fopenmp when the compiler accepts it.
- CUDA sources (csrc/cuda/*.cu) are compiled with nvcc whenever it is found (CUDA_HOME / CUDA_PATH,
  `nvcc` on PATH, /usr/local/cuda) and linked in as extra objects together with the *static*
  cudart, so the module imports on machines without a GPU or driver. A .cu compile error fails
  the build. Without nvcc a WARNING is printed and a C++-only module is built (MDLM_WITH_CUDA=0).

Environment:
  MDLM_CUDA_ARCHS  e.g. "80;90" (default) or "90a"; the last arch also embeds PTX
  MDLM_SKIP_CUDA=1 build without CUDA even if nvcc exists
  MAX_JOBS         parallel compile jobs (default: number of CPUs)
  CUDA_HOME / CUDA_PATH  CUDA toolkit root
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
INCLUDE = os.path.join(CSRC, "include")
DEFAULT_ARCHS = "80;90"


def _log(msg):
    print(f"[mdlm-kernels build] {msg}", flush=True)


def _max_jobs():
    try:
        return max(1, int(os.environ.get("MAX_JOBS", "")))
    except ValueError:
        return max(1, os.cpu_count() or 1)


def find_cuda_home():
    """CUDA toolkit root containing bin/nvcc, or None."""
    if os.environ.get("MDLM_SKIP_CUDA", "0") not in ("", "0"):
        return None
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        # wrapper scripts (e.g. /usr/local/bin/nvcc: exec /usr/local/cuda-X/bin/nvcc "$@")
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                m = re.search(rb"(/\S+)/bin/nvcc", head)
                if m:
                    candidates.append(m.group(1).decode())
        except OSError:
            pass
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        has_nvcc = os.path.isfile(os.path.join(home, "bin", "nvcc"))
        has_headers = any(os.path.isfile(os.path.join(home, sub, "cuda_runtime.h"))
                          for sub in ("include", "targets/x86_64-linux/include", "targets/sbsa-linux/include"))
        if has_nvcc and has_headers:
            return home
    return None


def parse_archs(spec):
    """ "80;90" -> gencode flags; the last arch also embeds PTX for forward compatibility."""
    archs = [a.strip().replace(".", "").replace("sm_", "").replace("compute_", "")
             for a in re.split(r"[;, ]+", spec) if a.strip()]
    if not archs or not all(re.fullmatch(r"\d+[af]?", a) for a in archs):
        raise ValueError(f"MDLM_CUDA_ARCHS={spec!r}: expected e.g. '80;90' or '90a'")
    flags = []
    for i, a in enumerate(archs):
        code = f"sm_{a}" if i < len(archs) - 1 else f"[sm_{a},compute_{a}]"
        flags += ["-gencode", f"arch=compute_{a},code={code}"]
    return archs, flags


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def _demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        lines = out.stdout.splitlines()
        return lines if len(lines) == len(names) else list(names)
    except (OSError, subprocess.CalledProcessError):
        return list(names)


def parse_ptxas_resources(log, source):
    """Kernels of one `nvcc -Xptxas -v` log: [{kernel, mangled, arch, registers, stack, spill_*, smem}]."""
    kernels, cur = [], None
    for line in log.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            cur = {"source": source, "mangled": m.group(1), "arch": m.group(2)}
            kernels.append(cur)
            continue
        if cur is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _PTXAS_USED.search(line)
        if m:
            cur.update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    kernels = [k for k in kernels if "registers" in k and "stack" in k]
    for k, name in zip(kernels, _demangle([k["mangled"] for k in kernels])):
        name = name.replace("(anonymous namespace)::", "")
        k["kernel"] = re.sub(r"^void ", "", re.sub(r"\(.*", "", name))
    return kernels


class BuildExt(build_ext):
    """build_ext that compiles csrc/cuda/*.cu with nvcc and links them as extra objects."""

    def _compiler_accepts(self, flag):
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "t.cpp")
            with open(src, "w") as f:
                f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
            try:
                objs = self.compiler.compile([src], output_dir=tmp, extra_postargs=[flag])
                self.compiler.link_executable(objs, os.path.join(tmp, "t"), extra_postargs=[flag])
                return True
            except Exception:
                return False

    def _compile_cu(self, nvcc, sources, gencode, defines, include_dirs):
        out_dir = os.path.join(self.build_temp, "cuda_objs")
        os.makedirs(out_dir, exist_ok=True)
        base = [nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", *gencode]
        base += [f"-I{d}" for d in include_dirs]
        base += [f"-D{k}={v}" for k, v in defines]
        if os.environ.get("CUDAHOSTCXX"):
            base += ["-ccbin", os.environ["CUDAHOSTCXX"]]

        def one(src):
            obj = os.path.join(out_dir, os.path.basename(src).replace(".cu", ".o"))
            cmd = base + ["-Xptxas", "-v", "-c", src, "-o", obj]   # -v: resource usage, recorded below
            _log(" ".join(cmd))
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout + proc.stderr)
                raise CompileError(f"nvcc failed on {src} (exit {proc.returncode}); see the output above")
            other = "".join(l for l in proc.stderr.splitlines(True)
                            if not l.startswith("ptxas info") and not l.startswith("    "))
            if other.strip():
                sys.stderr.write(other)
            return obj, parse_ptxas_resources(proc.stderr, os.path.basename(src))

        with ThreadPoolExecutor(max_workers=min(_max_jobs(), len(sources))) as pool:
            done = list(pool.map(one, sources))
        return [o for o, _ in done], [k for _, ks in done for k in ks]

    def _resources_paths(self, ext):
        """(where the build writes _C_resources.json, its in-place twin next to the sources)."""
        build_py = self.get_finalized_command("build_py")
        inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
        return (os.path.join(os.path.dirname(regular_file), "_C_resources.json"),
                os.path.join(os.path.dirname(inplace_file), "_C_resources.json"))

    def copy_extensions_to_source(self):  # in-place / editable builds: the record goes with the module
        super().copy_extensions_to_source()
        for ext in self.extensions:
            regular, inplace = self._resources_paths(ext)
            if os.path.exists(regular):
                self.copy_file(regular, inplace, level=self.verbose)
            elif os.path.exists(inplace):
                os.remove(inplace)  # a record of an earlier CUDA build would describe kernels no longer built

    def _get_output_mapping(self):
        yield from super()._get_output_mapping()
        if self.inplace:
            for ext in self.extensions:
                regular, inplace = self._resources_paths(ext)
                if os.path.exists(regular):
                    yield regular, inplace

    def _write_resources(self, ext, kernels, archs):
        """mdlm_kernels/_C_resources.json next to the built module: the CUDA kernels' registers, spills and
        shared memory per arch, as ptxas reported them (read by mdlm_kernels.compile_check)."""
        path = self._resources_paths(ext)[0] if self.inplace else os.path.join(
            os.path.dirname(self.get_ext_fullpath(ext.name)), "_C_resources.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"archs": archs, "kernels": kernels}, f, indent=1)
        _log(f"CUDA resource usage of {len(kernels)} kernel images written to {path}")

    def build_extension(self, ext):
        # C++ flags, OpenMP if the compiler takes it.
        # -ffp-contract=off: no a*b+c -> fma contraction, so the CPU twins round every float operation
        # exactly like the device code (which uses __dmul_rn & co.); see csrc/include/mdlm/masking.h
        cxx_flags = ["-O3", "-std=c++17", "-ffp-contract=off"]
        link_flags = []
        if self._compiler_accepts("-fopenmp"):
            cxx_flags.append("-fopenmp")
            link_flags.append("-fopenmp")
        else:
            _log("WARNING: compiler does not accept -fopenmp; CPU kernels will run single-threaded")
        ext.extra_compile_args = list(ext.extra_compile_args or []) + cxx_flags
        ext.extra_link_args = list(ext.extra_link_args or []) + link_flags

        import pybind11

        ext.include_dirs = list(ext.include_dirs or []) + [pybind11.get_include()]

        cu_sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        cuda_home = find_cuda_home()
        if cuda_home and cu_sources:
            archs, gencode = parse_archs(os.environ.get("MDLM_CUDA_ARCHS", DEFAULT_ARCHS) or DEFAULT_ARCHS)
            arch_str = ";".join(archs)
            _log(f"CUDA: nvcc from {cuda_home}, archs {arch_str}")
            defines = [("MDLM_WITH_CUDA", "1"), ("MDLM_CUDA_ARCHS", f'"{arch_str}"')]
            nvcc = os.path.join(cuda_home, "bin", "nvcc")
            objs, kernels = self._compile_cu(nvcc, cu_sources, gencode, [("MDLM_WITH_CUDA", "1")], ext.include_dirs)
            self._write_resources(ext, kernels, archs)
            ext.extra_objects = list(ext.extra_objects or []) + objs
            libdirs = [d for d in (os.path.join(cuda_home, "lib64"),
                                   os.path.join(cuda_home, "targets", "x86_64-linux", "lib"),
                                   os.path.join(cuda_home, "targets", "sbsa-linux", "lib"))
                       if os.path.isdir(d)]
            ext.library_dirs = list(ext.library_dirs or []) + libdirs
            ext.libraries = list(ext.libraries or []) + ["cudart_static", "dl", "rt", "pthread"]
        else:
            if os.environ.get("MDLM_SKIP_CUDA", "0") not in ("", "0"):
                _log("MDLM_SKIP_CUDA is set: building the C++-only extension (no CUDA kernels)")
            else:
                _log("WARNING: nvcc not found (CUDA_HOME / CUDA_PATH / PATH / /usr/local/cuda): building the "
                     "C++-only extension; CUDA kernels will be unavailable (MDLM_WITH_CUDA=0)")
            defines = [("MDLM_WITH_CUDA", "0"), ("MDLM_CUDA_ARCHS", '""')]
        ext.define_macros = list(ext.define_macros or []) + defines
        self._parallel_cxx_compile()
        super().build_extension(ext)

    def _parallel_cxx_compile(self):
        """Let the C++ compiler build the sources of one extension in parallel (MAX_JOBS)."""
        jobs = _max_jobs()
        compiler = self.compiler
        if jobs <= 1 or getattr(compiler, "_mdlm_parallel", False):
            return
        orig = compiler.compile

        def compile(sources, output_dir=None, macros=None, include_dirs=None, debug=0, extra_preargs=None,
                    extra_postargs=None, depends=None):
            if len(sources) <= 1:
                return orig(sources, output_dir, macros, include_dirs, debug, extra_preargs, extra_postargs, depends)
            with ThreadPoolExecutor(max_workers=min(jobs, len(sources))) as pool:
                parts = pool.map(lambda s: orig([s], output_dir, macros, include_dirs, debug, extra_preargs,
                                                extra_postargs, depends), sources)
                return [o for part in parts for o in part]

        compiler.compile = compile
        compiler._mdlm_parallel = True


ext_modules = [
    Extension(
        "mdlm_kernels._C",
        sources=[os.path.join(CSRC, "bindings.cpp")] + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp"))),
        include_dirs=[INCLUDE],
        # listed so that sdists ship them and edits trigger rebuilds
        depends=sorted(glob.glob(os.path.join(INCLUDE, "mdlm", "*.h")) + glob.glob(os.path.join(CSRC, "cuda", "*.cu"))),
        language="c++",
    )
]

setup(
    packages=find_packages(include=["mdlm", "mdlm.*", "mdlm_kernels", "mdlm_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
