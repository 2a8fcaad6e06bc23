from setuptools import setup

# kernels/ (device code) installs as fused_embedding.kernels, beside the host
# code in python/fused_embedding: the folders on disk are the architecture.
setup(
    name="fused-embedding",
    version="0.1.0",
    description="Fused embedding lookup + mean pooling kernels for TensorFlow and Keras, CPU and GPU",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fused_embedding", "fused_embedding.backends", "fused_embedding.kernels"],
    package_dir={"fused_embedding": "python/fused_embedding",
                 "fused_embedding.kernels": "kernels"},
    package_data={"fused_embedding": ["*.cc"], "fused_embedding.kernels": ["*.cu"]},
    install_requires=["numpy>=1.24", "numba>=0.60", "ml_dtypes>=0.4"],
    extras_require={
        # TensorFlow is an extra, as TF add-ons do it, so a user's own TF build is kept.
        "tensorflow": ["tensorflow>=2.16"],
        "tensorflow-cpu": ["tensorflow-cpu>=2.16"],
        "gpu": ["numba-cuda>=0.30", "cupy-cuda13x"],  # CuPy built for CUDA 13
        "bench": ["matplotlib", "tqdm", "psutil"],
        # keras-rs: its EmbedReduce is what the fused EmbeddingBag is tested against;
        # portpicker: free localhost ports for the in-process ParameterServerStrategy cluster.
        # pytest-xdist: the README's test command runs the tests on two workers (`-n 2`).
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "hypothesis", "numba-cuda>=0.30", "psutil",
                 "matplotlib", "tqdm", "keras-rs", "portpicker"],
    },
    entry_points={"console_scripts": ["fused-embedding=fused_embedding.cli:main"]},
)
