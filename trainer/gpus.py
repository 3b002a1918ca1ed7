"""What TensorFlow needs to start on a GPU, and what it finds: each CUDA library it loads, opened the way
TensorFlow opens it, and its version against the one TensorFlow was built for. Shared by `python -m trainer gpus`
(`make gpu-check`) and by --expect-gpus, which names the cause when GPUs are missing.

TensorFlow 2.21 opens its CUDA libraries by name, from libtensorflow_framework.so.2 (its DsoLoader), so the
loader searches LD_LIBRARY_PATH and that library's RUNPATH, which names the folders of NVIDIA's wheels
(tensorflow[and-cuda]) but cuSOLVER's. The libraries those load in turn (nvJitLink, NVRTC, cuDNN's parts) are
found through their own RUNPATHs. Here each library TensorFlow loads itself is opened by TensorFlow's own
DsoLoader, called in the running process: found exactly where TensorFlow would find it, or not at all."""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.metadata
import os
from typing import Callable

import tensorflow as tf
from packaging.requirements import Requirement

DRIVER = "libcuda.so.1"
# Where GKE's device plugin mounts the node's driver (the image puts it on LD_LIBRARY_PATH).
GKE_DRIVER_DIR = "/usr/local/nvidia/lib64"
_FRAMEWORK = "libtensorflow_framework.so.2"
# TensorFlow 2.21's exports: tsl::internal::DsoLoader::Get<Name>DsoHandle() -> absl::StatusOr<void*>, and
# absl::Status::ToStringSlow(rep, mode) -> std::string (absl's inline namespace is the one TensorFlow 2.21 ships).
_DSO_GETTER = "_ZN3tsl8internal9DsoLoader{length}Get{name}DsoHandleEv"
_STATUS_TO_STRING = "_ZN4absl12lts_202508146Status12ToStringSlowB5cxx11EmNS0_18StatusToStringModeE"
_STATUS_OK = 1  # absl's inlined representation of an OK status
_RTLD_DI_LINKMAP, _RTLD_DI_SERINFO, _RTLD_DI_SERINFOSIZE = 2, 4, 5
_CUDNN_PARTS = ("Graph", "Ops", "Cnn", "Adv")  # cuDNN 9 opens these parts itself: cudnn<Part>VersionCheck


@dataclasses.dataclass(frozen=True)
class Library:
    """One CUDA library TensorFlow needs on a GPU, and how it is reached."""

    name: str
    soname: str
    wheel: str  # the NVIDIA wheel of tensorflow[and-cuda] that ships it
    loader: str | None = None  # TensorFlow's DsoLoader getter that opens it, if TensorFlow opens it itself
    via: str | None = None  # else the library whose dependencies (RUNPATH) reach it
    version: Callable[[ctypes.CDLL], tuple[int, ...]] | None = None  # None: the wheel's own version


@dataclasses.dataclass(frozen=True)
class Found:
    """What the check found for one library (or the driver)."""

    library: str
    soname: str
    ok: bool
    detail: str  # the version and path, or why it failed
    path: str = ""
    version: str = ""  # as the library (or the driver) reports it


def _int_out(function: str) -> Callable[[ctypes.CDLL], tuple[int, ...]]:
    def read(lib: ctypes.CDLL) -> tuple[int, ...]:
        value = ctypes.c_int()
        _call(getattr(lib, function), ctypes.byref(value))
        return (value.value,)
    return read


def _properties(function: str) -> Callable[[ctypes.CDLL], tuple[int, ...]]:
    """XGetProperty(libraryPropertyType, int*): major, minor, patch."""
    def read(lib: ctypes.CDLL) -> tuple[int, ...]:
        parts = []
        for kind in range(3):
            value = ctypes.c_int()
            _call(getattr(lib, function), kind, ctypes.byref(value))
            parts.append(value.value)
        return tuple(parts)
    return read


