from setuptools import find_packages, setup

setup(
    name="seqrec",
    version="0.1.0",
    description="SASRec / TiSASRec sequential recommenders with mHC, on CPU, one GPU or many (torchrun + DDP)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["seqrec", "seqrec.*"]),
    package_data={"seqrec.models": ["mhc_kernels.c"]},  # compiled on first use (seqrec/models/native.py)
    python_requires=">=3.10",
    install_requires=["torch>=2.3", "numpy", "pyyaml", "tqdm", "nvidia-ml-py"],
    extras_require={
        "test": ["pytest>=7", "matplotlib"],
        "plot": ["matplotlib"],
        "onnx": ["onnx", "onnxruntime", "onnxscript"],
    },
    entry_points={"console_scripts": ["seqrec=seqrec.cli:console"]},
)
