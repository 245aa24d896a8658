"""Where nmt computes, and in which precision: the device, and bf16 or fp32 from what it can do.

bf16 matrix products are fast only where the hardware has them: a CPU with AVX-512 BF16 or AMX,
a GPU with bf16 units. Elsewhere torch emulates bf16 and the same product runs about 100 times
slower than in fp32 (measured on an AVX2 CPU), so `precision: auto` picks bf16 only where it is
native. `choose_precision` is the decision, a pure function of the capabilities; `resolve_precision`
asks the hardware and says what it chose, once.
"""

from __future__ import annotations

import contextlib
import platform
import sys
from dataclasses import asdict, dataclass

import torch

from nmt.config import PRECISIONS
from nmt.errors import NmtError


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when there is one, else the CPU. Training takes `train.device`; decoding
    (`nmt translate`, `evaluate`, `compare`) takes `--device`, by default `auto` too."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NmtError(f"device '{name}' requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise NmtError(f"unknown device '{name}'") from None


@dataclass(frozen=True)
class Capabilities:
    """What a device computes natively, as torch reports it."""

    device_type: str  # cpu | cuda | ...
    name: str  # CPU model name or GPU name
    cpu_capability: str  # torch's CPU kernel level: DEFAULT, AVX2, AVX512, ...
    avx512_bf16: bool = False
    amx: bool = False
    cuda_bf16: bool = False  # a GPU with native bf16 (Ampere and later)

    @property
    def native_bf16(self) -> bool:
        if self.device_type == "cpu":
            return self.avx512_bf16 or self.amx
        return self.device_type == "cuda" and self.cuda_bf16


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16: what the matrix products run in
    requested: str  # auto | fp32 | bf16: what the recipe or the command line said
    reason: str  # one clause, for the log and the records
    emulated: bool = False  # bf16 on hardware that emulates it (runs, slowly)

    def record(self) -> dict:
        return asdict(self)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def capabilities(device: torch.device) -> Capabilities:
    level = torch.backends.cpu.get_cpu_capability()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.3 has no including_emulation
            native = torch.cuda.is_bf16_supported()
        return Capabilities("cuda", torch.cuda.get_device_name(index), level, cuda_bf16=native)
    cpu = getattr(torch, "cpu", None)
    avx512_bf16 = bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
    amx = bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    return Capabilities(device.type, cpu_name(), level, avx512_bf16=avx512_bf16, amx=amx)


def _describe(caps: Capabilities) -> str:
    if caps.device_type == "cpu":
        features = [f for f, on in (("AVX-512 BF16", caps.avx512_bf16), ("AMX", caps.amx)) if on]
        return f"this CPU ({caps.cpu_capability}{', ' + ', '.join(features) if features else ''})"
    return f"this {caps.device_type} device ({caps.name})"


def choose_precision(requested: str, caps: Capabilities) -> Precision:
    """bf16 where the device computes it natively, fp32 everywhere else; an explicit choice is
    kept, and marked emulated when it is bf16 on hardware without bf16 units."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}")
    where = _describe(caps)
    if requested == "auto":
        if caps.native_bf16:
            return Precision("bf16", requested, f"auto: {where} computes bf16 natively")
        return Precision("fp32", requested, f"auto: {where} has no native bf16")
    if requested == "bf16" and not caps.native_bf16:
        return Precision("bf16", requested, f"asked for; {where} emulates bf16", emulated=True)
    return Precision(requested, requested, "asked for")


def resolve_precision(requested: str, device: torch.device, key: str, log=None) -> Precision:
    """Decide and say so: one line naming the precision and why (through `log`, default stderr),
    and for emulated bf16 one warning line with the cost and the key to change."""
    precision = choose_precision(requested, capabilities(device))
    say = log or (lambda text: print(f"nmt: {text}", file=sys.stderr))
    say(f"precision {precision.name} ({precision.reason})")
    if precision.emulated:
        say(f"warning: {key} is bf16, which this hardware emulates: matrix products run about "
            f"100x slower than in fp32; set {key} to auto or fp32")
    return precision


def machine() -> dict:
    """The machine a figure was measured on: CPU, torch's kernel level, bf16 units, threads."""
    caps = capabilities(torch.device("cpu"))
    return {"cpu": caps.name, "cpu_capability": caps.cpu_capability, "avx512_bf16": caps.avx512_bf16,
            "amx": caps.amx, "native_bf16": caps.native_bf16, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "machine": platform.machine(),
            "class": "bf16-native" if caps.native_bf16 else "fp32-only"}


def machine_label(record: dict, precision: str) -> str:
    """One line for a machine() record and the precision that ran on it, e.g. "fp32-only class,
    AMD EPYC (AVX2), fp32, 2 threads": what a time-budgeted result depends on."""
    threads = record.get("threads")
    return (f"{record.get('class', '?')} class, {record.get('cpu', '?')} ({record.get('cpu_capability', '?')}), "
            f"{precision}, {threads} thread{'s' if threads != 1 else ''}")


def autocast(device: torch.device | str, precision: str):
    """bf16: matrix products run in bfloat16 (AVX-512 BF16 on CPU, tensor cores on GPU) while the
    parameters, the recurrent state and the loss stay in fp32. `precision` is a resolved one
    (Precision.name), never `auto`."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"autocast takes fp32 or bf16, got {precision!r}")
    return contextlib.nullcontext()


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes matrix products in right now on this device, or None."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None