def _two_out(function: str, kind: type = ctypes.c_int) -> Callable[[ctypes.CDLL], tuple[int, ...]]:
    def read(lib: ctypes.CDLL) -> tuple[int, ...]:
        major, minor = kind(), kind()
        _call(getattr(lib, function), ctypes.byref(major), ctypes.byref(minor))
        return major.value, minor.value
    return read


def _packed(function: str, returned: bool = True) -> Callable[[ctypes.CDLL], tuple[int, ...]]:
    """A version packed as major * 10000 + minor * 100 + patch (cuDNN 9, cuBLASLt, NCCL 2.9+)."""
    def read(lib: ctypes.CDLL) -> tuple[int, ...]:
        if returned:
            getattr(lib, function).restype = ctypes.c_size_t
            value = getattr(lib, function)()
        else:
            value = _int_out(function)(lib)[0]
        return value // 10000, value // 100 % 100, value % 100
    return read


def _cudart(lib: ctypes.CDLL) -> tuple[int, ...]:
    value = _int_out("cudaRuntimeGetVersion")(lib)[0]  # 1000 * major + 10 * minor
    return value // 1000, value % 1000 // 10


LIBRARIES = (
    Library("cudart", "libcudart.so.12", "nvidia-cuda-runtime-cu12", "CudaRuntime", version=_cudart),
    Library("cublas", "libcublas.so.12", "nvidia-cublas-cu12", "Cublas", version=_properties("cublasGetProperty")),
    Library("cublasLt", "libcublasLt.so.12", "nvidia-cublas-cu12", "CublasLt",
            version=_packed("cublasLtGetVersion")),
    Library("cufft", "libcufft.so.11", "nvidia-cufft-cu12", "Cufft", version=_properties("cufftGetProperty")),
    Library("cusolver", "libcusolver.so.11", "nvidia-cusolver-cu12", "Cusolver",
            version=_properties("cusolverGetProperty")),
    Library("cusparse", "libcusparse.so.12", "nvidia-cusparse-cu12", "Cusparse",
            version=_properties("cusparseGetProperty")),
    Library("cupti", "libcupti.so.12", "nvidia-cuda-cupti-cu12", "Cupti"),
    Library("cudnn", "libcudnn.so.9", "nvidia-cudnn-cu12", "Cudnn", version=_packed("cudnnGetVersion")),
    Library("nccl", "libnccl.so.2", "nvidia-nccl-cu12", "Nccl", version=_packed("ncclGetVersion", returned=False)),
    Library("nvJitLink", "libnvJitLink.so.12", "nvidia-nvjitlink-cu12", via="libcusparse.so.12",
            version=_two_out("nvJitLinkVersion", ctypes.c_uint)),
    Library("nvrtc", "libnvrtc.so.12", "nvidia-cuda-nvrtc-cu12", via="libcudnn_graph.so.9",
            version=_two_out("nvrtcVersion")),
    # Shipped by tensorflow[and-cuda], but TensorFlow 2.21 has no cuRAND loader: checked where its wheel puts it.
    Library("curand", "libcurand.so.10", "nvidia-curand-cu12", version=_properties("curandGetProperty")),
)


class _CallFailed(Exception):
    pass


def _call(function, *args) -> None:
    status = function(*args)
    if status:
        raise _CallFailed(f"{function.__name__} returned {status}")


def _framework() -> ctypes.CDLL:
    return ctypes.CDLL(os.path.join(os.path.dirname(tf.__file__), _FRAMEWORK))


def _status_text(framework: ctypes.CDLL, rep: int) -> str:
    to_string = getattr(framework, _STATUS_TO_STRING)
    to_string.argtypes, to_string.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], None
    text = ctypes.create_string_buffer(32)  # a std::string: data pointer, size, inline buffer
    to_string(text, rep, 0)
    data, size = ctypes.c_void_p.from_buffer(text, 0).value, ctypes.c_size_t.from_buffer(text, 8).value
    return ctypes.string_at(data, size).decode(errors="replace")


