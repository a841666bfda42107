"""Compile every kernel for a GPU architecture without a GPU (Triton's bundled ptxas).

    python -m osd.kernels.compile_check [--arch 90]

Catches what Triton's CPU interpreter cannot (types, control flow, register-level
lowering) on a machine with no GPU; the tests run it.
"""

from __future__ import annotations

import argparse
import sys

import triton
from osd.kernels import accept, losses, topk
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from osd.distill.losses import LOSS_NAMES


def check_all(arch: int = 90) -> list[str]:
    """Build each kernel (every constexpr variant that changes its code) for ``sm_<arch>``;
    returns their names (one per build), raises on the first failure."""
    P, F, B8 = "*i64", "*fp32", "*i8"
    target = GPUTarget("cuda", arch, 32)
    built: list[str] = []

    def build(fn, sig: dict, consts: dict) -> None:
        sig = {**sig, **dict.fromkeys(consts, "constexpr")}
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target)
        if ".entry" not in kernel.asm["ptx"]:
            raise RuntimeError(f"{fn.__name__}: no kernel entry in the PTX")
        built.append(fn.__name__)

    walk = dict.fromkeys(["tok_ptr", "par_ptr", "path_ptr", "acc_tok_ptr", "count_ptr"], P)
    walk |= {"next_ptr": P, "leaf_ptr": B8, "root_leaf_ptr": B8, "bonus_ptr": B8}
    build(accept._greedy_kernel, {**walk, "am_ptr": P, "n": "i32", "W": "i32"}, {})
    sampling = {**walk, "last_ptr": B8, "earlier_ptr": B8, "size_ptr": P, "total_ptr": F}
    sampling |= {"q_ptr": F, "p_ptr": F, "u_ptr": F, "r_ptr": F, "n": "i32", "V": "i32"}
    sampling |= {"W": "i32"}
    for has_p, without in [(False, False), (True, False), (True, True)]:
        consts = {"EPS": 1e-12, "TINY": 1e-38, "HAS_P": has_p, "WOR": without}
        build(accept._sampling_kernel, sampling, consts | {"NPAD": 64, "BLOCK": 1024})
    tk = {"x_ptr": F, "ids_ptr": P, "lp_ptr": "*fp16", "tail_ptr": "*fp16", "V": "i32"}
    consts = {"K": 16, "KPAD": 16, "LOG_FLOOR": -30.0, "BLOCK": 1024}
    build(topk._topk_tail_kernel, tk | {"stride": "i32"}, consts)
    fwd = dict.fromkeys(["loss_ptr", "g_ptr", "lz_ptr", "lt_ptr", "lq_ptr", "x_ptr"], F)
    fwd |= {"ids_ptr": P, "label_ptr": P, "V": "i32", "stride": "i32"}
    fwd |= {"inv_t": "fp32", "beta": "fp32"}
    for code in range(len(LOSS_NAMES)):
        consts = {"K": 16, "KB": 32, "LOSS": code, "FLOOR": -100.0, "BLOCK": 1024}
        build(losses._loss_fwd_kernel, fwd, consts)
    bwd = dict.fromkeys(["x_ptr", "g_ptr", "lz_ptr", "lt_ptr", "go_ptr", "dx_ptr"], F)
    bwd |= {"ids_ptr": P, "V": "i32", "stride": "i32", "dstride": "i32", "inv_t": "fp32"}
    build(losses._loss_bwd_kernel, bwd, {"K": 16, "KB": 32, "BLOCK": 1024})
    return built


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compile every osd kernel for a GPU arch.")
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    args = ap.parse_args(argv)
    names = check_all(args.arch)
    print(f"{len(names)} kernels compiled for sm_{args.arch}: {', '.join(sorted(set(names)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
