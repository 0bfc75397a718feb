"""Named numeric constants. Each carries the reason it has its value."""

# --- E2M1 (FP4) element grid -------------------------------------------------------------
E2M1_MAX = 6.0                 # largest E2M1 magnitude; codes saturate here (cvt.rn.satfinite.e2m1)
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)   # all non-negative E2M1 values

# --- E4M3 (float8_e4m3fn) -----------------------------------------------------------------
E4M3_MAX = 448.0               # OCP e4m3fn max finite (not AMD fnuz's 240)
E4M3_MIN_NORMAL_EXP = -6       # 2**-6 is the smallest normal e4m3 value
E4M3_SUBNORMAL_STEP = 2.0 ** -9  # spacing of e4m3 subnormals (3 mantissa bits below 2**-6)
E4M3_MANTISSA_BITS = 3

# --- E8M0 (MX block scale) ------------------------------------------------------------------
E8M0_MIN_EXP = -126            # we clamp MX scales to fp32 normals (E8M0 would allow 2**-127)
E8M0_MAX_EXP = 127

# --- microscaling block lengths (along the reduction dim of each product) -----------------
NVFP4_BLOCK = 16               # NVFP4: one E4M3 scale per 16 elements
MXFP4_BLOCK = 32               # MXFP4: one E8M0 scale per 32 elements

# --- softmax --------------------------------------------------------------------------------
LOG2E = 1.4426950408889634     # exp(x) == exp2(x * LOG2E); kernels fold it into the score scale
RINT_MAGIC = 12582912.0        # 1.5 * 2**23: (x + M) - M rounds an fp32 |x| < 2**22 to the nearest even integer

# --- P quantisation (probabilities inside one KV block, relative to that block's row max) --
P_FP4_MAX = E2M1_MAX           # exp(S - B) in [0, 1] is multiplied by 6 so the block max hits the top code
P_FP8_MAX = E4M3_MAX           # same for the fp8 format: the block max maps to 448

# --- selection ------------------------------------------------------------------------------
DEFAULT_BLOCK_SIZE = 64        # the paper's selection and kernel block (64 tokens)
DEFAULT_FRACTION = 0.05        # the paper's headline budget: 5% of (causal) block pairs in high precision
MAX_KV_BLOCKS_SELECT = 4096    # selection kernel keeps one row of block scores in registers (256k tokens at 64)

# --- head dims (docs/numerics.md §2) ------------------------------------------------------------
# q/k scale groups run along the head dim: FP4 groups (16 / 32 elements) must tile it; fp8 has one scale
# per token, and 16 keeps every row 16-byte aligned for the kernels' loads.
FORMAT_HEAD_DIM_MULTIPLE = {"nvfp4": NVFP4_BLOCK, "mxfp4": MXFP4_BLOCK, "fp8": 16}
MAX_HEAD_DIM = 256             # the largest [BLOCK_M, D] accumulator a kernel keeps in registers