def _tensorflow_opens(framework: ctypes.CDLL, getter: str) -> tuple[int | None, str]:
    """Open a library with TensorFlow's own DsoLoader: (handle, "") or (None, TensorFlow's error)."""
    name = f"Get{getter}DsoHandle"
    function = getattr(framework, _DSO_GETTER.format(length=len(name), name=getter))
    function.argtypes, function.restype = [ctypes.c_void_p], None
    result = ctypes.create_string_buffer(16)  # absl::StatusOr<void*>: the status, then the pointer
    function(result)
    rep, handle = ctypes.c_size_t.from_buffer(result, 0).value, ctypes.c_void_p.from_buffer(result, 8).value
    if rep == _STATUS_OK and handle:
        return handle, ""
    message = _status_text(framework, rep)
    return None, message.split("; dlerror: ")[-1].split(";")[0].strip() or message


def _handle_path(handle: int) -> str:
    """The file a dlopen handle was loaded from (its link map's name)."""
    libc = ctypes.CDLL(None)
    link_map = ctypes.c_void_p()
    libc.dlinfo(ctypes.c_void_p(handle), _RTLD_DI_LINKMAP, ctypes.byref(link_map))
    return os.path.normpath(ctypes.string_at(ctypes.c_char_p.from_address(link_map.value + 8).value or b"").decode())


def _loaded_path(soname: str) -> str:
    """Where this process loaded `soname` from, or ''."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split(maxsplit=5)[-1].strip()
            if os.path.basename(path) == soname:
                return path
    return ""


def _search_path(path: str) -> list[str]:
    """The folders glibc searches for a library that the library at `path` opens or needs (LD_LIBRARY_PATH, its
    RUNPATH with $ORIGIN expanded, the system folders), as glibc itself reports them."""
    handle = ctypes.c_void_p(ctypes.CDLL(path)._handle)
    libc = ctypes.CDLL(None)
    sizes = (ctypes.c_size_t * 2)()
    libc.dlinfo(handle, _RTLD_DI_SERINFOSIZE, sizes)
    buffer = ctypes.create_string_buffer(sizes[0])
    ctypes.memmove(buffer, sizes, ctypes.sizeof(sizes))
    libc.dlinfo(handle, _RTLD_DI_SERINFO, buffer)
    count = ctypes.c_uint.from_buffer(buffer, 8).value
    return [ctypes.string_at(ctypes.c_void_p.from_buffer(buffer, 16 + 16 * i).value).decode() for i in range(count)]


def _build_needs() -> dict[str, tuple[int, ...]]:
    """The CUDA and cuDNN versions TensorFlow was built for (major, minor)."""
    info = tf.sysconfig.get_build_info()
    return {name: tuple(int(part) for part in str(info.get(f"{name}_version", "0")).split(".")[:2])
            for name in ("cuda", "cudnn")}


def _extra_requirements() -> dict[str, Requirement]:
    """What tensorflow[and-cuda] asks of each NVIDIA wheel, from TensorFlow's own metadata."""
    requirements = [Requirement(text) for text in importlib.metadata.requires("tensorflow") or ()]
    return {r.name: r for r in requirements if r.marker and "and-cuda" in str(r.marker)}


def version_meets(version: tuple[int, ...], requirement: Requirement) -> bool:
    """True if a library's own version (as many parts as it reports) meets each bound of its wheel's requirement,
    the bound cut to that many parts (cuBLAS 12.9.3 meets >=12.5.3.2)."""
    for spec in requirement.specifier:
        bound = tuple(int(part) for part in spec.version.split(".")[: len(version)])
        bound += (0,) * (len(version) - len(bound))
        ok = {">=": version >= bound, ">": version > bound, "<": version < bound, "<=": version <= bound,
              "==": version == bound, "!=": version != bound}.get(spec.operator, True)
        if not ok:
            return False
    return True


