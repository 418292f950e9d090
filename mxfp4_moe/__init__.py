"""mxfp4_moe"""
