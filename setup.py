"""Build script: the pure-Python package, with the Triton kernels shipped as ``tvlars_fused.triton_kernels``."""

from setuptools import setup

setup(
    packages=["tvlars_fused", "tvlars_fused.triton_kernels"],
    package_dir={"tvlars_fused.triton_kernels": "triton_kernels"},
)