def _version_problem(library: Library, version: tuple[int, ...], requirements: dict[str, Requirement],
                     built: dict[str, tuple[int, ...]]) -> str:
    """Why `version` does not fit this TensorFlow, or ''."""
    shown = ".".join(map(str, version))
    requirement = requirements.get(library.wheel)
    if requirement is not None and not version_meets(version, requirement):
        return f"is {shown}; TensorFlow {tf.__version__} needs {requirement.specifier} ({library.wheel})"
    need = {"cudart": built["cuda"], "cudnn": built["cudnn"]}.get(library.name)
    if need and (version[0] != need[0] or version[: len(need)] < need):
        return f"is {shown}; TensorFlow {tf.__version__} was built for {'.'.join(map(str, need))}"
    return ""


def _check(library: Library, framework: ctypes.CDLL, requirements: dict[str, Requirement],
           built: dict[str, tuple[int, ...]]) -> Found:
    if library.loader:
        handle, error = _tensorflow_opens(framework, library.loader)
        if handle is None:
            if error.endswith("No such file or directory"):
                error = f"LD_LIBRARY_PATH, then the RUNPATH of {_FRAMEWORK}, then the system's folders"
            return Found(library.name, library.soname, False, f"not found where TensorFlow looks ({error})")
        path, how = _handle_path(handle), "opened by TensorFlow"
    else:
        if library.via:
            parent = _loaded_path(library.via)
            if not parent:
                return Found(library.name, library.soname, False, f"not checked: {library.via} did not load")
            folders, how = _search_path(parent), f"needed by {library.via}"
        else:
            folders = [os.path.join(os.path.dirname(os.path.dirname(tf.__file__)), "nvidia", library.name, "lib")]
            how = "from its wheel; TensorFlow 2.21 does not load it"
        path = next((os.path.normpath(os.path.join(d, library.soname)) for d in folders
                     if os.path.exists(os.path.join(d, library.soname))), "")
        if not path:
            return Found(library.name, library.soname, False, f"not found ({how}) in {':'.join(folders)}")
    try:
        lib = ctypes.CDLL(path)
        if library.version:
            version = library.version(lib)
        else:
            version = tuple(int(p) for p in importlib.metadata.version(library.wheel).split(".")[:3])
    except (OSError, AttributeError, _CallFailed, importlib.metadata.PackageNotFoundError) as error:
        return Found(library.name, library.soname, False, f"does not load from {path}: {error}", path)
    problem = _version_problem(library, version, requirements, built)
    if problem:
        return Found(library.name, library.soname, False, f"{problem}: {path}", path)
    return Found(library.name, library.soname, True, f"{'.'.join(map(str, version))}  {path}  ({how})", path)


def _check_cudnn_parts() -> Found:
    """cuDNN 9 opens its parts (graph, ops, cnn, adv) itself, from its own folder."""
    path = _loaded_path("libcudnn.so.9")
    if not path:
        return Found("cudnn parts", "libcudnn_*.so.9", False, "not checked: libcudnn.so.9 did not load")
    cudnn = ctypes.CDLL(path)
    failed = [part.lower() for part in _CUDNN_PARTS if getattr(cudnn, f"cudnn{part}VersionCheck")() != 0]
    if failed:
        return Found("cudnn parts", "libcudnn_*.so.9", False, f"cuDNN could not open its part(s) {', '.join(failed)} "
                     f"beside {path}")
    return Found("cudnn parts", "libcudnn_*.so.9", True,
                 f"{', '.join(p.lower() for p in _CUDNN_PARTS)} opened by cuDNN  {os.path.dirname(path)}")


def _check_driver(framework: ctypes.CDLL) -> Found:
    """The node's NVIDIA driver, as TensorFlow opens it: its CUDA version and how many GPUs it shows."""
    handle, error = _tensorflow_opens(framework, "CudaDriver")
    if handle is None:
        return Found("driver", DRIVER, False, f"not found ({error}): the driver comes from the node, not the image")
    path = _handle_path(handle)
    driver = ctypes.CDLL(path)
    version = ctypes.c_int()
    driver.cuDriverGetVersion(ctypes.byref(version))
    shown = f"CUDA {version.value // 1000}.{version.value % 1000 // 10}"
    status = driver.cuInit(0)
    count = ctypes.c_int()
    if status == 0:
        driver.cuDeviceGetCount(ctypes.byref(count))
    if status or not count.value:
        return Found("driver", DRIVER, False, f"{shown}, but it shows no GPU to this container (cuInit {status})",
                     path, shown)
    return Found("driver", DRIVER, True, f"{shown}, {count.value} GPU(s)  {path}", path, shown)


