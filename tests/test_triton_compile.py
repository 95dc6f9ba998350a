"""Every Triton kernel compiles to PTX for sm_80 and sm_90 (compile only: no GPU needed).

The interpreter runs the kernels' math on the CPU but never lowers them; this
catches what only the compiler rejects (types, unsupported ops, scalar
branches). Compiling needs the kernels imported without TRITON_INTERPRET, so
one subprocess compiles every variant and the tests read its report.
"""

import json
import os
import subprocess
import sys

import pytest

from pf_engine.resample import AGGREGATIONS, REWARD_KINDS, SCHEMES

ARCHS = [80, 90]

RESAMPLE_TYPES = {
    **dict.fromkeys(["seg_ptr", "steps_ptr", "steps_out_ptr", "ancestor_ptr", "next_steps_ptr", "invalid_ptr"], "*i32"),
    **dict.fromkeys(["prm_ptr", "agg_ptr", "uniforms_ptr", "reward_ptr", "agg_out_ptr", "weight_ptr",
                     "next_agg_ptr", "ess_ptr"], "*fp32"),
    **dict.fromkeys(["live_ptr", "next_live_ptr", "resampled_ptr"], "*i8"),
    "scratch_ptr": "*fp64",
    "seed": "i64",
    "rand_base": "i64",
    **dict.fromkeys(["inv_temperature", "clip", "ess_threshold"], "fp32"),
}
# Each scheme, reward kind and aggregation once against the defaults, on sm_90; the default on sm_80.
DEFAULT = ("systematic", "class_logits", "last", False)
RESAMPLE_VARIANTS = sorted(
    {(90, s, "class_logits", "last", False) for s in SCHEMES}
    | {(90, "systematic", r, "last", False) for r in REWARD_KINDS}
    | {(90, "systematic", "class_logits", a, False) for a in AGGREGATIONS}
    | {(90, "systematic", "class_logits", "last", True), (80, *DEFAULT)}
)
COPY_VARIANTS = [(arch, word) for arch in ARCHS for word in ("*i16", "*i32")]
# (arch, dtype, group, head_dim, block_size)
DECODE_VARIANTS = [(arch, dtype, 4, 64, 16) for arch in ARCHS for dtype in ("fp32", "bf16")] + [(90, "bf16", 3, 96, 5)]


def variant_id(*parts):
    return "-".join(str(p) for p in parts)


def compile_all():
    """Runs without TRITON_INTERPRET: compiles every variant, prints {id: "ok" or the error}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pf_engine.kernels.copy_blocks import _copy_blocks_kernel
    from pf_engine.kernels.paged_attention import _paged_decode_kernel
    from pf_engine.kernels.resample import AGGREGATION_CODES, REWARD_CODES, SCHEME_CODES, _fused_resample_kernel

    def compile_ptx(kernel, types, constexprs, arch):
        signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        ptx = triton.compile(source, target=GPUTarget("cuda", arch, 32)).asm["ptx"]
        return "ok" if ".entry " + kernel.__name__ in ptx else "no entry point in the PTX"

    jobs = []  # (report key, kernel, argument types, constexprs, arch)
    for arch, word in COPY_VARIANTS:
        types = {"kv_ptr": word, "pairs_ptr": "*i32", "layer_stride": "i64", "block_numel": "i32"}
        jobs.append((variant_id("copy", arch, word), _copy_blocks_kernel, types, {"BLOCK": 1024}, arch))
    for arch, scheme, reward, aggregation, use_uniforms in RESAMPLE_VARIANTS:
        constexprs = {
            "REWARD_KIND": REWARD_CODES[reward].value,
            "AGGREGATION": AGGREGATION_CODES[aggregation].value,
            "SCHEME": SCHEME_CODES[scheme].value,
            "USE_UNIFORMS": use_uniforms,
            "BLOCK": 1024,
            "LOG2_BLOCK": 10,
        }
        key = variant_id("resample", arch, scheme, reward, aggregation, use_uniforms)
        jobs.append((key, _fused_resample_kernel, RESAMPLE_TYPES, constexprs, arch))

    def pow2(x):
        return 1 << (x - 1).bit_length()

    for arch, dtype, group, head_dim, block_size in DECODE_VARIANTS:
        types = {"q_ptr": f"*{dtype}", "kv_ptr": f"*{dtype}", "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
                 "out_ptr": f"*{dtype}", "scale": "fp32",
                 **dict.fromkeys(["stride_table", "stride_block", "stride_kv", "stride_token", "stride_head"], "i32")}
        constexprs = {"GROUP": group, "GROUP_PAD": pow2(group), "HEAD_DIM": head_dim, "HEAD_DIM_PAD": pow2(head_dim),
                      "BLOCK_SIZE": block_size, "BLOCK_SIZE_PAD": pow2(block_size)}
        key = variant_id("decode", arch, dtype, group, head_dim, block_size)
        jobs.append((key, _paged_decode_kernel, types, constexprs, arch))

    report = {}
    for key, kernel, types, constexprs, arch in jobs:
        try:
            report[key] = compile_ptx(kernel, types, constexprs, arch)
        except Exception as exc:  # reported to the test, which names the variant
            report[key] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(report))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch,word", COPY_VARIANTS)
def test_copy_blocks_compiles(report, arch, word):
    assert report[variant_id("copy", arch, word)] == "ok"


@pytest.mark.parametrize("arch,dtype,group,head_dim,block_size", DECODE_VARIANTS)
def test_paged_decode_compiles(report, arch, dtype, group, head_dim, block_size):
    assert report[variant_id("decode", arch, dtype, group, head_dim, block_size)] == "ok"


@pytest.mark.parametrize("arch,scheme,reward,aggregation,use_uniforms", RESAMPLE_VARIANTS)
def test_fused_resample_compiles(report, arch, scheme, reward, aggregation, use_uniforms):
    assert report[variant_id("resample", arch, scheme, reward, aggregation, use_uniforms)] == "ok"


if __name__ == "__main__":
    compile_all()
