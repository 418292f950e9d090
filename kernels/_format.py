"""The MXFP4 format's facts the kernels need (OCP Microscaling v1.0), held here because nothing in
`kernels/` imports the package: the kernels depend on nothing in `mxfp4_moe`. `mxfp4_moe.mxfp4`
is the package's home of the same facts and says what each means; tests/test_import_graph.py
checks that every name here has the value it has there.
"""

BLOCK_SIZE, BYTES_PER_BLOCK = 32, 16        # elements per E8M0 scale along K; packed bytes per block
NIBBLE_BITS, NIBBLE_MASK = 4, 0x0F          # two E2M1 codes per byte, the low nibble the even element
E2M1_SIGN_BIT = 0x8                         # code bits `s e1 e0 m`
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_BIAS, E8M0_NAN = 127, 0xFF             # byte b means 2 ** (b - 127); 255 is NaN