def check() -> list[Found]:
    """Every CUDA library TensorFlow needs on a GPU, then the driver."""
    framework = _framework()
    requirements, built = _extra_requirements(), _build_needs()
    found = []
    for library in LIBRARIES:
        found.append(_check(library, framework, requirements, built))
        if library.name == "cudnn":
            found.append(_check_cudnn_parts())
    return found + [_check_driver(framework)]


def _hidden_by_environment() -> str:
    """How this process's environment hides GPUs from TensorFlow, or ''."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU from TensorFlow"
    nvidia = os.environ.get("NVIDIA_VISIBLE_DEVICES")
    if nvidia is not None and nvidia.strip() in ("", "void", "none"):
        return f"NVIDIA_VISIBLE_DEVICES={nvidia!r}: the container runtime gave this container no GPU"
    return ""


def missing_cause(expected: int) -> str:
    """Why TensorFlow sees fewer than `expected` GPUs: an environment that hides them, no driver, libraries of the
    image missing or of the wrong version, or a driver that shows too few GPUs."""
    hidden = _hidden_by_environment()
    if hidden:
        return hidden
    results = check()
    driver, libraries = results[-1], results[:-1]
    causes = []
    if not driver.path:
        causes.append(f"no NVIDIA driver: {DRIVER} not found (the node's driver is mounted into the container by "
                      f"NVIDIA's device plugin or container toolkit; GKE mounts it at {GKE_DRIVER_DIR})")
    absent = [r.soname for r in libraries if not r.ok and not r.path]
    if absent:
        causes.append(f"{', '.join(absent)} not found where TensorFlow looks"
                      + (" (an image without the CUDA libraries: use the gpu flavour)"
                         if len(absent) == len(libraries) else ""))
    causes += [f"{r.soname} {r.detail}" for r in libraries if not r.ok and r.path]
    if causes:
        return "; ".join(causes)
    if not driver.ok:
        return f"the driver ({driver.version}) is found, but the pod's GPUs are hidden from this container"
    return (f"the driver ({driver.version}) and every CUDA library load, so {expected} GPU(s) were expected of a driver that "
            "shows fewer (--verbose shows TensorFlow's own reasons)")


def report(results: list[Found]) -> tuple[list[str], bool]:
    """The lines `python -m trainer gpus` prints, and whether every library but the driver is usable."""
    built = tf.sysconfig.get_build_info()
    lines = [f"TensorFlow {tf.__version__}, built for CUDA {built.get('cuda_version', '?')} and cuDNN "
             f"{built.get('cudnn_version', '?')}"]
    width = max(len(r.library) for r in results)
    for r in results:
        lines.append(f"{'ok' if r.ok else 'MISSING' if not r.path else 'BAD':7} {r.library:{width}}  "
                     f"{r.soname:18}  {r.detail}")
    libraries_ok = all(r.ok for r in results[:-1])
    driver = results[-1]
    if driver.ok:
        lines.append("every CUDA library TensorFlow loads on a GPU is usable, and so is the driver")
    elif libraries_ok:
        lines.append(f"every CUDA library TensorFlow loads on a GPU is usable; the driver ({DRIVER}) is the one "
                     "thing missing, as expected without an NVIDIA GPU: the node provides it")
    else:
        broken = [r.soname for r in results[:-1] if not r.ok]
        lines.append(f"not usable, so TensorFlow would not start on a GPU: {', '.join(broken)}")
    return lines, libraries_ok
