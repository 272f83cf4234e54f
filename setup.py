"""s4d_dist: distributed training for S4D (Static for Dynamic facial expression recognition).

`kernels/` and `shards/` live at the top level of the repository but install as
`s4d_dist.kernels` and `s4d_dist.shards`, so they never clash with PyPI packages of those names.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["s4d_dist", "s4d_dist.*"])
packages += [f"s4d_dist.{top}" for top in ("kernels", "shards")]
packages += [f"s4d_dist.{top}.{sub}" for top in ("kernels", "shards") for sub in find_packages(top)]

setup(
    name="s4d_dist",
    version="0.1.0",
    description="Distributed S4D: dual-modal MAE pre-training and MoAE multi-task fine-tuning",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"s4d_dist.kernels": "kernels", "s4d_dist.shards": "shards"},
    package_data={"s4d_dist": ["presets/*.yaml"]},
    install_requires=[
        "torch",
        "numpy",
        "omegaconf",
        "deepspeed",
        "webdataset",
        "pillow",
        "av",
        "tqdm",
        "tensorboard",
        "triton",
        "ray[default,train,tune]",  # default: dashboard + state API, which frees finished Tune trials
        "scikit-learn",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda120"],
        "dev": ["pytest", "pytest-timeout"],
    },
)
