"""NVIDIA GPUs through NVML (nvidia-ml-py): memory, utilisation, temperature, per-process use.

Without a driver or NVML every call answers "nothing", and ``error`` says why in words.
Devices carry their UUID, which matches them to CUDA device numbers (NVML's order can differ).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.sliced_plan import GPU, gpu_for


@dataclass
class GpuInfo:
    index: int
    uuid: str
    name: str
    total: int
    used: int
    free: int
    util: int | None  # percent
    temp: int | None  # degrees C
    engine_bytes: int | None = None  # memory used by the engine process
    capability: tuple[int, int] | None = None  # CUDA compute capability (major, minor)
    cuda_cores: int | None = None
    free_known: bool = True  # False: NVML cannot be read, and free is the total (from_engine)

    @property
    def plan_gpu(self) -> GPU | None:
        """The GPU the engine will plan its fast decode layout for (engine/sliced_plan.py);
        None where NVML told too little (the fit check then plans as for an H100)."""
        return gpu_for(self.capability, self.cuda_cores)


class Gpus:
    def __init__(self) -> None:
        self.error: str | None = None
        self.reason: str | None = None  # why NVML cannot be read, in its own words
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.driver = _text(pynvml.nvmlSystemGetDriverVersion())
        except Exception as e:  # no library, no driver, no permission
            self.nvml = None
            self.driver = ""
            self.reason = str(e)
            self.error = f"No NVIDIA GPU driver found ({e}); the engine runs on the CPU."

    @property
    def available(self) -> bool:
        return self.nvml is not None

    def read(self, engine_pid: int | None = None) -> list[GpuInfo]:
        if self.nvml is None:
            return []
        n = self.nvml
        out = []
        try:
            for i in range(n.nvmlDeviceGetCount()):
                h = n.nvmlDeviceGetHandleByIndex(i)
                mem = n.nvmlDeviceGetMemoryInfo(h)
                out.append(
                    GpuInfo(
                        i,
                        _text(n.nvmlDeviceGetUUID(h)),
                        _text(n.nvmlDeviceGetName(h)),
                        mem.total,
                        mem.used,
                        mem.free,
                        _try(lambda h=h: n.nvmlDeviceGetUtilizationRates(h).gpu),
                        _try(lambda h=h: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),
                        _process_bytes(n, h, engine_pid),
                        _capability(n, h),
                        _try(lambda h=h: n.nvmlDeviceGetNumGpuCores(h)),
                    )
                )
        except Exception as e:
            self.error = f"Reading the GPUs failed ({e})."
        return out

    def processes(self, index: int) -> list[tuple[int, str, int]]:
        """Processes holding memory on GPU ``index``, biggest first: (pid, name, bytes)."""
        if self.nvml is None:
            return []
        n = self.nvml
        try:
            h = n.nvmlDeviceGetHandleByIndex(index)
            procs = [
                *n.nvmlDeviceGetComputeRunningProcesses(h),
                *n.nvmlDeviceGetGraphicsRunningProcesses(h),
            ]
        except Exception:
            return []
        seen: dict[int, int] = {}
        for p in procs:
            seen[p.pid] = max(seen.get(p.pid, 0), int(p.usedGpuMemory or 0))
        out = [(pid, _process_name(pid), b) for pid, b in seen.items()]
        return sorted(out, key=lambda t: -t[2])


def from_engine(cuda_devices: list[dict]) -> list[GpuInfo]:
    """The engine's GPUs as its hello lists them, for where NVML cannot be read but CUDA works
    (a container without the driver's NVML library): their free memory unknown, taken as their
    total (``free_known`` False, which the fit check says), numbered as the engine numbers
    them. Devices without a size are left out."""
    out = []
    for d in cuda_devices:
        total = int(d.get("total_bytes") or 0)
        if total > 0:
            name, uuid = str(d.get("name") or "a GPU"), str(d.get("uuid", ""))
            out.append(GpuInfo(int(d["index"]), uuid, name, total, 0, total, None, None,
                               free_known=False))  # fmt: skip
    return out


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "process"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _capability(n, handle) -> tuple[int, int] | None:
    try:
        major, minor = n.nvmlDeviceGetCudaComputeCapability(handle)
        return int(major), int(minor)
    except Exception:  # an older driver or library
        return None


def _try(fn):
    try:
        return int(fn())
    except Exception:
        return None


def _process_bytes(n, handle, pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for p in n.nvmlDeviceGetComputeRunningProcesses(handle):
            if p.pid == pid:
                return int(p.usedGpuMemory or 0)
        return 0
    except Exception:
        return None


def same_device(nvml_uuid: str, cuda_uuid: str) -> bool:
    """NVML says 'GPU-<uuid>', torch says '<uuid>'."""
    return nvml_uuid.removeprefix("GPU-").lower() == cuda_uuid.removeprefix("GPU-").lower()


def device_index(device: str) -> int | None:
    """The engine's CUDA number a load device names: auto and cuda are its first GPU, cuda:N
    the N-th; None for the CPU."""
    if device == "cpu":
        return None
    return int(device.partition(":")[2] or 0)


def cuda_index(nvml_uuid: str, cuda_devices: list[dict]) -> int | None:
    """The engine's CUDA number of an NVML device (the two orders can differ); None where the
    engine does not see it (CUDA_VISIBLE_DEVICES, or no CUDA). cuda_devices: the engine's hello."""
    return next(
        (d["index"] for d in cuda_devices if same_device(nvml_uuid, str(d.get("uuid", "")))),
        None,
    )
