"""The real GPU path compiles: the Triton kernels, with the launch configurations the wrappers pick,
are compiled ahead of time for sm_90 (H100) and sm_80 (A100) down to a cubin with triton's bundled ptxas -- no GPU
needed (for the dtypes, tilings and the bank_nce / bank_lse variants listed below; a variant not
listed compiles on first use on the GPU). The interpreter tests check the math; this checks what the interpreter cannot (typing,
dot shapes and precisions, register allocation: spills are reported by ptxas -v).

Runs in a subprocess: the other kernel tests import the kernels in interpreter mode.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r'''
import json, os, subprocess, sys, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mohico.kernels import bank_nce_triton as bt, correlation_triton as ct
assert not bt.INTERPRETED and not ct.INTERPRETED
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
TY = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}
results = []

def compile_one(fn, sig, consts, num_warps, arch):
    names = fn.arg_names
    src = ASTSource(fn=fn, signature={n: sig.get(n, "constexpr") for n in names},
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    assert len(k.asm["cubin"]) > 0
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    info = subprocess.run([ptxas, "-v", f"-arch=sm_{arch}", f.name, "-o", os.devnull],
                          capture_output=True, text=True).stderr
    os.unlink(f.name)
    spill = [l.split(":", 1)[-1].strip() for l in info.splitlines() if "spill" in l]
    results.append({"kernel": fn.__name__, "arch": arch, "consts": {k: str(v) for k, v in consts.items()},
                    "spill": spill})

class FakeCuda:  # _config only looks at shape, dtype and is_cuda
    def __init__(self, shape, dtype):
        self.shape, self.dtype, self.is_cuda = shape, dtype, True

# (arch, dtype, (B, d), HAS_POS): every dtype on H100; the bank_lse path (no positive) and the
# small-batch tiling for fp32 / bf16; A100 for the production dtypes.
BANK = [(90, dt, dt, (256, 128), True) for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64)]
BANK += [(90, torch.float32, torch.bfloat16, (256, 128), True)]  # fp32 queries, bf16 bank
BANK += [(90, dt, dt, (7, 64), False) for dt in (torch.float32, torch.bfloat16)]
BANK += [(80, dt, dt, (256, 128), True) for dt in (torch.float32, torch.bfloat16)]
BANK = [b + (False,) for b in BANK]
BANK += [(90, dt, dt, (256, 128), pos, True) for dt in (torch.float32, torch.bfloat16) for pos in (True, False)]
for arch, dtype, bank_dtype, (B, D), has_pos, has_ids in BANK:
    c = bt._config(FakeCuda((B, D), dtype), 131072, 4)
    acc = TY[c["acc"]]
    common = dict(Q=f"*{TY[dtype]}", KP=f"*{acc}", BANK=f"*{TY[bank_dtype]}",
                  QID="*i64" if has_ids else f"*{TY[dtype]}", BID="*i64" if has_ids else f"*{TY[dtype]}", B="i32", K="i32", D="i32",
                  k_per_split="i32", inv_tau="fp32", stride_q="i32", stride_kp="i32", stride_bank="i32")
    cst = dict(HAS_POS=has_pos, HAS_IDS=has_ids, ACC_F64=c["acc"] == torch.float64, IEEE=c["ieee"], PREC=c["prec"],
               UPCAST=c["upcast"], BLOCK_B=c["block_b"], BLOCK_K=c["block_k"], BLOCK_D=c["block_d"])
    compile_one(bt._lse_partial_fwd_kernel, dict(common, M_OUT=f"*{acc}", S_OUT=f"*{acc}"), cst,
                c["num_warps"], arch)
    compile_one(bt._lse_partial_bwd_kernel, dict(common, LSE=f"*{acc}", G=f"*{acc}", DQ_OUT=f"*{acc}"),
                cst, c["num_warps"], arch)
for arch in (90, 80):
    dt = "fp32"
    sig = dict(F1=f"*{dt}", F2=f"*{dt}", DX=f"*{dt}", DY=f"*{dt}", CONF=f"*{dt}", IDX="*i32", DENOM=f"*{dt}",
               GOUT=f"*{dt}", DF1=f"*{dt}", DF2=f"*{dt}", C="i32", H="i32", W="i32", sigma_sq2_inv="fp32",
               temperature="fp32")
    _, _, _, _, block_c, block_p, num_warps, _ = ct.launch_cfg(torch.empty((2, 64, 28, 28)), 7)
    for kern in (ct.corr_fwd_kernel, ct.corr_bwd_f1_kernel, ct.corr_bwd_f2_kernel):
        compile_one(kern, sig, dict(R=7, BLOCK_C=block_c, BLOCK_P=block_p), num_warps, arch)
print(json.dumps(results))
'''


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90_and_sm80():
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    results = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * (9 + 4) + 2 * 3     # 9 unmasked + 4 own-video-masked bank variants, fwd + bwd; 3 correlation kernels
    # The production configurations (fp32 / half bank, H100) must not spill heavily (the IEEE
    # fp32 dot did: ~8 KB of spill stores, hence 3xTF32).
    for r in results:
        if r["arch"] == 90 and r["kernel"].startswith("_lse") and r["consts"]["ACC_F64"] == "False":
            for line in r["spill"]:
                stores = int(line.split("bytes spill stores")[0].split(",")[-1].strip())
                assert stores <= 512, (r, line)
