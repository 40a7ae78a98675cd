"""What this machine's torch and bitsandbytes can run on: the CUDA architectures torch was
built for (`torch.cuda.get_arch_list()`) against the GPUs it sees. `finetune doctor` prints
it; a training job refuses to start on a GPU its torch has no kernels for, with that reason
(rather than CUDA's "no kernel image is available" halfway through loading)."""

from __future__ import annotations

import torch


def _covered(capability: tuple[int, int], archs: list[str]) -> bool:
    """Machine code for this GPU (`sm_XY`), or PTX for it or an older one (`compute_XY`), which
    the driver compiles at start."""
    number = capability[0] * 10 + capability[1]
    for arch in archs:
        kind, _, version = arch.partition("_")
        digits = "".join(ch for ch in version if ch.isdigit())
        if not digits:
            continue
        if (kind == "sm" and int(digits) == number) or (kind == "compute" and int(digits) <= number):
            return True
    return False


def unsupported_gpus() -> list[str]:
    """One line per visible GPU this torch build cannot run on."""
    if not torch.cuda.is_available():
        return []
    archs = torch.cuda.get_arch_list()
    problems = []
    for index in range(torch.cuda.device_count()):
        capability = torch.cuda.get_device_capability(index)
        if not _covered(capability, archs):
            name, sm = torch.cuda.get_device_name(index), f"sm_{capability[0]}{capability[1]}"
            problems.append(
                f"GPU {index} ({name}, {sm}) is not among this torch build's architectures "
                f"({', '.join(archs)}); install a torch build for it"
            )
    return problems


def report() -> tuple[list[str], bool]:
    lines = [f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none (a CPU build)'}"]
    ok = True
    if torch.cuda.is_available():
        archs = torch.cuda.get_arch_list()
        lines.append(f"torch.cuda.get_arch_list(): {', '.join(archs)}")
        for index in range(torch.cuda.device_count()):
            capability = torch.cuda.get_device_capability(index)
            memory = torch.cuda.get_device_properties(index).total_memory / 2**30
            covered = _covered(capability, archs)
            ok &= covered
            lines.append(
                f"GPU {index}: {torch.cuda.get_device_name(index)}, sm_{capability[0]}{capability[1]}, "
                f"{memory:.1f} GiB, bfloat16 {'yes' if capability >= (8, 0) else 'no (float16 only)'}: "
                + ("supported" if covered else "NOT SUPPORTED by this torch build")
            )
    else:
        lines.append("no CUDA GPU visible: jobs train on the CPU (fine for the tiny demo model only)")
    try:
        import bitsandbytes

        lines.append(f"bitsandbytes {bitsandbytes.__version__}")
    except Exception as exc:  # a missing native library shows up here
        lines.append(f"bitsandbytes cannot be imported: {exc}")
        ok = False
    return lines, ok
