"""Inline PTX shared by the Triton and the Gluon top-k kernels."""

import triton.language as tl

# Store a ``_raw`` candidate (score bits << 32 | col) at row_ptr[place] (int64 places) where
# mask is set: operands $1 the row's pointer, $2 the mask, $3 the int32 place, $4 the score's
# bits, $5 the column; $0 a dummy result (inline PTX must return one). The address and the
# candidate's two words are formed inside the PTX, so no 64-bit pointer or value tile is held
# in registers.
STORE_CANDIDATE = tl.constexpr(
    "{ .reg .pred p; .reg .b64 a; setp.ne.s32 p, $2, 0; mad.wide.s32 a, $3, 8, $1; "
    "@p st.global.v2.b32 [a], {$5, $4}; mov.u32 $0, 0; }"
)
STORE_CANDIDATE_CONSTRAINTS = tl.constexpr("=r,l,r,r,r,r")
