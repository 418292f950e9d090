"""The MXFP4 format's facts the kernels need (OCP Microscaling v1.0), held here because nothing in
`kernels/` imports the package: the kernels depend on nothing in `mxfp4_moe`. `mxfp4_moe.mxfp4`
is the package's home of the same facts; tests/test_import_graph.py checks that each name here
has the value it has there.
"""

BLOCK_SIZE = 32
"""Elements sharing one E8M0 scale, along the reduction (K) axis."""
BYTES_PER_BLOCK = BLOCK_SIZE // 2
"""Packed bytes per block: two 4-bit codes per byte."""

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""Value of each E2M1 code (the index). Bit layout `s e1 e0 m`."""
E2M1_SIGN_BIT = 0x8
NIBBLE_BITS = 4
NIBBLE_MASK = 0x0F
"""Low nibble of a byte holds element 2j, the high nibble element 2j+1."""

E8M0_BIAS = 127
"""E8M0 byte b means 2 ** (b - E8M0_BIAS)."""
E8M0_NAN = 0xFF
"""The one special E8M0 byte: NaN."""
